"""Hostile inputs for bench/reliability.py: seeded-random socket frames and HTTP bad-input cases.

Every generator takes a `random.Random`, so a run is reproducible from its seed.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from typing import Any

import msgpack
import numpy as np

from vallexd import protocol

_JUNK_VALUES: list[Any] = [
    None, True, False, 0, -1, 2**63, -(2**63), 2**64 - 1, 1.5, float("nan"), float("inf"), "", "x",
    "\x00", "\ud800".encode("utf-8", "surrogatepass"), b"", b"\xff" * 7, [], {}, [1, [2, [3]]],
    {"a": {"b": {"c": 1}}}, "ä" * 300, "../../etc/passwd", "[EN]", "😀" * 10, "\u0303",
]


def _nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _npz(arrays: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in arrays.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "<i8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def hostile_npz(rng: random.Random) -> bytes:
    """A prompt upload that is wrong in one of many ways (or, rarely, right)."""
    audio = rng.choice([_npy(np.zeros((1, 5, 8), np.int64)), _npy_header((1, 2**40, 8)),
                        _npy_header((2**62,)), _npy(np.full((1, 5, 8), 0.5)), _npy(np.zeros((1, 5, 8), "U1")),
                        _npy(np.zeros((1, 5, 7), np.int16)), b"\x93NUMPY\x01\x00garbage",
                        _npy(np.full((1, 5, 8), 4096))])
    text = rng.choice([_npy(np.zeros((1, 3), np.int64)), _npy_header((1, 2**50)), _npy(np.zeros(3))])
    lang = rng.choice([_npy(np.array(2)), _npy(np.array("2")), _npy(np.array([7])), _npy(np.array("en")),
                       _npy_header((2**45,), "<f8")])
    names = rng.choice([("audio_tokens.npy", "text_tokens.npy", "lang_code.npy"),
                        ("audio_tokens", "text_tokens", "lang_code"), ("a.npy", "b.npy", "c.npy")])
    data = _npz(dict(zip(names, (audio, text, lang), strict=True)))
    if rng.random() < 0.2:
        cut = rng.randrange(len(data))
        data = data[:cut] + bytes([rng.randrange(256)]) + data[cut + 1:]
    return data


def _params(rng: random.Random, method: str) -> Any:
    if rng.random() < 0.1:
        return rng.choice(_JUNK_VALUES)
    if method == "synthesize":
        params: dict[str, Any] = {"text": rng.choice(["Hi.", "", "   ", "\x07", "[ZH]你好[ZH]こんにちは",
                                                     "ä" * 5000, 5, None, "x" * 10])}
        for key in rng.sample(["voice", "language", "accent", "long", "seed", "top_k", "temperature",
                               "return", "progress", "fresh", "bogus"], rng.randint(0, 5)):
            params[key] = rng.choice([*_JUNK_VALUES, "en", "mix", "auto", "native", "path", "Tugão", ".."])
        # Always one field out of range: the fuzzer exercises validation, not the model.
        params["temperature"] = rng.choice([0.0, -1.0, 1e9, "hot", None, [1.0]])
        return params
    if method == "presets.install":
        return {"name": rng.choice(["voice", "Tugão", "../x", "", "a" * 300, 7]),
                "data": hostile_npz(rng) if rng.random() < 0.8 else rng.choice(_JUNK_VALUES),
                "overwrite": rng.choice([True, False, "yes"])}
    if method == "presets.remove":
        return {"name": rng.choice(["nobody", "Tuga\u0303o", "../../etc", "", None, "a\u200bb"])}
    if method == "cache.prune":
        return {"max_age_s": rng.choice([None, -1, 1e9, "x"]), "dry_run": True,
                "max_bytes": rng.choice([None, -5, "x", 2**64 - 1])}
    return rng.choice([{}, None, {"unexpected": 1}])


METHODS = ["ping", "status", "synthesize", "presets.list", "presets.install", "presets.remove",
           "cache.stats", "cache.prune", "no.such", "", "evil\nline", "x" * 200]


def fuzz_frame(rng: random.Random, index: int) -> tuple[bytes, bool]:
    """(bytes to send, whether the daemon should answer and keep the connection)."""
    kind = rng.random()
    if kind < 0.55:  # a map envelope, valid or subtly wrong
        method = rng.choice(METHODS)
        message: dict[Any, Any] = {"v": 1, "id": index, "method": method, "params": _params(rng, method)}
        if rng.random() < 0.3:
            field_name = rng.choice(["v", "id", "method", "params"])
            message[field_name] = rng.choice([*_JUNK_VALUES, _nested(rng.choice([30, 31, 32, 40, 400]))])
        if rng.random() < 0.05:
            message[rng.choice([1, b"k", "extra"])] = rng.choice(_JUNK_VALUES)
        body = msgpack.packb(message, use_bin_type=rng.random() < 0.9)
        return protocol.HEADER.pack(len(body)) + body, True
    if kind < 0.70:  # deep nesting (built by hand: msgpack's packer stops at 512 levels)
        depth = rng.choice([33, 100, 1000, 3000])
        body = (b"\x83" + msgpack.packb("v") + b"\x91" * depth + b"\x01" + msgpack.packb("id")
                + msgpack.packb(index) + msgpack.packb("method") + msgpack.packb("ping"))
        return protocol.HEADER.pack(len(body)) + body, False
    if kind < 0.85:  # garbage bytes as a body
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        return protocol.HEADER.pack(len(body)) + body, False
    if kind < 0.92:  # a non-map msgpack value
        body = msgpack.packb(rng.choice([[1, 2], "str", 5, None, b"bin"]))
        return protocol.HEADER.pack(len(body)) + body, False
    if kind < 0.97:  # declared length over the limit (the body is never sent)
        return protocol.HEADER.pack(rng.choice([2**31, 2**32 - 1, 17 * 2**20])), False
    # truncated frame: header promises more than is sent, then the client hangs up
    return protocol.HEADER.pack(100) + b"\x81", False


def http_cases() -> list[tuple[str, str, bytes, str]]:
    """(name, path, body, content type): every one a client mistake or an attack; none may be 500."""
    deep = b"[" * 100_000 + b"]" * 100_000
    cases: list[tuple[str, str, bytes, str]] = []
    for path in ("/generate", "/v1/synthesize"):
        cases += [
            ("deep JSON 1000", path, b"[" * 1000 + b"]" * 1000, "application/json"),
            ("deep JSON 100000", path, deep, "application/json"),
            ("deep object", path, b'{"a":' * 500 + b"1" + b"}" * 500, "application/json"),
            ("not JSON", path, b"{nope", "application/json"),
            ("invalid UTF-8", path, b'{"text": "\xff\xfe"}', "application/json"),
            ("lone surrogate", path, b'{"text": "\\ud800", "textPrompt": "\\ud800"}', "application/json"),
            ("form post", path, b"text=hi", "application/x-www-form-urlencoded"),
            ("array body", path, b"[1, 2]", "application/json"),
            ("null body", path, b"null", "application/json"),
            ("huge number", path, b'{"text": "hi", "textPrompt": "hi", "seed": 1e999}', "application/json"),
            ("wrong types", path, json.dumps({"text": 5, "textPrompt": 5, "language": []}).encode(),
             "application/json"),
            ("text too long", path, json.dumps({"text": "a" * 100_000, "textPrompt": "a" * 100_000}).encode(),
             "application/json"),
            ("control chars", path, json.dumps({"text": "a\x00b", "textPrompt": "a\x00b"}).encode(),
             "application/json"),
            ("mix untagged", path, json.dumps({"text": "[ZH]你好[ZH]こんにちは", "language": "mix",
                                              "textPrompt": "[ZH]你好[ZH]こんにちは"}).encode(),
             "application/json"),
            ("unknown voice", path, json.dumps({"text": "hi", "voice": "Nobody", "textPrompt": "hi",
                                               "character": "Nobody"}).encode(), "application/json"),
            ("path voice", path, json.dumps({"text": "hi", "voice": "../../x", "textPrompt": "hi",
                                            "character": "../../x"}).encode(), "application/json"),
            ("bad language", path,
             json.dumps({"text": "hi", "language": {"x": 1}, "textPrompt": "hi"}).encode(),
             "application/json"),
        ]
    cases.append(("unknown field on /v1", "/v1/synthesize", b'{"text": "hi", "requestTime": 1}',
                  "application/json"))
    return cases


RAW_HTTP = [
    ("garbage request line", b"GARBAGE\r\n\r\n"),
    ("negative Content-Length", b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
    ("request line too long", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"),
    ("header without colon", b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n"),
    ("bad chunked body", b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
]
