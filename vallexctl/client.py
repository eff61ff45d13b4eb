"""A small synchronous client for the vallexd Unix socket (docs/protocol.md).

One `Client` holds one connection; requests go one after another, each with
its own id.  Events for a request (progress) are handed to a callback before
its response arrives.  Daemon errors come back as the `VallexError`
subclasses of `vallexd.errors`; not reaching the daemon at all is the distinct
`DaemonUnreachable`, so the CLI can tell "is it running?" apart from a
refused request.
"""

from __future__ import annotations

import errno
import itertools
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from vallexd import protocol
from vallexd.errors import ErrorCode, ProtocolError, Unavailable, VallexError

EventHandler = Callable[[str, dict[str, Any]], None]


class DaemonUnreachable(VallexError):
    """No daemon answers at the socket path (missing, refused, not permitted)."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, socket_path: Path, why: str, *, hint: str | None = None) -> None:
        message = f"cannot reach vallexd at {socket_path}: {why}"
        super().__init__(message, reason="DAEMON_UNREACHABLE", details={"socket": str(socket_path)})
        self.socket_path = socket_path
        self.hint = hint


START_HINT = (
    "is it running? start it with `vallexctl daemon start` (--demo for the demo weights), "
    "`vallexctl quickstart`, `systemctl start vallexd` (or `systemctl --user start vallexd`), or `vallexd`"
)


class Client:
    """`with Client(path) as c: c.call("status")`."""

    def __init__(
        self,
        socket_path: Path,
        *,
        connect_timeout: float = 5.0,
        timeout: float | None = None,
        max_frame: int = protocol.DEFAULT_MAX_RESPONSE_FRAME,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.connect_timeout = connect_timeout
        self.timeout = timeout  # per read; None waits as long as the daemon works (its own deadline applies)
        self.max_frame = max_frame
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)

    @classmethod
    def default(cls, **kwargs: Any) -> Client:
        """A client for the socket vallexctl would use: $VALLEXD_SOCKET, else the daemon's default
        for this user ($XDG_RUNTIME_DIR/vallexd/vallexd.sock or /tmp/vallexd-UID/vallexd.sock), else
        the system service's /run/vallexd/vallexd.sock when only that exists. `kwargs` as for Client."""
        from vallexctl.context import default_socket

        return cls(default_socket(), **kwargs)

    # -- connection -----------------------------------------------------------------------------
    def connect(self) -> Client:
        if self._sock is not None:
            return self
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(str(self.socket_path))
        except FileNotFoundError:
            sock.close()
            raise DaemonUnreachable(self.socket_path, "no socket there", hint=START_HINT) from None
        except PermissionError:
            sock.close()
            raise DaemonUnreachable(
                self.socket_path, "permission denied",
                hint="ask an admin to add you to the socket's group (e.g. `vallexd`), then log in again",
            ) from None
        except OSError as exc:
            sock.close()
            why = "connection refused (stale socket, daemon not running)" \
                if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK) else (exc.strerror or str(exc))
            raise DaemonUnreachable(self.socket_path, why, hint=START_HINT) from None
        sock.settimeout(self.timeout)
        self._sock = sock
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------------
    def call(
        self, method: str, params: dict[str, Any] | None = None, *, on_event: EventHandler | None = None
    ) -> dict[str, Any]:
        """Send one request and return its `result`, or raise the daemon's error."""
        sock = self.connect()._sock
        assert sock is not None
        request_id = next(self._ids)
        try:
            sock.sendall(protocol.pack(protocol.request(request_id, method, params)))
            while True:
                message = protocol.recv_frame(sock, self.max_frame)
                if message is None:
                    self.close()
                    raise ProtocolError(
                        f"vallexd closed the connection before answering {method!r}", reason="CLOSED"
                    )
                if message.get("id") != request_id:
                    if message.get("id") is None and message.get("ok") is False:
                        # The daemon refused the frame itself (oversize, malformed) and hung up.
                        self.close()
                        raise VallexError.from_wire(message.get("error"))
                    self.close()
                    raise ProtocolError(
                        f"response id {message.get('id')!r} does not match request {request_id}",
                        reason="ID_MISMATCH",
                    )
                if "event" in message:
                    if on_event is not None:
                        data = message.get("data")
                        on_event(str(message["event"]), data if isinstance(data, dict) else {})
                    continue
                if message.get("ok") is True:
                    result = message.get("result")
                    if not isinstance(result, dict):
                        raise ProtocolError("response 'result' is not a map", reason="BAD_ENVELOPE")
                    return result
                raise VallexError.from_wire(message.get("error"))
        except TimeoutError:
            self.close()
            raise VallexError(
                f"vallexd did not answer {method!r} within {self.timeout:g} s", code=ErrorCode.TIMEOUT,
                reason="CLIENT_TIMEOUT",
            ) from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            refusal = _pending_refusal(sock)
            self.close()
            if refusal is not None:  # e.g. BUSY: the daemon answered at connect, then hung up
                raise refusal from None
            raise DaemonUnreachable(self.socket_path, f"connection lost ({exc.strerror or exc})",
                                    hint=START_HINT) from None

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def wait_ready(self, timeout: float, *, on_wait: Callable[[], None] | None = None,
                   poll_s: float = 0.25) -> dict[str, Any]:
        """Wait up to `timeout` seconds until the daemon's model is loaded; returns the last ping.

        A daemon listens while it loads the model (ping `state: "loading"`) and refuses
        `synthesize` with UNAVAILABLE / MODEL_LOADING until then. `on_wait()` is called once,
        when waiting is needed. Raises Unavailable MODEL_LOADING when the time runs out and
        Unavailable SHUTTING_DOWN when the daemon is stopping.
        """
        deadline = time.monotonic() + timeout
        told = False
        while True:
            answer = self.ping()
            state = answer.get("state", "ready")  # daemons before the field were always ready
            if state == "ready":
                return answer
            if state == "draining":
                raise Unavailable("vallexd is shutting down", reason="SHUTTING_DOWN")
            if time.monotonic() >= deadline:
                raise Unavailable(f"vallexd is still loading its model after {timeout:g} s; "
                                  "retry later or pass a longer --timeout", reason="MODEL_LOADING")
            if not told and on_wait is not None:
                on_wait()
                told = True
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


def _pending_refusal(sock: socket.socket) -> VallexError | None:
    """The error frame a daemon sent before hanging up (over its connection limits it answers
    BUSY at connect and closes, so our request then meets a broken pipe), or None."""
    try:
        sock.settimeout(1.0)
        message = protocol.recv_frame(sock, 1 << 20)
    except Exception:
        return None
    if isinstance(message, dict) and message.get("ok") is False and message.get("id") is None:
        return VallexError.from_wire(message.get("error"))
    return None


def ping(socket_path: Path, *, timeout: float = 2.0) -> dict[str, Any] | None:
    """The daemon's ping answer, or None when nothing answers (for start-up polling)."""
    try:
        with Client(socket_path, connect_timeout=timeout, timeout=timeout) as client:
            return client.ping()
    except VallexError:
        return None
