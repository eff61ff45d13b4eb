"""The Unix-socket wire format: length-prefixed msgpack frames.

Torch-free: the client imports it.  See docs/protocol.md for the full
description an app in any language can implement.

    frame    = length:uint32 big-endian, then `length` bytes of msgpack
    request  = {"v": 1, "id": <int|str>, "method": <str>, "params": <map>}
    response = {"v": 1, "id": ..., "ok": true,  "result": <map>}
             | {"v": 1, "id": ..., "ok": false, "error": {"code", "message", ["reason"], ["details"]}}
    event    = {"v": 1, "id": ..., "event": <str>, "data": <map>}   (zero or more before the response)

The reader checks the declared length *before* reading the body, so an
oversize or endless frame is refused without buffering it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack

from vallexd.errors import ProtocolError, TooLarge, VallexError, short_repr

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
#: Default cap on a request frame read by the daemon (preset .npz uploads fit easily).
DEFAULT_MAX_REQUEST_FRAME = 16 * 1024 * 1024
#: Deepest nesting of maps/arrays a request may have (requests need 2-3; the cap keeps every
#: later walk over untrusted values, e.g. building an error message, far from recursion limits).
MAX_NESTING = 32
#: Default cap on a response frame read by the client (long WAV results).
DEFAULT_MAX_RESPONSE_FRAME = 512 * 1024 * 1024


def pack(message: dict[str, Any]) -> bytes:
    """Encode one message as a complete frame."""
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> dict[str, Any]:
    """Decode a frame body; anything that is not a msgpack map is a protocol error."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types; their text is internal detail
        raise ProtocolError("malformed msgpack frame", reason="MALFORMED_FRAME") from None
    if not isinstance(message, dict):
        raise ProtocolError("a frame must hold a msgpack map", reason="MALFORMED_FRAME")
    if nesting_depth(message, MAX_NESTING) > MAX_NESTING:
        raise ProtocolError(f"a frame may nest maps and arrays at most {MAX_NESTING} deep",
                            reason="TOO_DEEP", details={"limit": MAX_NESTING})
    return message


def nesting_depth(value: Any, stop_after: int) -> int:
    """How deep maps/arrays nest in `value` (a scalar is 0), counted without recursion and
    giving up once past `stop_after` (the answer is then stop_after + 1)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        depth += 1
        if depth > stop_after:
            return depth
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list, tuple)))
    return deepest


def check_length(length: int, max_frame: int) -> None:
    if length > max_frame:
        raise TooLarge(
            f"frame of {length} bytes exceeds the limit of {max_frame} bytes",
            reason="FRAME_TOO_LARGE",
            details={"limit": max_frame, "length": length},
        )


async def read_frame(reader: asyncio.StreamReader, max_frame: int) -> dict[str, Any] | None:
    """Read one message; None on a clean end of stream between frames."""
    length = await read_frame_header(reader, max_frame)
    if length is None:
        return None
    return await read_frame_body(reader, length)


async def read_frame_header(reader: asyncio.StreamReader, max_frame: int) -> int | None:
    """The declared body length of the next frame (checked against `max_frame`); None on a
    clean end of stream. The body is not read: a server may refuse it first (e.g. BUSY)."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("connection closed inside a frame header", reason="TRUNCATED") from None
    (length,) = HEADER.unpack(header)
    check_length(length, max_frame)
    return int(length)


async def read_frame_body(reader: asyncio.StreamReader, length: int) -> dict[str, Any]:
    """Read and decode a frame body of `length` bytes (after `read_frame_header`)."""
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a frame body", reason="TRUNCATED") from None
    return unpack_body(body)


def recv_frame(sock: socket.socket, max_frame: int = DEFAULT_MAX_RESPONSE_FRAME) -> dict[str, Any] | None:
    """Blocking counterpart of `read_frame` for the client."""
    header = _recv_exactly(sock, HEADER.size, allow_eof=True)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    check_length(length, max_frame)
    body = _recv_exactly(sock, length, allow_eof=False)
    assert body is not None  # allow_eof=False never returns None
    return unpack_body(body)


def _recv_exactly(sock: socket.socket, n: int, *, allow_eof: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if allow_eof and not buf:
                return None
            raise ProtocolError("connection closed inside a frame", reason="TRUNCATED")
        buf += chunk
    return bytes(buf)


def request(request_id: int | str, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "method": method, "params": params or {}}


def ok(request_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error(request_id: Any, err: VallexError) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": err.to_wire()}


def event(request_id: Any, name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "event": name, "data": data}


def parse_request(message: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """Validate the envelope of a request; return (id, method, params)."""
    request_id = message.get("id")
    if not isinstance(request_id, (int, str)) or isinstance(request_id, bool):
        raise ProtocolError("request 'id' must be an integer or a string", reason="BAD_ENVELOPE")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {short_repr(version)}; this daemon speaks {PROTOCOL_VERSION}",
            reason="UNSUPPORTED_VERSION",
        )
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise ProtocolError("request 'method' must be a non-empty string", reason="BAD_ENVELOPE")
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError("request 'params' must be a map", reason="BAD_ENVELOPE")
    return request_id, method, params
