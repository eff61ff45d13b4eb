"""`vallexctl preset install --from-audio`: a generated tone → EnCodec codes (tiny random EnCodec
weights in the real format) + transcript phonemes → .npz → installed → spoken through the daemon."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from daemon_harness import DaemonProcess, daemon_env

from vallexctl.cli import cli
from vallexd.storage.prompts import load_prompt, prompt_digest

VALLEXCTL = Path(sys.executable).with_name("vallexctl")


def tone(path: Path, seconds: float, rate: int = 44100, channels: int = 2) -> Path:
    """A 220 Hz tone with a little noise, stereo at 44.1 kHz: resampling and down-mixing are exercised."""
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.4 * np.sin(2 * np.pi * 220 * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)
    sf.write(str(path), np.stack([mono] * channels, axis=1).astype(np.float32), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    return daemon_factory("fromaudio")


def test_tone_becomes_a_preset_that_speaks(daemon: DaemonProcess, tiny_models: object,
                                           tmp_path: Path) -> None:
    # Short: EnCodec with random weights is slow on a CPU (seconds per second of audio).
    wav = tone(tmp_path / "me.wav", 0.4)
    saved = tmp_path / "me.npz"
    result = CliRunner().invoke(cli, [
        "--socket", str(daemon.socket_path), "--json", "preset", "install", "--from-audio", str(wav),
        "--transcript", "Hello.", "--language", "en", "--name", "me",
        "--encodec", str(tiny_models.encodec), "--save", str(saved),  # type: ignore[attr-defined]
    ])
    assert result.exit_code == 0, result.output

    prompt = load_prompt(saved)
    assert prompt.language == "en"
    assert prompt.audio_tokens.shape == (1, 30, 8)  # 0.4 s at 75 EnCodec frames a second
    assert prompt.audio_tokens.min() >= 0 and prompt.audio_tokens.max() < 1024
    from vallexd.text import phonemize

    assert prompt.text_tokens.tolist() == [list(phonemize("Hello.", "en").ids)]
    # What the daemon installed is the same prompt.
    assert prompt_digest(load_prompt(daemon.presets_dir / "me.npz")) == prompt_digest(prompt)

    spoken = CliRunner().invoke(cli, ["--socket", str(daemon.socket_path), "speak", "-v", "me", "--seed", "1",
                                      "-o", str(tmp_path / "out.wav"), "Hi."])
    assert spoken.exit_code == 0, spoken.output
    audio, rate = sf.read(io.BytesIO((tmp_path / "out.wav").read_bytes()))
    assert rate == 24000 and audio.size > 0


def test_recording_over_15_seconds_is_refused(daemon: DaemonProcess, tmp_path: Path) -> None:
    wav = tone(tmp_path / "long.wav", 16.0, rate=8000, channels=1)
    before = sorted(p.name for p in daemon.presets_dir.iterdir())
    done = subprocess.run(
        [str(VALLEXCTL), "--socket", str(daemon.socket_path), "preset", "install", "--from-audio", str(wav),
         "--transcript", "Too long.", "--name", "long"],
        capture_output=True, text=True, timeout=60, env=daemon_env(),
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "16.0 s" in done.stderr and "15 s" in done.stderr
    assert sorted(p.name for p in daemon.presets_dir.iterdir()) == before


def test_missing_encodec_weights_say_how_to_get_them(daemon: DaemonProcess, tmp_path: Path) -> None:
    wav = tone(tmp_path / "a.wav", 0.5)
    result = CliRunner().invoke(cli, [
        "--socket", str(daemon.socket_path), "preset", "install", "--from-audio", str(wav),
        "--transcript", "Hello.", "--name", "x", "--encodec", str(tmp_path / "missing.th"),
    ])
    assert result.exit_code == 4
    assert "models fetch" in result.stderr


def test_from_audio_needs_a_name_and_a_local_transcript(tmp_path: Path) -> None:
    """A transcript is optional (the daemon transcribes), but making the preset here needs one."""
    wav = tone(tmp_path / "a.wav", 0.5)
    base = ["--socket", str(tmp_path / "s"), "preset", "install", "--from-audio", str(wav)]
    result = CliRunner().invoke(cli, base)
    assert result.exit_code == 2 and "--name" in result.output
    result = CliRunner().invoke(cli, [*base, "--name", "x", "--encodec", str(tmp_path / "e.th")])
    assert result.exit_code == 2 and "--transcript" in result.output
