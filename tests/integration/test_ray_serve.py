"""vallexd on Ray Serve (`vallexd-ray`, a real local Ray instance started by the test) against a
real daemon on the same tiny weights: every route answers byte for byte as the daemon does, a
cache entry one replica made is a hit on the other, a voice created through the ingress speaks on
both replicas, a replica killed (SIGKILL) mid-request gives its client UNAVAILABLE while the next
request succeeds, and the OpenAI SDK tests of test_openai_api.py pass against the ingress.

Two replicas with half a CPU each and max_batch 1 (so Ray's router sends a request to a replica
that is not busy: that is how the kill test knows where its request runs).  If Ray is not
installed or cannot start here, every test skips and says why.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from daemon_harness import DaemonProcess, daemon_env, pid_alive
from voice_samples import tone

from vallexd.storage.prompts import Prompt, save_prompt

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[test]' has it)")
openai = pytest.importorskip("openai")

# The SDK tests of the ecosystem issue, collected here again with this module's `daemon` (the
# reference daemon, for expected durations) and `client` (pointed at the Ray ingress).
from test_openai_api import (  # noqa: E402
    PRESET,
    TOKEN,
    test_default_format_is_mp3_and_aliases_resolve,
    test_every_format_decodes_to_the_wav_duration,
    test_models_and_voices,
    test_sdk_exceptions,
    test_speed_two_halves_the_duration,
)

SDK_TESTS = (test_every_format_decodes_to_the_wav_duration, test_default_format_is_mp3_and_aliases_resolve,
             test_speed_two_halves_the_duration, test_sdk_exceptions, test_models_and_voices)
ARGS = ["--http-port", "0", "--http-token", TOKEN, "--threads", "1", "--long-budget", "16",
        "--voice-alias", f"alloy={PRESET}", "--max-batch", "1", "--queue-limit", "1"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START_TIMEOUT_S = 180.0
LONG_TEXT = " ".join(f"Sentence number {n} is said here." for n in range(24))


def install_preset(presets: Path) -> None:
    presets.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)  # the same preset test_openai_api.py installs
    save_prompt(Prompt(rng.integers(0, 1024, (1, 6, 8)), np.array([[5, 6, 7, 8]]), "en"),
                presets / f"{PRESET}.npz")


class RayApp:
    """A running `vallexd-ray` process; `url` once it printed READY."""

    def __init__(self, workdir: Path, tiny_models: Any) -> None:
        self.workdir = workdir
        self.log_path = workdir / "vallexd-ray.log"
        command = [
            sys.executable, "-m", "vallexd.serve.ray",
            "--checkpoint", str(tiny_models.checkpoint), "--vocos", str(tiny_models.vocos_dir),
            "--encodec", str(tiny_models.encodec), "--cache-dir", str(workdir / "cache"),
            "--presets-dir", str(workdir / "presets"), "--static-port", "0", "--device", "cpu",
            "--ray-replicas", "2", "--ray-replica-cpus", "0.5",
            *ARGS,
        ]
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, cwd=workdir, env=daemon_env())
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace")
                self.log.write(raw)
                self.log.flush()
                if line.startswith("vallexd-ray: READY "):
                    found.append(line.split()[-1])

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not found and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.2)
        if found:
            return found[0]
        self.stop()
        text = self.log_path.read_text(errors="replace")
        if "Ray did not start" in text:
            pytest.skip(f"Ray cannot start on this machine:\n{text[-2000:]}")
        pytest.fail(f"vallexd-ray did not become ready (exit {self.proc.returncode}):\n{text[-4000:]}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any) -> Iterator[RayApp]:
    workdir = tmp_path_factory.mktemp("ray")
    install_preset(workdir / "presets")
    app = RayApp(workdir, tiny_models)
    yield app
    assert app.stop() == 0, app.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, daemon_factory: Callable[..., DaemonProcess],
           tiny_models: Any) -> DaemonProcess:
    workdir = tmp_path_factory.mktemp("reference") / "d"
    install_preset(workdir / "presets")
    return daemon_factory("reference", [*ARGS, "--encodec", str(tiny_models.encodec)], workdir=workdir)


@pytest.fixture(scope="module")
def client(ray_app: RayApp) -> Any:
    return openai.OpenAI(base_url=ray_app.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def request(base: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one real HTTP request."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    all_headers = {**AUTH, **({"Content-Type": "application/json"} if body is not None else {}),
                   **(headers or {})}
    try:
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- same answers


SAME_ANSWERS: list[tuple[str, str, Any, dict[str, str]]] = [
    ("GET", "/health", None, {}),
    ("GET", "/v1/audio/voices", None, {}),
    ("POST", "/v1/synthesize", {"text": "Same bytes here.", "voice": PRESET, "language": "en", "seed": 7},
     {}),
    ("POST", "/v1/synthesize", {"text": "Same bytes, faster.", "language": "en", "seed": 8, "format": "flac",
                                "speed": 1.5}, {}),
    ("POST", "/v1/synthesize", {"text": "Streamed. In pieces. Here.", "language": "en", "seed": 9,
                                "stream": True}, {}),
    ("POST", "/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": "Speech route.",
                                  "response_format": "mp3", "seed": 10, "language": "en"}, {}),
    ("POST", "/v1/audio/speech", {"model": "tts-1", "voice": PRESET, "input": "Speech. Streamed here.",
                                  "response_format": "pcm", "stream_format": "sse", "seed": 11,
                                  "language": "en"}, {}),
    ("POST", "/v1/synthesize", {"text": "", "language": "en"}, {}),
    ("POST", "/v1/synthesize", {"text": "Hi.", "voice": "nobody"}, {}),
    ("POST", "/v1/synthesize", {"text": "Hi.", "colour": "blue"}, {}),
    ("POST", "/v1/synthesize", b"{not json", {}),
    ("POST", "/v1/synthesize", {"text": "Hi."}, {"Authorization": "Bearer wrong"}),
    ("POST", "/v1/synthesize", {"text": "Hi."}, {"Origin": "http://evil.example"}),
    ("POST", "/v1/audio/speech", {"model": "whisper-1", "voice": PRESET, "input": "Hi."}, {}),
    ("GET", "/no/such/route", None, {}),
]
#: Headers that must agree (Date, Server, the replica and the ports may not).
COMPARED_HEADERS = ("content-type", "x-vallexd-cache-key", "x-vallexd-duration", "x-vallexd-stream",
                    "www-authenticate")


@pytest.mark.parametrize(("method", "path", "body", "headers"), SAME_ANSWERS,
                         ids=[f"{m} {p} {i}" for i, (m, p, _b, _h) in enumerate(SAME_ANSWERS)])
def test_every_route_answers_as_the_daemon_does(ray_app: RayApp, daemon: DaemonProcess, method: str,
                                                path: str, body: Any, headers: dict[str, str]) -> None:
    assert daemon.http_url is not None
    want = request(daemon.http_url, method, path, body, headers)
    got = request(ray_app.url, method, path, body, headers)
    assert got[0] == want[0], (got, want[0])
    assert got[2] == want[2], (got[2][:300], want[2][:300])
    assert {h: got[1].get(h) for h in COMPARED_HEADERS} == {h: want[1].get(h) for h in COMPARED_HEADERS}


def test_generate_answers_as_the_daemon_does(ray_app: RayApp, daemon: DaemonProcess) -> None:
    """The old API: the same JSON but for the audioURL's host:port (/generate has no seed, so the
    audio itself differs), and each URL serves the WAV in its cache folder."""
    assert daemon.http_url is not None
    body = {"textPrompt": "The old API.", "character": PRESET, "language": "English"}
    answers = [request(base, "POST", "/generate", body) for base in (daemon.http_url, ray_app.url)]
    docs = [json.loads(a[2]) for a in answers]
    assert [a[0] for a in answers] == [200, 200] and docs[0]["code"] == docs[1]["code"] == "200"
    urls = [urlsplit(d.pop("audioURL")) for d in docs]
    assert docs[0] == docs[1] and urls[0].path == urls[1].path
    for url, cache in zip(urls, (daemon.cache_dir, ray_app.workdir / "cache"), strict=True):
        served = request(f"{url.scheme}://{url.netloc}", "GET", url.path)[2]
        assert served[:4] == b"RIFF" and served == (cache / url.path.lstrip("/")).read_bytes()


# --------------------------------------------------------------------------- one cache, two replicas


def replica_pids(ray_app: RayApp) -> dict[str, int]:
    """replica id -> pid of both replicas (`status` answers from whichever replica Ray picks)."""
    found: dict[str, int] = {}
    for _ in range(60):
        status, _h, body = request(ray_app.url, "GET", "/status")
        assert status == 200, body
        replica = json.loads(body)["replica"]
        found[replica["id"]] = replica["pid"]
        if len(found) == 2:
            return found
    pytest.fail(f"status reached only {found} in 60 requests")


def test_a_hit_on_one_replica_after_the_other_made_the_entry(ray_app: RayApp) -> None:
    body = {"text": "Made once, heard twice.", "language": "en", "seed": 21}
    status, headers, made = request(ray_app.url, "POST", "/v1/synthesize", body)
    assert status == 200 and headers["x-vallexd-cache"] == "miss"
    maker = headers["x-vallexd-replica"]
    for _ in range(40):
        status, headers, again = request(ray_app.url, "POST", "/v1/synthesize", body)
        assert status == 200 and headers["x-vallexd-cache"] == "hit" and again == made
        if headers["x-vallexd-replica"] != maker:
            return
    pytest.fail(f"every request went to replica {maker}")


def test_a_voice_created_through_the_ingress_speaks_on_both_replicas(ray_app: RayApp) -> None:
    boundary = "vallexdtestboundary"
    parts = [("name", b"Shared"), ("transcript", b"Good morning."), ("language", b"en")]
    form = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode()
                    + v + b"\r\n" for k, v in parts)
    form += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="me.wav"\r\n'
             "Content-Type: audio/wav\r\n\r\n").encode() + tone(0.4) + f"\r\n--{boundary}--\r\n".encode()
    status, _h, body = request(ray_app.url, "POST", "/v1/audio/voices", form,
                               {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 201, body
    assert (ray_app.workdir / "presets" / "Shared.npz").is_file()
    spoke: set[str] = set()
    for seed in range(60):
        status, headers, body = request(ray_app.url, "POST", "/v1/synthesize",
                                        {"text": "Hi.", "voice": "Shared", "language": "en", "seed": seed})
        assert status == 200, body
        spoke.add(headers["x-vallexd-replica"])
        if len(spoke) == 2:
            break
    assert len(spoke) == 2, f"only replica {spoke} answered"
    voices = json.loads(request(ray_app.url, "GET", "/v1/audio/voices")[2])["voices"]
    assert "Shared" in {v["id"] for v in voices}


# --------------------------------------------------------------------------- BUSY, a replica dies


def open_stream(ray_app: RayApp, seed: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A long streamed synthesis, started (its headers came: a replica works on it)."""
    parts = urlsplit(ray_app.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", "/v1/synthesize", body=json.dumps(
        {"text": LONG_TEXT, "language": "en", "seed": seed, "stream": True}).encode(),
        headers={**AUTH, "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def test_busy_once_both_replicas_work_and_the_cluster_queue_is_full(ray_app: RayApp) -> None:
    """max_batch 1 and queue_limit 1: two requests in progress, one waiting, the next one is BUSY."""
    replicas = set(replica_pids(ray_app))  # (status is answered by a replica: ask before they are busy)
    streams = [open_stream(ray_app, seed) for seed in (41, 42)]
    assert {response.getheader("X-Vallexd-Replica") for _conn, response in streams} == replicas
    waiting: list[tuple[int, dict[str, str], bytes]] = []
    queued = threading.Thread(target=lambda: waiting.append(request(
        ray_app.url, "POST", "/v1/synthesize", {"text": "I wait my turn.", "language": "en", "seed": 43})))
    queued.start()
    time.sleep(0.5)
    status, _h, body = request(ray_app.url, "POST", "/v1/synthesize", {"text": "No room.", "language": "en"})
    assert status == 503 and json.loads(body)["error"]["reason"] == "QUEUE_FULL", body
    for conn, _response in streams:  # hanging up cancels both jobs; the waiting request then runs
        conn.close()
    queued.join(60)
    assert waiting and waiting[0][0] == 200 and waiting[0][2][:4] == b"RIFF"


def test_a_replica_killed_mid_request_gives_unavailable_and_the_next_request_succeeds(
        ray_app: RayApp) -> None:
    pids = replica_pids(ray_app)
    # A long streamed synthesis holds one replica (max_batch 1: it takes no other request) ...
    streaming, stream = open_stream(ray_app, 31)
    busy = stream.getheader("X-Vallexd-Replica")
    (victim,) = [replica for replica in pids if replica != busy]
    # ... so Ray's router sends this one to the other replica, which we kill while it works.
    answer: list[tuple[int, dict[str, str], bytes]] = []
    worker = threading.Thread(target=lambda: answer.append(request(
        ray_app.url, "POST", "/v1/synthesize", {"text": LONG_TEXT, "language": "en", "seed": 32})))
    worker.start()
    time.sleep(1.0)
    assert not answer, "the request finished before the replica could be killed"
    os.kill(pids[victim], signal.SIGKILL)
    worker.join(60)
    status, _h, body = answer[0]
    error = json.loads(body)["error"]
    assert status == 503 and error["code"] == "UNAVAILABLE" and error["reason"] == "REPLICA_LOST", body
    # The stream on the live replica goes on (then we hang up: that cancels its job), and the next
    # request is answered.
    audio = stream.read(200_000)
    streaming.close()
    assert audio[:4] == b"RIFF" and len(audio) == 200_000
    status, _headers, body = request(ray_app.url, "POST", "/v1/synthesize",
                                     {"text": "After the crash.", "language": "en", "seed": 33})
    assert status == 200 and body[:4] == b"RIFF"
    assert not pid_alive(pids[victim])
    # Ray replaces the dead replica.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if json.loads(request(ray_app.url, "GET", "/status")[2])["replicas"]["running"] == 2:
            break
        time.sleep(1)
    else:
        pytest.fail("Ray did not start a new replica within 90 s")


# --------------------------------------------------------------------------- stopping (runs last)


def test_sigterm_drains_as_the_daemon_does(ray_app: RayApp) -> None:
    """SIGTERM: the request in progress finishes, a new one gets 503 SHUTTING_DOWN at once, exit 0."""
    streaming, stream = open_stream(ray_app, 51)
    audio: list[bytes] = []
    reader = threading.Thread(target=lambda: audio.append(stream.read()))  # keep it flowing
    reader.start()
    ray_app.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while True:  # until the ingress has heard of the stop (one sent just before may still be served)
        late = {"text": "Too late.", "language": "en"}
        status, _h, body = request(ray_app.url, "POST", "/v1/synthesize", late, timeout=120)
        if status == 503:
            break
        assert time.monotonic() < deadline, "new requests were still taken 60 s after SIGTERM"
    assert json.loads(body)["error"]["reason"] == "SHUTTING_DOWN"
    reader.join(120)  # the one in progress runs to its end
    streaming.close()
    assert audio and audio[0][:4] == b"RIFF" and len(audio[0]) > 400_000
    assert ray_app.proc.wait(120) == 0
