"""The Unix-socket RPC transport.

Part 1 runs `RpcServer` in-process over a real Unix socket with a scripted service
behind the `ServiceLike` interface, to pin down transport behaviour precisely
(disconnect → cancelled, progress events, limits, error mapping, drain).
Part 2 runs the real daemon (`python -m vallexd`) on the tiny checkpoints.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import struct
import time
import urllib.request
import wave
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, RpcClient, tree_snapshot

from vallexd import protocol
from vallexd.errors import InvalidArgument, VallexError
from vallexd.server.rpc import RpcServer
from vallexd.service.result import SynthesisResult

# --------------------------------------------------------------------------- part 1: in-process


class ScriptedService:
    """A service whose synthesize blocks until released or cancelled; records what it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.saw_cancel = asyncio.Event()
        self.calls: list[dict[str, Any]] = []

    async def synthesize(self, params: dict[str, Any], *, progress: Any = None,
                         cancelled: asyncio.Event | None = None) -> SynthesisResult:
        self.calls.append({"params": params, "progress": progress})
        if params.get("text") == "":
            raise InvalidArgument("text is empty", reason="EMPTY_TEXT")
        self.started.set()
        if progress is not None:
            progress(1, 2)
            progress(2, 2)
        assert cancelled is not None
        waits = [asyncio.ensure_future(self.release.wait()), asyncio.ensure_future(cancelled.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if cancelled.is_set():
            self.saw_cancel.set()
        # The text comes back as the cache key, so a test can tell which request was answered.
        return SynthesisResult(cache_key=str(params.get("text")), duration_s=0.0, sample_rate=24000,
                               cached=False, pieces=0)

    async def status(self) -> dict[str, Any]:
        return {"model_loaded": True}

    async def presets_list(self) -> dict[str, Any]:
        raise RuntimeError("secret detail /srv/internal/path")

    async def presets_install(self, params: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def presets_remove(self, params: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def cache_stats(self) -> dict[str, Any]:
        return {"files": 0, "bytes": 0}

    async def cache_prune(self, params: dict[str, Any]) -> dict[str, Any]:
        return {}


class AsyncClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> AsyncClient:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(protocol.pack(message))
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        return await asyncio.wait_for(protocol.read_frame(self.reader, 1 << 24), timeout)

    async def call(self, rid: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        await self.send(protocol.request(rid, method, params))
        frame = await self.recv()
        assert frame is not None
        return frame

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def rpc_server(tmp_path: Path):
    service = ScriptedService()
    server = RpcServer(service, max_frame=4096, max_connections=3, idle_timeout_s=1.0)
    path = tmp_path / "t.sock"
    await server.start(path=str(path))
    yield server, service, path
    await server.close()


async def test_error_mapping_and_connection_reuse(rpc_server, caplog) -> None:
    _server, _service, path = rpc_server
    c = await AsyncClient.connect(path)
    caplog.set_level(logging.DEBUG)
    # Unknown method and a bad envelope: typed errors, and the connection stays usable.
    r = await c.call(1, "no.such.method")
    assert (r["id"], r["ok"], r["error"]["code"]) == (1, False, "UNKNOWN_METHOD")
    await c.send({"v": 1, "id": 2, "method": 42})
    r = await c.recv()
    assert r is not None and r["id"] == 2 and r["error"]["code"] == "PROTOCOL_ERROR"
    await c.send({"v": 99, "id": 3, "method": "ping"})
    r = await c.recv()
    assert r is not None and r["error"]["reason"] == "UNSUPPORTED_VERSION"
    r = await c.call(4, "ping", {"unexpected": 1})
    assert r["error"]["code"] == "INVALID_ARGUMENT" and r["error"]["reason"] == "UNKNOWN_FIELD"
    # A service error keeps its code.
    r = await c.call(5, "synthesize", {"text": ""})
    assert r["error"] == {"code": "INVALID_ARGUMENT", "message": "text is empty", "reason": "EMPTY_TEXT"}
    # An unexpected exception becomes INTERNAL without internals; the log has the traceback.
    r = await c.call(6, "presets.list")
    assert r["error"]["code"] == "INTERNAL"
    assert "secret" not in r["error"]["message"]
    assert any("secret detail" in (rec.exc_text or "") or rec.exc_info for rec in caplog.records
               if rec.name == "vallexd.server")
    r = await c.call(7, "ping")
    assert r["ok"] and r["result"]["pong"] is True
    r = await c.call(8, "evil\nINFO forged log line")
    assert r["error"]["code"] == "UNKNOWN_METHOD"
    # One access-log line per request, with the peer's credentials from SO_PEERCRED.
    records = [rec for rec in caplog.records if rec.name == "vallexd.access"]
    lines = [rec.getMessage() for rec in records]
    assert len(lines) == 8
    # A successful ping (a liveness probe, polled) is DEBUG; every other line, failed pings too, INFO.
    assert [rec.levelno for rec in records] == [logging.INFO] * 6 + [logging.DEBUG, logging.INFO]
    assert f"uid={os.getuid()} pid={os.getpid()}" in lines[6]
    assert "method=presets.list" in lines[5] and "error=INTERNAL" in lines[5]
    assert "\n" not in lines[7] and "evil\\n" in lines[7]  # client text cannot forge log lines
    c.close()


async def test_broken_frames_close_the_connection(rpc_server) -> None:
    _server, _service, path = rpc_server
    # Malformed msgpack body.
    c = await AsyncClient.connect(path)
    body = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    c.writer.write(struct.pack(">I", len(body)) + body)
    r = await c.recv()
    assert r is not None and r["id"] is None and r["error"]["code"] == "PROTOCOL_ERROR"
    assert await c.recv() is None  # closed
    # A frame over the limit is refused from its header alone (the body is never sent).
    c = await AsyncClient.connect(path)
    c.writer.write(struct.pack(">I", 1 << 30))
    r = await c.recv()
    assert r is not None and r["id"] is None and r["error"]["code"] == "TOO_LARGE"
    assert await c.recv() is None
    # Not a map.
    c = await AsyncClient.connect(path)
    body = protocol.msgpack.packb([1, 2, 3])
    c.writer.write(struct.pack(">I", len(body)) + body)
    r = await c.recv()
    assert r is not None and r["error"]["code"] == "PROTOCOL_ERROR"
    assert await c.recv() is None


async def test_disconnect_mid_request_sets_cancelled(rpc_server) -> None:
    server, service, path = rpc_server
    c = await AsyncClient.connect(path)
    await c.send(protocol.request(1, "synthesize", {"text": "long job"}))
    await asyncio.wait_for(service.started.wait(), 5)
    assert server.gate.in_flight == 1
    c.writer.close()  # hang up while the job runs
    await asyncio.wait_for(service.saw_cancel.wait(), 5)
    for _ in range(50):
        if server.gate.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert server.gate.in_flight == 0


async def test_progress_events_only_when_asked(rpc_server) -> None:
    _server, service, path = rpc_server
    service.release.set()
    c = await AsyncClient.connect(path)
    await c.send(protocol.request("a", "synthesize", {"text": "x", "progress": True}))
    frames = [await c.recv(), await c.recv(), await c.recv()]
    assert [f.get("event") for f in frames if f] == ["progress", "progress", None]
    assert frames[0] == {"v": 1, "id": "a", "event": "progress", "data": {"done": 1, "total": 2}}
    assert frames[2] is not None and frames[2]["ok"] and frames[2]["id"] == "a"
    r = await c.call(2, "synthesize", {"text": "y"})
    assert r["ok"] and service.calls[-1]["progress"] is None
    c.close()


async def test_connection_limit_and_idle_timeout(rpc_server) -> None:
    _server, _service, path = rpc_server
    clients = [await AsyncClient.connect(path) for _ in range(3)]
    for i, c in enumerate(clients):
        assert (await c.call(i, "ping"))["ok"]
    extra = await AsyncClient.connect(path)
    r = await extra.recv()
    assert r is not None and r["error"]["code"] == "BUSY" and r["error"]["reason"] == "TOO_MANY_CONNECTIONS"
    assert await extra.recv() is None
    # Idle connections are closed after idle_timeout_s (1 s here), freeing the slots.
    started = time.monotonic()
    assert await clients[0].recv(timeout=5) is None
    assert 0.5 < time.monotonic() - started < 3
    late = await AsyncClient.connect(path)
    assert (await late.call(9, "ping"))["ok"]
    late.close()


async def test_drain_lets_the_running_request_finish(rpc_server) -> None:
    server, service, path = rpc_server
    c = await AsyncClient.connect(path)
    await c.send(protocol.request(1, "synthesize", {"text": "in flight"}))
    await asyncio.wait_for(service.started.wait(), 5)
    server.stop_accepting()
    with pytest.raises(OSError):
        await AsyncClient.connect(path)  # listener closed: nobody new gets in
    assert not await server.wait_idle(0.2)
    service.release.set()
    r = await c.recv()
    assert r is not None and r["ok"] and r["result"]["cache_key"] == "in flight"
    assert await server.wait_idle(2)
    assert await c.recv() is None  # closed after its response during drain


# --------------------------------------------------------------------------- part 2: the real daemon


@pytest.fixture(scope="module")
def daemon(daemon_factory):
    return daemon_factory("rpc", ["--max-text-chars", "2000", "--threads", "1"])


def wav_info(data: bytes) -> tuple[int, int, int]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), w.getnchannels(), w.getnframes()


def test_synthesize_cache_hit_and_static_url(daemon: DaemonProcess) -> None:
    params = {"text": "hi", "language": "en", "seed": 7}
    runs_before = daemon.call("status")["counters"]["engine_runs"]
    first = daemon.call("synthesize", params)
    assert first["cached"] is False
    rate, channels, frames = wav_info(first["audio"])
    assert (rate, channels) == (24000, 1) and frames > 0 and frames % 320 == 0
    second = daemon.call("synthesize", params)
    assert second["cached"] is True and second["audio"] == first["audio"]
    assert second["cache_key"] == first["cache_key"]
    # The cache hit never reached the model: one engine run for two requests, and the log says so.
    assert daemon.call("status")["counters"]["engine_runs"] == runs_before + 1
    daemon.wait_log(r"method=synthesize .* cached=hit ok")
    # The file is in the cache folder and the child server hands out the same bytes.
    path = Path(first["path"])
    assert path.resolve().is_relative_to(daemon.cache_dir.resolve())
    with urllib.request.urlopen(first["url"], timeout=10) as resp:
        assert resp.headers["Content-Type"] == "audio/wav"
        assert resp.read() == first["audio"]
    by_path = daemon.call("synthesize", {**params, "return": "path"})
    assert "audio" not in by_path and by_path["path"] == first["path"]


def test_progress_events_from_the_daemon(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        events, response = c.request("synthesize", {"text": "ok", "language": "en", "seed": 1,
                                                    "progress": True, "return": "path"})
    assert response["ok"], response
    assert events and all(e["event"] == "progress" for e in events)
    last = events[-1]["data"]
    assert last["done"] == last["total"] >= 1


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("unknown method", "nope", {}, "UNKNOWN_METHOD"),
    ("text not a string", "synthesize", {"text": 123}, "INVALID_ARGUMENT"),
    ("seed as string", "synthesize", {"text": "a", "seed": "1"}, "INVALID_ARGUMENT"),
    ("bool as int", "synthesize", {"text": "a", "top_k": True}, "INVALID_ARGUMENT"),
    ("temperature zero", "synthesize", {"text": "a", "temperature": 0}, "INVALID_ARGUMENT"),
    ("unknown field", "synthesize", {"text": "a", "pitch": 2}, "INVALID_ARGUMENT"),
    ("language", "synthesize", {"text": "a", "language": "xx"}, "INVALID_ARGUMENT"),
    ("voice traversal", "synthesize", {"text": "a", "voice": "../../etc/passwd"}, "INVALID_ARGUMENT"),
    ("voice with slash", "synthesize", {"text": "a", "voice": "a/b"}, "INVALID_ARGUMENT"),
    ("voice empty", "synthesize", {"text": "a", "voice": ""}, "INVALID_ARGUMENT"),
    ("voice very long", "synthesize", {"text": "a", "voice": "v" * 500}, "INVALID_ARGUMENT"),
    ("unknown voice", "synthesize", {"text": "a", "voice": "nobody"}, "NOT_FOUND"),
    ("text with NUL", "synthesize", {"text": "a\x00b"}, "INVALID_ARGUMENT"),
    ("text 100 kB", "synthesize", {"text": "a" * 100_000}, "TOO_LARGE"),
    ("install traversal", "presets.install", {"name": "../../etc/passwd", "data": b"x"}, "INVALID_ARGUMENT"),
    ("install slash", "presets.install", {"name": "a/b", "data": b"x"}, "INVALID_ARGUMENT"),
    ("install garbage", "presets.install", {"name": "junk", "data": b"not an npz"}, "INVALID_ARGUMENT"),
    ("remove traversal", "presets.remove", {"name": "../cache"}, "INVALID_ARGUMENT"),
    ("remove empty", "presets.remove", {"name": ""}, "INVALID_ARGUMENT"),
    ("prune negative", "cache.prune", {"max_age_s": -1}, "INVALID_ARGUMENT"),
]


def test_bad_input_gets_typed_errors_and_changes_nothing(daemon: DaemonProcess) -> None:
    root = daemon.workdir.parent
    before = tree_snapshot(root, exclude=[daemon.cache_dir, daemon.log_path])
    cache_before = tree_snapshot(daemon.cache_dir)
    with daemon.client() as c:
        for label, method, params, code in BAD_REQUESTS:
            _, response = c.request(method, params)
            assert not response["ok"], label
            assert response["error"]["code"] == code, (label, response["error"])
            assert response["error"]["message"], label
            assert c.call("ping")["pong"], label  # same connection still served
    # Framing errors: answered with id null, then the connection is closed; the daemon lives on.
    with RpcClient(daemon.socket_path) as c:
        c.send_raw(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        r = c.recv()
        assert r is not None and r["id"] is None and r["error"]["code"] == "PROTOCOL_ERROR"
        assert c.recv() is None
    with RpcClient(daemon.socket_path) as c:
        c.send_raw(struct.pack(">I", 64 * 1024 * 1024))
        r = c.recv()
        assert r is not None and r["id"] is None and r["error"]["code"] == "TOO_LARGE"
        assert c.recv() is None
    assert daemon.call("ping")["pong"]
    assert tree_snapshot(root, exclude=[daemon.cache_dir, daemon.log_path]) == before
    assert tree_snapshot(daemon.cache_dir) == cache_before


def test_path_like_text_stays_in_the_cache(daemon: DaemonProcess) -> None:
    """Text is content, never a path: `/` and `..` synthesise normally into the cache."""
    root = daemon.workdir.parent
    before = tree_snapshot(root, exclude=[daemon.cache_dir, daemon.log_path])
    for text in ("../x", "a/b", "/etc"):
        result = daemon.call("synthesize", {"text": text, "language": "en", "seed": 3, "return": "path"})
        assert Path(result["path"]).resolve().parent.parent == daemon.cache_dir.resolve()
        assert text not in result["path"]
    assert tree_snapshot(root, exclude=[daemon.cache_dir, daemon.log_path]) == before


def test_peer_credentials_logged(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        c.call("status")
    daemon.wait_log(rf"method=status peer uid={os.getuid()} pid={os.getpid()} \d+ms cached=- ok")


def test_client_hangup_mid_synthesis_keeps_daemon_healthy(daemon: DaemonProcess) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket_path))
    # ~300 phonemes: seconds of AR steps even on the tiny model, so the hang-up lands mid-job.
    text = "bye " * 100
    sock.sendall(protocol.pack(protocol.request(1, "synthesize", {"text": text, "language": "en"})))
    time.sleep(0.3)
    sock.close()
    started = time.monotonic()
    assert daemon.call("ping")["pong"]
    # The abandoned job is dropped, not computed to the end: a new synthesis is served promptly.
    result = daemon.call("synthesize", {"text": "hi", "language": "en", "seed": 11, "return": "path"})
    assert result["cached"] is False
    assert time.monotonic() - started < 30
    daemon.wait_log(r"method=synthesize .* error=TIMEOUT/CANCELLED")


def test_errors_are_vallex_errors_client_side(daemon: DaemonProcess) -> None:
    with pytest.raises(VallexError) as info:
        daemon.call("synthesize", {"text": "a", "voice": "nobody"})
    assert info.value.code.value == "NOT_FOUND"


async def test_pipelined_request_during_drain_gets_shutting_down(rpc_server) -> None:
    server, service, path = rpc_server
    c = await AsyncClient.connect(path)
    await c.send(protocol.request(1, "synthesize", {"text": "in flight"}))
    await asyncio.wait_for(service.started.wait(), 5)
    await c.send(protocol.request(2, "ping"))  # pipelined: read ahead while 1 runs
    await asyncio.sleep(0.1)
    server.stop_accepting()
    service.release.set()
    r = await c.recv()
    assert r is not None and r["id"] == 1 and r["ok"]
    r = await c.recv()
    assert r is not None and r["id"] == 2 and r["error"]["code"] == "UNAVAILABLE"
    assert r["error"]["reason"] == "SHUTTING_DOWN"
    assert await c.recv() is None


async def test_malformed_frame_message_is_fixed() -> None:
    with pytest.raises(VallexError) as info:
        protocol.unpack_body(b"\xc1\xc1\xc1")
    assert info.value.message == "malformed msgpack frame" and info.value.reason == "MALFORMED_FRAME"


def test_status_reports_the_configured_thread_count(daemon: DaemonProcess) -> None:
    status = daemon.call("status")
    assert status["threads"] == 1  # --threads 1 reached torch in the model thread
    assert status["nar_thread"] is False  # --nar-thread auto: one thread is not shared
    assert status["device"] == "cpu" and status["dtype"] == "float32"
