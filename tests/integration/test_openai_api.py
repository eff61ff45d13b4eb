"""OpenAI's speech API on a real daemon (tiny weights), driven by the official `openai` package.

Every format is decoded back with PyAV; streaming is proven by the order of events (the first
audio arrives while the daemon's status still shows the synthesis running), not by timing.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from daemon_harness import DaemonProcess, daemon_env

from vallexd.audio.formats import CONTENT_TYPES, FORMATS
from vallexd.constants import SAMPLE_RATE
from vallexd.storage.prompts import Prompt, save_prompt
from vallexd.storage.wav import read_pcm16

openai = pytest.importorskip("openai")

TOKEN = "open-sesame"
PRESET = "Mika"
# Many short sentences and a tiny phoneme budget: one piece per sentence.
LONG_TEXT = " ".join(f"Sentence number {n} is here." for n in range(1, 13))
#: Decoded length may differ from the WAV by the codec's priming and last-frame padding.
TOLERANCE = {"mp3": 1152, "aac": 2048, "opus": 960, "flac": 0, "wav": 0, "pcm": 0}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, daemon_factory: Any) -> DaemonProcess:
    workdir = tmp_path_factory.mktemp("openai") / "d"
    presets = workdir / "presets"
    presets.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_prompt(Prompt(rng.integers(0, 1024, (1, 6, 8)), np.array([[5, 6, 7, 8]]), "en"),
                presets / f"{PRESET}.npz")
    return daemon_factory("openai", [
        "--http-port", "0", "--http-token", TOKEN, "--threads", "1", "--long-budget", "16",
        "--voice-alias", f"alloy={PRESET}",
    ], workdir=workdir)


@pytest.fixture(scope="module")
def client(daemon: DaemonProcess) -> Any:
    assert daemon.http_url is not None
    # No retries: a 503 must surface, not be hidden by the SDK's backoff.
    return openai.OpenAI(base_url=daemon.http_url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def decode(data: bytes, fmt: str) -> tuple[int, int]:
    """(sample rate, samples) of encoded audio, decoded with PyAV (FFmpeg)."""
    if fmt == "pcm":
        return SAMPLE_RATE, len(data) // 2
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.codec_context.sample_rate, samples


def wav_samples(daemon: DaemonProcess, text: str, seed: int) -> int:
    result = daemon.call("synthesize", {"text": text, "voice": PRESET, "language": "en", "seed": seed})
    return len(read_pcm16(result["audio"]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_decodes_to_the_wav_duration(daemon: DaemonProcess, client: Any, fmt: str) -> None:
    text = "Hello there."
    expected = wav_samples(daemon, text, seed=5)
    response = client.audio.speech.create(model="tts-1", voice=PRESET, input=text, response_format=fmt,
                                          extra_body={"language": "en", "seed": 5})


    assert response.response.headers["content-type"] == CONTENT_TYPES[fmt]
    rate, samples = decode(response.content, fmt)
    # Opus always decodes at 48 kHz (RFC 7845); every other format keeps the model's 24 kHz.
    assert rate == (48000 if fmt == "opus" else SAMPLE_RATE)
    samples = samples * SAMPLE_RATE // rate
    assert abs(samples - expected) <= TOLERANCE[fmt], (fmt, samples, expected)


def test_default_format_is_mp3_and_aliases_resolve(daemon: DaemonProcess, client: Any) -> None:
    response = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="Hi.",
                                          instructions="Speak cheerfully.", extra_body={"language": "en"})
    assert response.response.headers["content-type"] == "audio/mpeg"
    assert response.response.headers["x-vallexd-instructions"] == "ignored"
    assert decode(response.content, "mp3")[1] > 0


def test_speed_two_halves_the_duration(daemon: DaemonProcess, client: Any) -> None:
    text = "A somewhat longer sentence for the tempo test."
    expected = wav_samples(daemon, text, seed=11)
    response = client.audio.speech.create(model="vallex", voice=PRESET, input=text, response_format="flac",
                                          speed=2.0, extra_body={"language": "en", "seed": 11})
    _, samples = decode(response.content, "flac")
    assert abs(samples - expected / 2) <= 0.05 * expected, (samples, expected)


def test_sdk_exceptions(daemon: DaemonProcess, client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.audio.speech.create(model="tts-1", voice="nobody", input="Hi.")
    body = err.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == "voice"
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="tts-1", voice=PRESET, input="Hi.",
                                   response_format="ogg")  # type: ignore[arg-type]
    assert err.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="whisper-1", voice=PRESET, input="Hi.")
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="tts-1", voice=PRESET, input="Hi.", speed=5.0)
    assert err.value.body["param"] == "speed"
    with pytest.raises(openai.BadRequestError) as err:
        client.audio.speech.create(model="tts-1", voice=PRESET, input="")
    assert err.value.body["param"] == "input"
    # An alias whose preset is not installed is a 404 that says which preset to install.
    with pytest.raises(openai.NotFoundError, match="acou_2"):
        client.audio.speech.create(model="tts-1", voice="ash", input="Hi.")
    anonymous = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        anonymous.audio.speech.create(model="tts-1", voice=PRESET, input="Hi.")
    assert err.value.body["code"] == "invalid_api_key"


def test_models_and_voices(daemon: DaemonProcess, client: Any) -> None:
    assert {m.id for m in client.models.list()} == {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "vallex"}
    voices = client.get("/audio/voices", cast_to=object)
    ids = {v["id"] for v in voices["voices"]}
    assert PRESET in ids and "alloy" in ids  # alloy -> Mika is installed
    assert "echo" not in ids  # its default preset is not installed here
    assert all(set(v) >= {"id", "name"} for v in voices["voices"])  # what Open WebUI reads


def _running(daemon: DaemonProcess) -> bool:
    status = daemon.call("status")
    return status["in_flight"] + status["queue_depth"] > 0


def test_stream_audio_first_bytes_before_the_last_piece(daemon: DaemonProcess, client: Any) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice=PRESET, input=LONG_TEXT, response_format="opus", stream_format="audio",
        extra_body={"language": "en", "seed": 21},
    ) as response:
        assert response.headers["content-type"] == "audio/ogg"
        assert "content-length" not in response.headers  # chunked
        chunks = response.iter_bytes()
        data = next(chunks)
        # Order of events: we hold audio, and only now ask the daemon: it is still synthesising.
        assert _running(daemon), "the first bytes came only after the whole synthesis"
        data += b"".join(chunks)
    assert not _running(daemon)
    rate, samples = decode(data, "opus")
    expected = wav_samples(daemon, LONG_TEXT, seed=21)  # a cache hit: the same audio, as WAV
    assert rate == 48000 and abs(samples // 2 - expected) <= TOLERANCE["opus"]


def test_stream_sse_events(daemon: DaemonProcess, client: Any) -> None:
    events: list[dict[str, Any]] = []
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice=PRESET, input=LONG_TEXT, response_format="pcm", stream_format="sse",
        extra_body={"language": "en", "seed": 22},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                if len(events) == 1:
                    assert _running(daemon), "the first event came only after the whole synthesis"
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and len(events) > 2
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(pcm) // 2 == wav_samples(daemon, LONG_TEXT, seed=22)
    assert events[-1]["usage"]["output_tokens"] == len(pcm) // 2 // 320


def test_cache_hit_streams_at_once(daemon: DaemonProcess, client: Any) -> None:
    args = {"model": "tts-1", "voice": PRESET, "input": "Cached words.", "response_format": "wav",
            "extra_body": {"language": "en", "seed": 3}}
    first = client.audio.speech.create(**args).content
    runs = daemon.call("status")["counters"]["engine_runs"]
    with client.audio.speech.with_streaming_response.create(stream_format="audio", **args) as response:
        assert response.headers["x-vallexd-stream"] == "audio"
        streamed = response.read()
    assert daemon.call("status")["counters"]["engine_runs"] == runs  # never reached the model
    assert streamed[:4] == b"RIFF" and streamed[44:] == first[44:]  # same samples, streaming header


def test_client_disconnect_mid_stream_frees_the_worker(daemon: DaemonProcess, client: Any) -> None:
    errors = daemon.call("status")["counters"]["engine_failures"]
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice=PRESET, input=LONG_TEXT + " And one more.", response_format="mp3",
        stream_format="audio", extra_body={"language": "en", "seed": 23},
    ) as response:
        chunks = response.iter_bytes()  # held: a dropped generator would close the response now
        next(chunks)
        assert _running(daemon)
    # Leaving the block closed the connection: the job is cancelled, not run to its end.
    deadline = time.monotonic() + 30
    while _running(daemon):
        assert time.monotonic() < deadline, "the worker is still busy for a client that left"
        time.sleep(0.05)
    assert daemon.call("status")["counters"]["engine_failures"] == errors + 1
    daemon.wait_log(r"client went away")


def test_socket_stream_events(daemon: DaemonProcess) -> None:
    params = {"text": LONG_TEXT, "voice": PRESET, "language": "en", "seed": 24, "stream": True,
              "format": "flac", "progress": True}
    with daemon.client() as c:
        events, response = c.request("synthesize", params)
    assert response["ok"], response
    result = response["result"]
    assert "audio" not in result and result["format"] == "flac" and result["pieces"] > 2
    audio = [e["data"] for e in events if e["event"] == "audio"]
    kinds = [e["event"] if e["event"] == "audio" else f"progress {e['data']['done']}" for e in events]
    # Order of events on one connection: piece 0's audio comes before the last piece is done.
    assert kinds.index("audio") < kinds.index(f"progress {result['pieces']}"), kinds
    assert [a["index"] for a in audio] == list(range(result["pieces"] + 1)) and audio[-1]["last"]
    offsets = [a["offset"] for a in audio]
    assert offsets == sorted(offsets) and offsets[0] == 0
    data = b"".join(a["data"] for a in audio)
    rate, samples = decode(data, "flac")
    assert rate == SAMPLE_RATE and samples == wav_samples(daemon, LONG_TEXT, seed=24) == offsets[-1]


def test_v1_synthesize_takes_format(daemon: DaemonProcess, tmp_path: Path) -> None:
    import urllib.request

    assert daemon.http_url is not None
    req = urllib.request.Request(daemon.http_url + "/v1/synthesize", method="POST", data=json.dumps(
        {"text": "Format please.", "voice": PRESET, "language": "en", "format": "aac"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"] == "audio/aac"
        assert decode(resp.read(), "aac")[1] > 0


# --------------------------------------------------------------------------- vallexctl speak --stream

VALLEXCTL = Path(sys.executable).with_name("vallexctl")


def ctl_proc(daemon: DaemonProcess, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run([str(VALLEXCTL), "--socket", str(daemon.socket_path), *args], capture_output=True,
                          timeout=180, env=env or daemon_env())


def test_speak_stream_to_opus_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    out = tmp_path / "x.opus"
    done = ctl_proc(daemon, "speak", "--stream", "-v", PRESET, "-l", "en", "--seed", "31", "-o", str(out),
                    LONG_TEXT)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.opus"]  # no .part left behind
    rate, samples = decode(out.read_bytes(), "opus")  # the format came from the extension
    assert rate == 48000 and abs(samples // 2 - wav_samples(daemon, LONG_TEXT, seed=31)) <= TOLERANCE["opus"]


def test_speak_stream_failure_leaves_no_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    out = tmp_path / "y.flac"
    done = ctl_proc(daemon, "speak", "--stream", "-v", "nobody", "-o", str(out), "Hi.")
    assert done.returncode != 0 and list(tmp_path.iterdir()) == []


def test_speak_stream_play_starts_with_the_first_piece(daemon: DaemonProcess, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    played, status = tmp_path / "played.pcm", tmp_path / "status.json"
    # Stands in for paplay: on its first byte it asks the daemon whether the synthesis still runs.
    player = bin_dir / "paplay"
    player.write_text(f"#!/bin/sh\ndd bs=1 count=1 of={played} 2>/dev/null\n"
                      f"{VALLEXCTL} --socket {daemon.socket_path} --json status > {status}\n"
                      f"cat >> {played}\n")
    player.chmod(0o755)
    env = daemon_env({"PATH": f"{bin_dir}:/usr/bin:/bin"})
    done = ctl_proc(daemon, "speak", "--stream", "--play", "-v", PRESET, "-l", "en", "--seed", "32",
                    LONG_TEXT, env=env)
    assert done.returncode == 0, done.stderr
    state = json.loads(status.read_text())
    assert state["in_flight"] == 1, "playback began only after the whole synthesis"
    assert len(played.read_bytes()) // 2 == wav_samples(daemon, LONG_TEXT, seed=32)  # raw s16le
