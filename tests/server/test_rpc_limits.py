"""Socket transport limits of issue 12 (faults 6 and 9), in-process over real Unix sockets:
deep nesting is a typed PROTOCOL_ERROR, a uid gets at most its share of connection slots,
big frames share one byte budget (BUSY without reading the body), error logs are bounded."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from vallexd import protocol
from vallexd.errors import ProtocolError, short_repr
from vallexd.server.limits import SMALL_FRAME
from vallexd.server.rpc import RpcServer


class IdleService:
    """Only what ping and a refused request need (the transport is under test)."""

    async def status(self) -> dict[str, Any]:
        return {}


async def connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


async def ping(path: Path, rid: int = 1) -> dict[str, Any]:
    reader, writer = await connect(path)
    try:
        writer.write(protocol.pack(protocol.request(rid, "ping")))
        await writer.drain()
        reply = await asyncio.wait_for(protocol.read_frame(reader, 1 << 20), 5)
        assert reply is not None
        return reply
    finally:
        writer.close()


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_depth_and_short_repr_never_recurse() -> None:
    body = msgpack.packb({"v": nested(1000), "id": 1, "method": "ping"})
    with pytest.raises(ProtocolError) as info:
        protocol.unpack_body(body)
    assert info.value.reason == "TOO_DEEP"
    assert protocol.nesting_depth(nested(10), 32) == 10
    assert protocol.nesting_depth({"a": [{"b": 1}]}, 32) == 3
    assert protocol.nesting_depth(nested(100_000), 32) == 33  # gives up early, no recursion
    # a value within the limit still gets a bounded message (was a RecursionError → INTERNAL)
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request({"v": nested(30), "id": 1, "method": "ping"})
    assert info.value.reason == "UNSUPPORTED_VERSION" and len(info.value.message) < 120
    assert len(short_repr("x" * 10_000_000)) <= 60 and short_repr(nested(5000)).startswith("[[")


@pytest.fixture
async def server(tmp_path: Path):
    srv = RpcServer(IdleService(), max_frame=1 << 22, max_connections=6, idle_timeout_s=30.0,
                    frame_budget=SMALL_FRAME * 4, exempt_uids=frozenset())  # root is not exempt here
    path = tmp_path / "t.sock"
    await srv.start(path=str(path))
    yield srv, path
    await srv.close()


async def test_deeply_nested_frame_is_protocol_error_not_internal(server: Any, caplog: Any) -> None:
    _srv, path = server
    caplog.set_level(logging.INFO)
    reader, writer = await connect(path)
    writer.write(protocol.HEADER.pack(len(b := msgpack.packb({"v": nested(1000), "id": 1}))) + b)
    await writer.drain()
    reply = await asyncio.wait_for(protocol.read_frame(reader, 1 << 20), 5)
    assert reply is not None and reply["error"]["code"] == "PROTOCOL_ERROR"
    assert reply["error"]["reason"] == "TOO_DEEP"
    writer.close()
    assert not [r for r in caplog.records if r.exc_info]  # no traceback in the log
    assert (await ping(path))["ok"]


async def test_one_uid_gets_half_the_slots(server: Any) -> None:
    srv, path = server
    held = [await connect(path) for _ in range(3)]  # 3 = half of 6
    await asyncio.sleep(0.05)
    reply = await ping(path)
    assert reply["ok"] is False and reply["error"]["code"] == "BUSY"
    assert reply["error"]["reason"] == "TOO_MANY_CONNECTIONS_FOR_USER"
    assert srv.shares.count(os.getuid()) == 3
    # another user still gets in while this one holds its share (needs root to become "nobody")
    if os.getuid() == 0:
        assert await asyncio.to_thread(ping_as_nobody, path) == "ok"
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    assert (await ping(path))["ok"] is True
    for _ in range(100):  # the server notices the closed connections
        if srv.shares.count(os.getuid()) == 0:
            break
        await asyncio.sleep(0.02)
    assert srv.shares.count(os.getuid()) == 0


def ping_as_nobody(path: Path) -> str:
    """Ping from a child process running as uid 65534, through a world-reachable socket link."""
    folder = tempfile.mkdtemp(prefix="vallexd-share-")
    os.chmod(folder, 0o755)
    os.chmod(path, 0o777)
    link = Path(folder) / "s.sock"
    # A Unix socket is reached through its path: the nobody user needs every folder on it.
    link.symlink_to(path)
    for parent in path.parents:
        if parent == Path("/"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o011)
    code = (
        "import os,socket,struct,msgpack,sys;os.setgid(65534);os.setuid(65534);"
        "s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
        "b=msgpack.packb({'v':1,'id':1,'method':'ping','params':{}});s.sendall(struct.pack('>I',len(b))+b);"
        "n=struct.unpack('>I',s.recv(4))[0];r=msgpack.unpackb(s.recv(n));"
        "print('ok' if r['ok'] else r['error'])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(link)], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or out.stderr.strip()[-300:]


async def test_big_frames_share_one_budget_and_pings_still_pass(server: Any) -> None:
    srv, path = server
    big = SMALL_FRAME * 3  # the budget is 4 small frames: one big frame fits, a second does not
    _first_reader, first = await connect(path)
    first.write(protocol.HEADER.pack(big) + b"\0" * 100)  # declared, body still coming
    await first.drain()
    await asyncio.sleep(0.1)
    assert srv.frame_budget.used == big
    reader, writer = await connect(path)
    writer.write(protocol.HEADER.pack(big))  # the body is never sent: it must not be awaited
    await writer.drain()
    reply = await asyncio.wait_for(protocol.read_frame(reader, 1 << 20), 5)
    assert reply is not None and reply["error"]["code"] == "BUSY"
    assert reply["error"]["reason"] == "FRAME_BUDGET"
    writer.close()
    assert (await ping(path))["ok"] is True  # small frames are never refused by the budget
    first.close()
    await asyncio.sleep(0.1)
    assert srv.frame_budget.used == 0  # given back when the connection went away mid-body


async def test_error_log_lines_are_bounded_per_connection(server: Any, caplog: Any) -> None:
    _srv, path = server
    caplog.set_level(logging.INFO, logger="vallexd.access")
    reader, writer = await connect(path)
    for rid in range(200):  # a client sending bad requests in a loop
        writer.write(protocol.pack({"v": 1, "id": rid, "method": 42}))
    await writer.drain()
    for _ in range(200):
        reply = await asyncio.wait_for(protocol.read_frame(reader, 1 << 20), 5)
        assert reply is not None and reply["error"]["code"] == "PROTOCOL_ERROR"
    writer.close()
    await asyncio.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "vallexd.access"]
    assert 20 <= len(lines) <= 25, len(lines)
    assert "left out" in lines[-1]


def test_peer_header_helpers_roundtrip() -> None:
    # The client's blocking reader and the server's split reader agree on the frame layout.
    a, b = socket.socketpair()
    try:
        a.sendall(protocol.pack(protocol.request(1, "ping")))
        assert protocol.recv_frame(b)["method"] == "ping"
        assert struct.calcsize(">I") == protocol.HEADER.size
    finally:
        a.close()
        b.close()


async def test_vallexctl_client_reports_busy_not_unreachable(server: Any) -> None:
    """Over its share the daemon answers BUSY at connect and hangs up; the client's request then
    meets a broken pipe: it must report the daemon's BUSY, not "daemon unreachable"."""
    from vallexctl.client import Client
    from vallexd.errors import VallexError

    _srv, path = server
    held = [await connect(path) for _ in range(3)]
    await asyncio.sleep(0.05)

    def call() -> VallexError:
        with Client(path, connect_timeout=5, timeout=5) as client:
            client.connect()
            time.sleep(0.2)  # the BUSY frame and the hang-up arrive before we send
            try:
                client.call("ping")
            except VallexError as exc:
                return exc
        raise AssertionError("ping over the share succeeded")

    err = await asyncio.to_thread(call)
    assert err.code.value == "BUSY" and err.reason == "TOO_MANY_CONNECTIONS_FOR_USER", err
    for _, writer in held:
        writer.close()
