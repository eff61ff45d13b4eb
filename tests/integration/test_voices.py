"""Voices from recordings on a real daemon (tiny random EnCodec + Whisper in their real formats):
presets.create over the socket, POST /v1/audio/voices over real HTTP, the CLI's daemon path,
typed refusals that leave nothing on disk, and two creates of one name racing."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from daemon_harness import DaemonProcess, tree_snapshot
from voice_samples import clipped, mp3, silence, tone

from vallexctl.cli import cli
from vallexd.constants import FRAMES_PER_SECOND
from vallexd.errors import ErrorCode, VallexError
from vallexd.storage.prompts import load_prompt
from vallexd.text import phonemize

MAX_AUDIO = 300_000  # bytes; a 0.5 s tone is 24 KB, a 7 s one 336 KB


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("whisper", reason="openai-whisper (the asr extra: pip install -e '.[test]') "
                                          "is not installed")
    from vallexd.tools.tiny_weights import make_tiny_whisper

    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "medium.pt")


@pytest.fixture(scope="module")
def daemon(daemon_factory: Callable[..., DaemonProcess], tiny_models: Any,
           tiny_whisper: Path) -> DaemonProcess:
    return daemon_factory("voices", ["--encodec", str(tiny_models.encodec), "--whisper", str(tiny_whisper),
                                     "--http-port", "0", "--threads", "1",
                                     "--max-audio-bytes", str(MAX_AUDIO)])


def create(daemon: DaemonProcess, **params: Any) -> dict[str, Any]:
    return daemon.call("presets.create", params, timeout=120)


def refused(daemon: DaemonProcess, **params: Any) -> VallexError:
    with pytest.raises(VallexError) as info:
        create(daemon, **params)
    return info.value


def speaks(daemon: DaemonProcess, voice: str) -> None:
    result = daemon.call("synthesize", {"text": "Hi.", "language": "en", "voice": voice, "seed": 1},
                         timeout=120)
    assert result["duration_s"] > 0 and len(result["audio"]) > 44


def check_prompt_file(daemon: DaemonProcess, name: str, transcript: str, language: str, frames: int) -> None:
    prompt = load_prompt(daemon.presets_dir / f"{name}.npz")
    assert prompt.language == language
    assert prompt.text_tokens.tolist() == [list(phonemize(transcript, language).ids)]
    assert prompt.audio_tokens.shape == (1, frames, 8)


# --------------------------------------------------------------------------- the socket


def test_socket_create_with_a_transcript_then_speak(daemon: DaemonProcess) -> None:
    result = create(daemon, name="tone", audio=tone(0.4), transcript="Hello there.", language="en")
    assert result["name"] == "tone" and result["language"] == "en" and result["source"] == "installed"
    assert result["transcript"] == "Hello there." and result["transcribed"] is False
    assert result["frames"] == int(0.4 * FRAMES_PER_SECOND) and result["audio_kept"] is False
    check_prompt_file(daemon, "tone", "Hello there.", "en", result["frames"])
    listed = {p["name"]: p for p in daemon.call("presets.list")["presets"]}
    assert listed["tone"]["frames"] == result["frames"]
    speaks(daemon, "tone")
    assert sorted(p.name for p in daemon.presets_dir.iterdir()) == ["tone.npz"]  # no recording kept


def test_socket_create_without_a_transcript_uses_whisper(daemon: DaemonProcess) -> None:
    result = create(daemon, name="heard", audio=tone(0.4, rate=16000))
    # Whatever the tiny Whisper says becomes the transcript, with the final-punctuation rule applied.
    assert result["transcribed"] is True and result["language"] == "en"
    transcript = result["transcript"]
    assert transcript and transcript[-1] in "?!.,。，？！、"
    check_prompt_file(daemon, "heard", transcript, "en", int(0.4 * FRAMES_PER_SECOND))
    speaks(daemon, "heard")


def test_stereo_48k_is_accepted_and_converted(daemon: DaemonProcess) -> None:
    result = create(daemon, name="stereo", audio=tone(0.4, rate=48000, channels=2), transcript="Hi.")
    assert result["recording"] == {"seconds": 0.4, "sample_rate": 48000, "channels": 2, "format": "wav"}
    assert result["frames"] == int(0.4 * FRAMES_PER_SECOND)  # resampled to 24 kHz, 75 frames a second


def test_mp3_is_accepted_and_kept_with_keep_audio(daemon: DaemonProcess) -> None:
    data = mp3(0.5)
    result = create(daemon, name="kept", audio=data, transcript="Hello.", keep_audio=True)
    assert result["audio_kept"] is True
    assert (daemon.presets_dir / "kept.mp3").read_bytes() == data
    # Replacing the voice without keep_audio drops the old recording; removing it removes both.
    create(daemon, name="kept", audio=tone(0.3), transcript="Hello.", overwrite=True)
    assert not (daemon.presets_dir / "kept.mp3").exists()
    create(daemon, name="kept", audio=tone(0.3), transcript="Hello.", overwrite=True, keep_audio=True)
    assert (daemon.presets_dir / "kept.wav").is_file()
    daemon.call("presets.remove", {"name": "kept"})
    assert not any(p.name.startswith("kept") for p in daemon.presets_dir.iterdir())


@pytest.mark.parametrize("params, code, reason", [
    ({"audio": tone(16.0, rate=8000)}, ErrorCode.TOO_LARGE, "PROMPT_TOO_LONG"),
    ({"audio": silence(1.0)}, ErrorCode.INVALID_ARGUMENT, "SILENT_AUDIO"),
    ({"audio": clipped(1.0)}, ErrorCode.INVALID_ARGUMENT, "CLIPPED_AUDIO"),
    ({"audio": b"RIFF\0\0\0\0WAVEnot really"}, ErrorCode.INVALID_ARGUMENT, "BAD_AUDIO"),
    ({"audio": tone(7.0)}, ErrorCode.TOO_LARGE, "AUDIO_TOO_LARGE"),
    ({"audio": tone(0.3), "name": "../evil"}, ErrorCode.INVALID_ARGUMENT, "BAD_NAME"),
    ({"audio": tone(0.3), "name": ".hidden"}, ErrorCode.INVALID_ARGUMENT, "BAD_NAME"),
    ({"audio": tone(0.3), "language": "de"}, ErrorCode.INVALID_ARGUMENT, "UNKNOWN_LANGUAGE"),
    ({"audio": "not bytes"}, ErrorCode.INVALID_ARGUMENT, "BAD_TYPE"),
    ({"audio": tone(0.3), "speaker": "x"}, ErrorCode.INVALID_ARGUMENT, "UNKNOWN_FIELD"),
    ({"audio": tone(0.3), "transcript": "Hi.", "name": "tone"}, ErrorCode.ALREADY_EXISTS, "PRESET_EXISTS"),
], ids=["too-long", "silent", "clipped", "not-audio", "over-limit", "dotdot", "dotfile", "language",
        "type", "field", "exists"])
def test_refusals_are_typed_and_leave_nothing(daemon: DaemonProcess, params: dict[str, Any], code: ErrorCode,
                                              reason: str) -> None:
    if "tone" not in {p["name"] for p in daemon.call("presets.list")["presets"]}:
        create(daemon, name="tone", audio=tone(0.4), transcript="Hello there.")
    before = tree_snapshot(daemon.workdir)
    err = refused(daemon, **{"name": "bad", "transcript": "Hello.", **params})
    assert (err.code, err.reason) == (code, reason), err
    assert tree_snapshot(daemon.workdir) == before


def test_two_creates_of_one_name_one_wins(daemon: DaemonProcess) -> None:
    outcomes: list[Any] = [None, None]
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = create(daemon, name="race", audio=tone(2.0, seed=i), transcript=f"Take {i + 1}.")
        except VallexError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    winners = [o for o in outcomes if isinstance(o, dict)]
    losers = [o for o in outcomes if isinstance(o, VallexError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert losers[0].code is ErrorCode.ALREADY_EXISTS
    # The file on disk is the winner's, whole: its transcript, not a mix of the two.
    check_prompt_file(daemon, "race", winners[0]["transcript"], "en", 2 * FRAMES_PER_SECOND)
    assert not [p for p in daemon.presets_dir.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- HTTP


async def post_voice(daemon: DaemonProcess, fields: dict[str, Any], file: bytes | None,
                     filename: str = "me.wav") -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData(default_to_multipart=True)
    if file is not None:
        form.add_field("file", file, filename=filename, content_type="application/octet-stream")
    for key, value in fields.items():
        form.add_field(key, value)
    async with aiohttp.ClientSession() as session, session.post(f"{daemon.http_url}/v1/audio/voices",
                                                                data=form) as resp:
        return resp.status, await resp.json()


async def test_http_multipart_with_and_without_a_transcript(daemon: DaemonProcess) -> None:
    status, body = await post_voice(daemon, {"name": "web", "transcript": "Good morning.", "language": "en"},
                                    tone(0.4, rate=44100, channels=2))
    assert status == 201, body
    assert body["id"] == body["name"] == "web" and body["object"] == "voice" and body["language"] == "en"
    assert body["transcript"] == "Good morning." and body["transcribed"] is False
    check_prompt_file(daemon, "web", "Good morning.", "en", int(0.4 * FRAMES_PER_SECOND))

    status, body = await post_voice(daemon, {"name": "web heard", "keep_audio": "true"}, tone(0.4))
    assert status == 201, body
    assert body["transcribed"] is True and body["language"] == "en" and body["audio_kept"] is True
    check_prompt_file(daemon, "web heard", body["transcript"], "en", int(0.4 * FRAMES_PER_SECOND))
    assert (daemon.presets_dir / "web heard.wav").read_bytes() == tone(0.4)
    speaks(daemon, "web heard")
    from vallexd.server.voices_api import voice_entry

    listed = {p["name"]: p for p in daemon.call("presets.list")["presets"]}
    assert {k: v for k, v in body.items() if k in voice_entry(listed["web heard"])} == \
        voice_entry(listed["web heard"])


@pytest.mark.parametrize("fields, file, status, reason", [
    ({"name": "big"}, tone(7.0), 413, "AUDIO_TOO_LARGE"),
    ({"name": "../x"}, tone(0.3), 400, "BAD_NAME"),
    ({"name": "quiet"}, silence(0.5), 400, "SILENT_AUDIO"),
    ({"name": "nofile"}, None, 400, "MISSING_FIELD"),
    ({"name": "odd", "colour": "blue"}, tone(0.3), 400, "UNKNOWN_FIELD"),
    ({"name": "flag", "overwrite": "maybe"}, tone(0.3), 400, "BAD_TYPE"),
], ids=["over-limit", "bad-name", "silent", "no-file", "unknown-field", "bad-bool"])
async def test_http_refusals_are_typed_and_leave_nothing(daemon: DaemonProcess, fields: dict[str, Any],
                                                         file: bytes | None, status: int,
                                                         reason: str) -> None:
    before = tree_snapshot(daemon.workdir)
    got, body = await post_voice(daemon, fields, file)
    assert (got, body["error"]["reason"]) == (status, reason), body
    assert tree_snapshot(daemon.workdir) == before


async def test_http_needs_a_well_formed_multipart_form(daemon: DaemonProcess) -> None:
    url = f"{daemon.http_url}/v1/audio/voices"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"name": "x"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["reason"] == "BAD_CONTENT_TYPE"
        for body in (b"garbage without any boundary", b"--xyz\r\nno headers end",
                     b"--xyz\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nx\r\n--xyz--\r\n"):
            async with session.post(url, data=body,
                                    headers={"Content-Type": "multipart/form-data; boundary=xyz"}) as resp:
                doc = await resp.json()
                assert resp.status == 400, doc
                assert doc["error"]["reason"] in ("BAD_FORM", "MISSING_FIELD"), doc


# --------------------------------------------------------------------------- vallexctl


def test_cli_from_audio_without_local_weights_uses_the_daemon(daemon: DaemonProcess, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "empty"))  # no EnCodec on "this machine"
    wav = tmp_path / "me.wav"
    wav.write_bytes(tone(0.4, rate=22050))
    result = CliRunner().invoke(cli, ["--socket", str(daemon.socket_path), "--json", "preset", "install",
                                      "--from-audio", str(wav), "--name", "cli voice"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["name"] == "cli voice" and doc["transcribed"] is True and doc["source"] == str(wav)
    check_prompt_file(daemon, "cli voice", doc["transcript"], doc["language"], int(0.4 * FRAMES_PER_SECOND))

    again = CliRunner().invoke(cli, ["--socket", str(daemon.socket_path), "preset", "install", "--from-audio",
                                     str(wav), "--name", "cli voice", "--transcript", "Hello."])
    assert again.exit_code == 1 and "already exists" in again.stderr


# --------------------------------------------------------------------------- weights arriving later


def test_missing_weights_are_typed_and_picked_up_once_fetched(
        daemon_factory: Callable[..., DaemonProcess], tiny_models: Any, tiny_whisper: Path,
        tmp_path: Path) -> None:
    models = tmp_path / "models"
    late = daemon_factory("late", ["--encodec", str(models / "encodec.th"),
                                   "--whisper", str(models / "whisper" / "medium.pt"), "--threads", "1",
                                   "--whisper-idle", "1"])
    before = tree_snapshot(late.workdir)
    err = refused(late, name="a", audio=tone(0.3), transcript="Hello.")
    assert (err.code, err.reason) == (ErrorCode.UNAVAILABLE, "ENCODEC_MISSING")
    assert "vallexctl models fetch --encodec" in err.message and str(models / "encodec.th") in err.message
    assert tree_snapshot(late.workdir) == before

    models.mkdir()
    shutil.copy(tiny_models.encodec, models / "encodec.th")  # "fetched" while the daemon runs
    err = refused(late, name="a", audio=tone(0.3))
    assert (err.code, err.reason) == (ErrorCode.UNAVAILABLE, "WHISPER_MISSING")
    assert "vallexctl models fetch --whisper" in err.message
    assert tree_snapshot(late.workdir) == before
    assert create(late, name="a", audio=tone(0.3), transcript="Hello.")["transcribed"] is False

    (models / "whisper").mkdir()
    shutil.copy(tiny_whisper, models / "whisper" / "medium.pt")
    assert create(late, name="b", audio=tone(0.3))["transcribed"] is True
    status = late.call("status")["voices"]
    assert status["encodec"] and status["created"] == 2 and status["transcribed"] == 1

    # Idle for --whisper-idle seconds: Whisper is unloaded (EnCodec, ~90 MB, stays), and loaded
    # again by the next create that needs it.
    deadline = time.monotonic() + 30
    while late.call("status")["voices"]["whisper"]:
        assert time.monotonic() < deadline, "Whisper was never unloaded"
        time.sleep(0.2)
    late.wait_log("Whisper unloaded after being idle")
    assert create(late, name="c", audio=tone(0.3))["transcribed"] is True
