"""The HTTP API of a real daemon on the tiny checkpoints, over real loopback HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_harness import DaemonProcess, tree_snapshot

from vallexd.errors import InvalidArgument
from vallexd.server.http_api import map_old_request
from vallexd.storage.prompts import Prompt, save_prompt

TOKEN = "s3cret-token"
ALLOWED_ORIGIN = "http://app.example"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, daemon_factory):
    workdir = tmp_path_factory.mktemp("http") / "d"
    presets = workdir / "presets"
    presets.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # A short prompt keeps the tiny model fast; the apostrophe is a legal preset name character.
    for name in ("Mika", "Y'shtola"):
        save_prompt(Prompt(rng.integers(0, 1024, (1, 6, 8)), np.array([[5, 6, 7, 8]]), "ja"),
                    presets / f"{name}.npz")
    return daemon_factory("http", [
        "--http-port", "0", "--http-token", TOKEN, "--cors-origin", ALLOWED_ORIGIN,
        "--http-max-body", str(MAX_BODY),
    ], workdir=workdir)


def http(daemon: DaemonProcess, method: str, path: str, body: Any = None, *, token: str | None = TOKEN,
         headers: dict[str, str] | None = None,
         raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    assert daemon.http_url is not None
    url = daemon.http_url + path
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def port(daemon: DaemonProcess) -> str:
    assert daemon.http_url is not None
    return daemon.http_url.rsplit(":", 1)[1]


def test_health_and_presets(daemon: DaemonProcess) -> None:
    status, _, body = http(daemon, "GET", "/health", token=None)  # health needs no token
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = http(daemon, "GET", "/presets")
    assert status == 200
    names = {p["name"] for p in json.loads(body)["presets"]}
    assert names == {"Mika", "Y'shtola"}
    status, _, body = http(daemon, "GET", "/status")
    assert status == 200 and json.loads(body)["model_loaded"] is True


def test_old_api_generate_downloads(daemon: DaemonProcess) -> None:
    status, headers, body = http(daemon, "POST", "/generate", {
        "textPrompt": "こんにちは", "character": "Mika", "language": "日本語", "noaccent": True,
        "longprompt": False,
    })
    reply = json.loads(body)
    # The old server's types (issue 12, fault 10): code a string, null where it does not apply.
    assert status == 200 and reply["code"] == "200" and reply["error"] is None, reply
    with urllib.request.urlopen(reply["audioURL"], timeout=10) as resp:
        wav = resp.read()
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    key = headers["X-Vallexd-Cache-Key"]
    assert (daemon.cache_dir / key[:2] / f"{key}.wav").read_bytes() == wav
    # The same request again is a cache hit with the same URL.
    status, headers, body = http(daemon, "POST", "/generate", {
        "textPrompt": "こんにちは", "character": "Mika", "language": "日本語", "noaccent": True,
        "longprompt": False,
    })
    assert status == 200 and headers["X-Vallexd-Cache"] == "hit"
    assert json.loads(body)["audioURL"] == reply["audioURL"]


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"textPrompt": "hi", "character": "Nobody", "language": "English"}, 404, "Character not found"),
    ({"textPrompt": "hi", "language": "Klingon"}, 400, None),
    ({"textPrompt": "hi", "language": 7}, 400, None),
    ({"character": "Mika"}, 400, None),
    ({"textPrompt": "hi", "noaccent": "yes"}, 400, None),
    ({"textPrompt": 5}, 400, None),
    ({"textPrompt": "a" * 6000}, 413, None),
    ([1, 2], 400, None),
])
def test_old_api_errors(daemon: DaemonProcess, body: Any, status: int, error: str | None) -> None:
    got, _, raw = http(daemon, "POST", "/generate", body)
    reply = json.loads(raw)
    assert got == status and reply["code"] == str(status) and reply["audioURL"] is None
    assert reply["error"]
    if error is not None:
        assert reply["error"] == error


def test_old_api_ignores_unknown_fields_but_v1_refuses_them(daemon: DaemonProcess) -> None:
    # The old server (pydantic defaults) ignored them; its later clients send e.g. a request time.
    status, _, body = http(daemon, "POST", "/generate", {"textPrompt": "hi", "language": "English",
                                                         "requestTime": 1700000000, "extra": [1]})
    reply = json.loads(body)
    assert status == 200 and reply["code"] == "200" and reply["error"] is None and reply["audioURL"]
    status, _, body = http(daemon, "POST", "/v1/synthesize", {"text": "hi", "requestTime": 1})
    assert status == 400 and json.loads(body)["error"]["reason"] == "UNKNOWN_FIELD"


def test_old_api_language_names() -> None:
    for name, code in [("English", "en"), ("ENGLISH", "en"), ("中文", "zh"), ("日本語", "ja"), ("Mix", "mix"),
                       ("auto", "auto"), ("ja", "ja")]:
        assert map_old_request({"textPrompt": "x", "language": name})["language"] == code
    params = map_old_request({"textPrompt": "x", "character": "Y'shtola", "noaccent": False,
                              "longprompt": True})
    assert params == {"text": "x", "voice": "Y'shtola", "accent": "request", "long": True,
                      "long_mode": "sliding", "return": "path"}  # what the reference ran for longprompt
    with pytest.raises(InvalidArgument):
        map_old_request({"textPrompt": "x", "language": "fr"})


def test_v1_synthesize(daemon: DaemonProcess) -> None:
    status, headers, body = http(daemon, "POST", "/v1/synthesize",
                                 {"text": "hi", "language": "en", "seed": 5, "voice": "Y'shtola"})
    assert status == 200 and headers["Content-Type"] == "audio/wav" and body[:4] == b"RIFF"
    audio = body
    status, headers, body = http(daemon, "POST", "/v1/synthesize", {
        "text": "hi", "language": "en", "seed": 5, "voice": "Y'shtola", "return": "path"})
    result = json.loads(body)
    assert status == 200 and result["cached"] is True and "audio" not in result
    assert headers["X-Vallexd-Cache"] == "hit"
    assert Path(result["path"]).read_bytes() == audio
    status, _, body = http(daemon, "POST", "/v1/synthesize", {"text": "hi", "voice": "../../etc/passwd"})
    assert status == 400 and json.loads(body)["error"]["reason"] == "BAD_NAME"
    status, _, body = http(daemon, "POST", "/v1/synthesize", {"text": "hi", "voice": "Nobody"})
    assert status == 404 and json.loads(body)["error"]["code"] == "NOT_FOUND"
    status, _, body = http(daemon, "POST", "/v1/synthesize", raw=b"{not json")
    assert status == 400 and json.loads(body)["error"]["reason"] == "BAD_JSON"


def test_body_limit(daemon: DaemonProcess) -> None:
    before = tree_snapshot(daemon.workdir, exclude=[daemon.log_path])
    status, _, body = http(daemon, "POST", "/v1/synthesize", raw=b"{" + b" " * (MAX_BODY + 10) + b"}")
    assert status == 413 and json.loads(body)["error"]["code"] == "TOO_LARGE"
    assert tree_snapshot(daemon.workdir, exclude=[daemon.log_path]) == before


def test_token_required(daemon: DaemonProcess) -> None:
    for token in (None, "wrong"):
        status, headers, body = http(daemon, "POST", "/generate", {"textPrompt": "hi"}, token=token)
        assert status == 401 and json.loads(body)["code"] == "401"
        assert headers.get("WWW-Authenticate") == "Bearer"
        status, _, body = http(daemon, "GET", "/status", token=token)
        assert status == 401 and json.loads(body)["error"]["code"] == "UNAUTHENTICATED"


def test_host_header_checked_on_loopback(daemon: DaemonProcess) -> None:
    p = port(daemon)
    for host in (f"evil.example:{p}", "127.0.0.1", f"localhost.evil.example:{p}", "127.0.0.1:1"):
        status, _, body = http(daemon, "GET", "/health", headers={"Host": host})
        assert status == 403, host
        assert json.loads(body)["error"]["code"] == "PERMISSION_DENIED"
    for host in (f"localhost:{p}", f"127.0.0.1:{p}", f"LOCALHOST:{p}"):
        assert http(daemon, "GET", "/health", headers={"Host": host})[0] == 200, host


def test_cors_only_for_allowed_origins(daemon: DaemonProcess) -> None:
    status, headers, body = http(daemon, "GET", "/presets", headers={"Origin": "http://evil.example"})
    assert status == 403 and not any(k.lower().startswith("access-control") for k in headers)
    assert json.loads(body)["error"]["reason"] == "BAD_ORIGIN"
    status, headers, _ = http(daemon, "GET", "/presets", headers={"Origin": ALLOWED_ORIGIN})
    assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    status, headers, _ = http(daemon, "OPTIONS", "/generate", token=None,
                              headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"})
    assert status == 204 and "Authorization" in headers["Access-Control-Allow-Headers"]
    status, headers, _ = http(daemon, "OPTIONS", "/generate", token=None, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers


def test_unknown_route(daemon: DaemonProcess) -> None:
    status, _, body = http(daemon, "GET", "/../../etc/passwd")
    assert status == 404 and json.loads(body)["error"]["code"] == "NOT_FOUND"
    status, headers, body = http(daemon, "GET", "/generate")
    assert status == 405 and "POST" in headers["Allow"]
    assert json.loads(body)["code"] == "405"  # /generate answers in the old API's shape
    status, headers, body = http(daemon, "DELETE", "/presets")
    assert status == 405 and json.loads(body)["error"]["reason"] == "METHOD_NOT_ALLOWED"


def test_client_hangup_cancels_the_job(daemon: DaemonProcess) -> None:
    import socket
    import time

    host, p = "127.0.0.1", int(port(daemon))
    body = json.dumps({"text": "goodbye " * 60, "language": "en", "seed": 9}).encode()
    errors_before = daemon.call("status")["counters"]["errors"]
    with socket.create_connection((host, p)) as s:
        s.sendall(b"POST /v1/synthesize HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (p, TOKEN.encode(), len(body), body))
        time.sleep(0.5)
    daemon.wait_log(r"http POST /v1/synthesize peer 127.0.0.1 client went away")
    # The service saw the job end as cancelled (counted as an error), not run to completion.
    deadline = time.monotonic() + 20
    while daemon.call("status")["counters"]["errors"] == errors_before:
        assert time.monotonic() < deadline, "the abandoned synthesis was not cancelled"
        time.sleep(0.05)


def test_foreign_origin_refused_before_anything_runs(daemon: DaemonProcess) -> None:
    """CSRF: a page elsewhere can POST without a preflight; the Origin header gives it away."""
    before = tree_snapshot(daemon.workdir, exclude=[daemon.log_path])
    status, _, body = http(daemon, "POST", "/generate", {"textPrompt": "csrf"},
                           headers={"Origin": "http://evil.example"})
    reply = json.loads(body)
    assert status == 403 and reply["error"] and set(reply) == {"audioURL", "code", "error"}
    assert reply["audioURL"] is None and reply["code"] == "403"
    status, _, body = http(daemon, "POST", "/v1/synthesize", {"text": "csrf"}, headers={"Origin": "null"})
    assert status == 403 and json.loads(body)["error"]["reason"] == "BAD_ORIGIN"
    assert tree_snapshot(daemon.workdir, exclude=[daemon.log_path]) == before


def test_post_needs_json_content_type(daemon: DaemonProcess) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        status, _, body = http(daemon, "POST", "/v1/synthesize", {"text": "hi"},
                               headers={"Content-Type": content_type})
        assert status == 400 and json.loads(body)["error"]["reason"] == "BAD_CONTENT_TYPE", content_type
    status, _, body = http(daemon, "POST", "/generate", {"textPrompt": "hi"},
                           headers={"Content-Type": "text/plain"})
    assert status == 400 and json.loads(body)["code"] == "400"


def test_non_ascii_token_is_401(daemon: DaemonProcess) -> None:
    import socket

    host, p = "127.0.0.1", int(port(daemon))
    for token in ("tökén".encode(), b"\xff\xfe"):
        with socket.create_connection((host, p), timeout=10) as s:
            s.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
                      b"Connection: close\r\n\r\n" % (p, token))
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 401"), reply[:100]
