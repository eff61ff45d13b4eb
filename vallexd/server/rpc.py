"""The Unix-socket RPC server: length-prefixed msgpack frames (docs/protocol.md) → `Service`.

One connection carries requests handled one after another.  While a request runs,
a reader task already reads the next frame; that is how a client that hangs up
mid-request is noticed (EOF) and its job cancelled instead of computed for nobody.

Exceptions become wire errors through `transport.to_wire_error`, the one mapping both
transports use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vallexd import __version__
from vallexd import protocol as proto
from vallexd.errors import Busy, ErrorCode, InvalidArgument, Unavailable, UnknownMethod, VallexError
from vallexd.server.limits import ConnectionShares, FrameBudget, LogLimiter
from vallexd.server.metrics import Metrics
from vallexd.server.transport import DrainGate, ServiceLike, log_safe, outcome, to_wire_error

log = logging.getLogger("vallexd.server.rpc")
access_log = logging.getLogger("vallexd.access")

_PEERCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
#: How long a response write may wait for a client that does not read.
WRITE_TIMEOUT_S = 60.0


@dataclass
class Peer:
    uid: int | None
    pid: int | None

    def __str__(self) -> str:
        return f"uid={self.uid} pid={self.pid}"


def peer_credentials(sock: socket.socket | None) -> Peer:
    """SO_PEERCRED of a Unix socket connection (Linux); unknown fields are None."""
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return Peer(None, None)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return Peer(None, None)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return Peer(uid, pid)


def _no_params(method: str, params: dict[str, Any]) -> None:
    if params:
        raise InvalidArgument(
            f"{method} takes no params, got {sorted(map(str, params))}", reason="UNKNOWN_FIELD"
        )


@dataclass
class _Request:
    request_id: Any
    method: str
    params: dict[str, Any]
    peer: Peer
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    send_event: Callable[[str, dict[str, Any]], None] | None = None


Handler = Callable[[_Request], Awaitable[dict[str, Any]]]
#: What the reader hands the request loop: (message, bytes taken from the frame budget), None
#: at EOF, or the error that ends the connection.
_Item = tuple[dict[str, Any], int] | VallexError | None


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: Peer
    task: asyncio.Task[None]
    frames: asyncio.Queue[_Item] = field(default_factory=lambda: asyncio.Queue(maxsize=1))
    current: list[_Request] = field(default_factory=list)  # the running request, so EOF can cancel it
    held: list[_Item] = field(default_factory=list)  # read, waiting for room in `frames`
    log: LogLimiter = field(default_factory=LogLimiter)  # error lines of this connection


def _suppressed(limiter: LogLimiter) -> str:
    n = limiter.take_suppressed()
    return f" ({n} similar line(s) left out)" if n else ""


class RpcServer:
    """Serve `service` on a Unix socket (a path or an inherited listening socket)."""

    def __init__(self, service: ServiceLike, *, max_frame: int, max_connections: int,
                 idle_timeout_s: float, max_connections_per_uid: int | None = None,
                 frame_budget: int | None = None, exempt_uids: frozenset[int] | None = None) -> None:
        """`max_connections_per_uid` defaults to half of `max_connections` (root and the daemon's
        own uid are exempt unless `exempt_uids` says otherwise); `frame_budget` (bytes of large
        frames in memory at once) defaults to 4 x `max_frame`."""
        self.service = service
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.shares = ConnectionShares(max_connections_per_uid or max(1, max_connections // 2), exempt_uids)
        self.frame_budget = FrameBudget(frame_budget or 4 * max_frame)
        self._refusal_log = LogLimiter(burst=10, interval_s=1.0)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()  # connections with a request running
        self.gate = DrainGate()
        self.metrics: Metrics | None = None
        self._methods: dict[str, Handler] = {
            "ping": self._ping,
            "status": self._status,
            "synthesize": self._synthesize,
            "presets.list": self._presets_list,
            "presets.install": lambda r: self.service.presets_install(r.params),
            "presets.remove": lambda r: self.service.presets_remove(r.params),
            "presets.create": lambda r: self.service.presets_create(r.params),
            "cache.stats": self._cache_stats,
            "cache.prune": lambda r: self.service.cache_prune(r.params),
        }

    def use_metrics(self, metrics: Metrics) -> None:
        """Count every request in `metrics` (method names: this server's methods, else "other")."""
        metrics.allow("rpc", self._methods)
        self.metrics = metrics

    # ------------------------------------------------------------------ methods
    async def _ping(self, req: _Request) -> dict[str, Any]:
        _no_params("ping", req.params)
        # "state" lets a client that connected while the model loads wait for "ready".
        return {"pong": True, "version": __version__, "state": getattr(self.service, "state", "ready")}

    async def _status(self, req: _Request) -> dict[str, Any]:
        _no_params("status", req.params)
        result = await self.service.status()
        # Transport-level view (the service only sees work that reached it): open connections
        # and requests being handled right now, not counting this status request.
        result["rpc"] = {"connections": len(self._connections), "in_flight": self.gate.in_flight - 1}
        if self.metrics is not None:
            result["metrics"] = self.metrics.summary()
        return result

    async def _presets_list(self, req: _Request) -> dict[str, Any]:
        _no_params("presets.list", req.params)
        return await self.service.presets_list()

    async def _cache_stats(self, req: _Request) -> dict[str, Any]:
        _no_params("cache.stats", req.params)
        return await self.service.cache_stats()

    async def _synthesize(self, req: _Request) -> dict[str, Any]:
        progress = None
        if req.params.get("progress") is True and req.send_event is not None:
            send = req.send_event

            def progress(done: int, total: int) -> None:
                send("progress", {"done": int(done), "total": int(total)})

        if req.params.get("stream") is True and req.send_event is not None:
            return await self._synthesize_stream(req, progress)
        result = await self.service.synthesize(req.params, progress=progress, cancelled=req.cancelled)
        return result.to_wire()

    async def _synthesize_stream(self, req: _Request, progress: Any) -> dict[str, Any]:
        """`stream: true`: `audio` events with the encoded chunks as pieces finish, then the result."""
        send = req.send_event
        assert send is not None
        async with self.service.synthesize_stream(req.params, progress=progress,
                                                  cancelled=req.cancelled) as stream:
            fmt = stream.request.format
            async for chunk in stream.chunks():
                send("audio", {"index": chunk.index, "offset": chunk.offset, "samples": chunk.samples,
                               "format": fmt, "data": chunk.data, "last": chunk.last})
        assert stream.result is not None
        return stream.result.to_wire()

    # ------------------------------------------------------------------ listening
    async def start(self, *, path: str | None = None, sock: socket.socket | None = None) -> None:
        """Listen on `sock` (already bound and listening, e.g. socket activation) or `path`."""
        if sock is not None:
            self._server = await asyncio.start_unix_server(self._on_connect, sock=sock, limit=1 << 16)
        else:
            # The backlog covers a burst of connects well past max_connections: the extra ones
            # must be accepted and told BUSY, not refused by the kernel (EAGAIN) unanswered.
            self._server = await asyncio.start_unix_server(self._on_connect, path=path, limit=1 << 16,
                                                           backlog=max(256, 4 * self.max_connections))

    def stop_accepting(self) -> None:
        """Close the listener and refuse further requests on open connections."""
        self.gate.draining = True
        if self._server is not None:
            self._server.close()
        # Connections waiting for their next request are closed now; busy ones after their response.
        for task in self._connections - self._busy:
            task.cancel()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is running; False if `timeout` passed first."""
        return await self.gate.wait_idle(timeout)

    async def close(self) -> None:
        """Drop every connection (after draining)."""
        self.stop_accepting()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    # ------------------------------------------------------------------ connections
    def _refusal(self, peer: Peer) -> VallexError | None:
        """Why a new connection of `peer` is refused, or None (and then its slot is counted)."""
        if self.gate.draining:
            return Unavailable("the daemon is shutting down", reason="SHUTTING_DOWN")
        if len(self._connections) >= self.max_connections:
            return Busy(f"too many connections (limit {self.max_connections}); retry later",
                        reason="TOO_MANY_CONNECTIONS", details={"limit": self.max_connections})
        if not self.shares.try_open(peer.uid):
            return Busy(f"uid {peer.uid} holds its share of {self.shares.per_uid} of the "
                        f"{self.max_connections} connections; close some or retry later",
                        reason="TOO_MANY_CONNECTIONS_FOR_USER", details={"limit": self.shares.per_uid})
        return None

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = peer_credentials(writer.get_extra_info("socket"))
        err = self._refusal(peer)
        if err is not None:
            if self._refusal_log.allow():
                access_log.info("rpc refused connection peer %s: %s/%s%s", peer, err.code.value, err.reason,
                                _suppressed(self._refusal_log))
            await self._send_and_close(writer, proto.error(None, err))
            return
        self._connections.add(task)
        conn = _Connection(reader, writer, peer, task)
        try:
            await self._serve_connection(conn)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a bug in here must not take the server down
            to_wire_error(exc, "connection handler")
        finally:
            self.shares.close(peer.uid)
            self._connections.discard(task)
            self._busy.discard(task)
            self._release_unserved(conn)
            if conn.log.suppressed:
                access_log.info("rpc peer %s: %d more error line(s) left out", peer,
                                conn.log.take_suppressed())
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve_connection(self, conn: _Connection) -> None:
        """Serve one connection: a reader task one frame ahead, requests handled in order."""
        reader_task = asyncio.get_running_loop().create_task(self._read_loop(conn))
        try:
            await self._request_loop(conn)
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader_task
            if self.gate.draining:
                self._refuse_unserved(conn)

    async def _read_frame(self, conn: _Connection) -> _Item:
        """The next frame as (message, budgeted bytes), None at EOF, or a VallexError that ends
        the connection (broken framing, or BUSY when the frame budget cannot take its body: the
        body is then never read)."""
        try:
            length = await proto.read_frame_header(conn.reader, self.max_frame)
            if length is None:
                return None
            if not self.frame_budget.try_take(length):
                return Busy(f"the daemon is reading too many large frames at once "
                            f"({self.frame_budget.limit} bytes); retry later", reason="FRAME_BUDGET",
                            details={"length": length, "budget": self.frame_budget.limit})
            try:
                return await proto.read_frame_body(conn.reader, length), length
            except BaseException:
                self.frame_budget.give_back(length)
                raise
        except VallexError as exc:
            return exc
        except (ConnectionError, OSError):
            return None

    async def _read_loop(self, conn: _Connection) -> None:
        """Read frames into `conn.frames` (at most one waiting, so at most 2 frames buffered); EOF
        cancels the running request (the client went away)."""
        while True:
            item = await self._read_frame(conn)
            if item is None:
                for req in conn.current:
                    req.cancelled.set()
            conn.held.append(item)
            await conn.frames.put(item)
            conn.held.clear()
            if not isinstance(item, tuple):
                return

    async def _request_loop(self, conn: _Connection) -> None:
        while True:
            try:
                item = await asyncio.wait_for(conn.frames.get(), self.idle_timeout_s)
            except asyncio.TimeoutError:
                log.debug("closing idle connection of %s", conn.peer)
                return
            if item is None:
                return
            if isinstance(item, VallexError):
                await self._reject_frame(conn, item)
                return
            message, length = item
            self._busy.add(conn.task)
            try:
                with self.gate.track():
                    await self._handle(message, conn.writer, conn.peer, conn.current, conn.log)
            finally:
                self._busy.discard(conn.task)
                self.frame_budget.give_back(length)
            if self.gate.draining or conn.writer.is_closing():
                return

    async def _reject_frame(self, conn: _Connection, err: VallexError) -> None:
        """Broken framing (or a refused body): we cannot find the next frame boundary, so
        answer and hang up."""
        if conn.log.allow():
            access_log.info("rpc id=- method=- peer %s error=%s (%s)", conn.peer, err.code.value,
                            err.reason or "")
        await self._send_and_close(conn.writer, proto.error(None, err))

    def _unserved(self, conn: _Connection) -> list[tuple[dict[str, Any], int]]:
        items: list[_Item] = []
        while not conn.frames.empty():
            items.append(conn.frames.get_nowait())
        items += conn.held
        conn.held.clear()
        return [item for item in items if isinstance(item, tuple)]

    def _refuse_unserved(self, conn: _Connection) -> None:
        """At shutdown, requests the client already sent (read ahead, or read while the connection
        sat idle) get an answer instead of silence, as the protocol says."""
        for message, length in self._unserved(conn):
            self.frame_budget.give_back(length)
            access_log.info("rpc id=%s method=%s peer %s refused: UNAVAILABLE/SHUTTING_DOWN",
                            log_safe(_safe_id(message)), log_safe(message.get("method"), 64), conn.peer)
            self._write(conn.writer, proto.error(_safe_id(message), Unavailable(
                "the daemon is shutting down", reason="SHUTTING_DOWN")))

    def _release_unserved(self, conn: _Connection) -> None:
        for _message, length in self._unserved(conn):
            self.frame_budget.give_back(length)

    async def _handle(self, message: dict[str, Any], writer: asyncio.StreamWriter, peer: Peer,
                      current: list[_Request], limiter: LogLimiter) -> None:
        started = time.monotonic()
        request_id: Any = _safe_id(message)
        method = "-"
        result: dict[str, Any] | None = None
        error: VallexError | None = None
        try:
            request_id, method, params = proto.parse_request(message)
            handler = self._methods.get(method)
            if handler is None:
                raise UnknownMethod(f"unknown method {method[:100]!r}", reason="UNKNOWN_METHOD",
                                    details={"methods": sorted(self._methods)})
            req = _Request(request_id, method, params, peer)
            req.send_event = lambda name, data: self._write(writer, proto.event(req.request_id, name, data))
            current.append(req)
            try:
                result = await handler(req)
            except asyncio.CancelledError:
                req.cancelled.set()  # cut off at shutdown: let the worker drop the job too
                raise
            finally:
                current.remove(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = to_wire_error(exc, f"method {log_safe(method, 64)}")
        reply = proto.ok(request_id, result or {}) if error is None else proto.error(request_id, error)
        self._write(writer, reply)
        try:
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            # A client that stops reading would make us buffer every further response: hang up.
            writer.close()
        if self.metrics is not None:
            self.metrics.request("rpc", method, error)
        if error is not None and error.code is not ErrorCode.INTERNAL and not limiter.allow():
            return  # a client sending bad requests in a loop: its lines are counted, not logged
        cached = result.get("cached") if isinstance(result, dict) else None
        # A successful ping is a liveness probe (systemd, vallexctl, scripts poll it): DEBUG, or it
        # floods the journal; a failed one is logged like any request.
        level = logging.DEBUG if method == "ping" and error is None else logging.INFO
        access_log.log(
            level,
            "rpc id=%s method=%s peer %s %.0fms cached=%s %s%s",
            log_safe(request_id), log_safe(method, 64), peer, (time.monotonic() - started) * 1000,
            "-" if cached is None else ("hit" if cached else "miss"), outcome(error),
            _suppressed(limiter),
        )

    def _write(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(proto.pack(message))

    async def _send_and_close(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        self._write(writer, message)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), 5.0)
        writer.close()


def _safe_id(message: dict[str, Any]) -> Any:
    """The request id to echo in an error reply, or None if it is not a valid id."""
    rid = message.get("id")
    if isinstance(rid, (int, str)) and not isinstance(rid, bool):
        return rid
    return None
