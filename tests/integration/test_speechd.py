"""contrib/speech-dispatcher/vallexd.conf against a real daemon.

1. The module's command line, with the substitutions sd_generic makes, run by bash directly.
2. If speech-dispatcher and spd-say are installed: `spd-say -o vallexd -w` through a private
   speech-dispatcher whose play command copies the WAV to a file (skipped, saying so, if not).

In both, `vallexctl` on PATH is this tree's CLI and the play command writes the file it is given
to OUT, so the test checks the WAV that would have been played.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "contrib" / "speech-dispatcher" / "vallexd.conf"


def execute_synth(conf_text: str) -> str:
    """The GenericExecuteSynth string as speech-dispatcher's config parser reads it (dotconf:
    backslash-newline continues the line; inside quotes a backslash escapes the next character)."""
    joined = conf_text.replace("\\\n", "")
    line = next(ln for ln in joined.splitlines() if ln.startswith("GenericExecuteSynth"))
    quoted = line.split(None, 1)[1].strip()
    assert quoted.startswith('"') and quoted.endswith('"'), quoted
    out, escaped = [], False
    for ch in quoted[1:-1]:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def substitute(template: str, *, data: str, voice: str, language: str, rate: int, play: str,
               tmpdir: str) -> str:
    """What sd_generic runs for one chunk (same order of replacements, ' escaped in $DATA)."""
    cmd = template.replace("$PLAY_COMMAND", play).replace("$TMPDIR", tmpdir)
    cmd = cmd.replace("$RATE", str(rate)).replace("$LANGUAGE", language).replace("$VOICE", voice)
    head, _, tail = cmd.partition("$DATA")
    return "set -o pipefail ; " + head + data.replace("'", "'\\''") + tail


@pytest.fixture(scope="module")
def daemon(daemon_factory: Any) -> DaemonProcess:
    return daemon_factory("speechd", ["--threads", "1"])


@pytest.fixture
def tools(tmp_path: Path, daemon: DaemonProcess) -> dict[str, Any]:
    """A bin folder with `vallexctl` (this tree) and a player that copies its file to OUT."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out_dir = tmp_path / "played"
    out_dir.mkdir()
    vallexctl = bin_dir / "vallexctl"
    vallexctl.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -c '
                         f'"from vallexctl.cli import main; main()" "$@"\n')
    player = bin_dir / "fake-play"
    player.write_text(f'#!/bin/sh\nn=$(ls "{out_dir}" | wc -l)\ncp "$1" "{out_dir}/played-$n.wav"\n')
    for script in (vallexctl, player):
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "VALLEXD_SOCKET": str(daemon.socket_path), "TMPDIR": str(tmp_path)}
    return {"env": env, "player": str(player), "out": out_dir, "tmp": tmp_path}


def played(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("played-*.wav"))


def wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24000)
        return wav.getnframes() / wav.getframerate()


def test_module_command_line(tools: dict[str, Any]) -> None:
    template = execute_synth(CONF.read_text())
    for data, voice, language, rate in (("It's a test, isn't it?", "default", "en", 0),
                                        ("你好，世界。", "default", "zh", 0),
                                        ("Bonjour tout le monde.", "no_voice", "fr", -40)):
        command = substitute(template, data=data, voice=voice, language=language, rate=rate,
                             play=tools["player"], tmpdir=str(tools["tmp"]))
        before = len(played(tools["out"]))
        done = subprocess.run(["/bin/bash", "-c", command], env=tools["env"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        files = played(tools["out"])
        assert len(files) == before + 1
        assert 0 < wav_seconds(files[-1]) < 60  # speech length, not an empty file
    # The temp WAVs are removed after playing.
    assert not list(tools["tmp"].glob("vallexd-speechd-*"))


def test_unknown_preset_fails_the_command(tools: dict[str, Any]) -> None:
    command = substitute(execute_synth(CONF.read_text()), data="Hello.", voice="NoSuchPreset", language="en",
                         rate=0, play=tools["player"], tmpdir=str(tools["tmp"]))
    done = subprocess.run(["/bin/bash", "-c", command], env=tools["env"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 4 and "NoSuchPreset" in done.stderr  # vallexctl: not found
    assert not played(tools["out"])


def test_rate_maps_to_speed() -> None:
    """The awk expression of the module: speed = 2 ^ (rate / 50)."""
    template = execute_synth(CONF.read_text())
    start = template.index("awk")
    awk = template[start:template.index("')", start) + 1]
    for rate, speed in ((-100, "0.250"), (-50, "0.500"), (0, "1.000"), (50, "2.000"), (100, "4.000")):
        out = subprocess.run(["/bin/bash", "-c", f"rate={rate}; {awk}"], capture_output=True, text=True,
                             check=True).stdout
        assert out == speed


def test_spd_say_through_the_module(tools: dict[str, Any], tmp_path: Path) -> None:
    if not (shutil.which("speech-dispatcher") and shutil.which("spd-say")):
        pytest.skip("speech-dispatcher/spd-say not installed (apt-get install speech-dispatcher): "
                    "only the module's command line was tested")
    conf_dir = tmp_path / "speechd"
    conf_dir.mkdir()
    module_conf = conf_dir / "vallexd.conf"
    # The one change: the audio backend's player becomes the file-writing fake.
    module_conf.write_text(CONF.read_text().replace("$PLAY_COMMAND", tools["player"]))
    (conf_dir / "speechd.conf").write_text(
        f'AddModule "vallexd" "sd_generic" "{module_conf}"\nDefaultModule vallexd\n'
        f'LogDir "{tmp_path}"\nDefaultLanguage "en"\n'
        # Modules must open an audio output to load; ALSA's built-in "null" device needs no sound card.
        'AudioOutputMethod "alsa"\nAudioALSADevice "null"\n')
    sock = tmp_path / "speechd.sock"
    env = {**tools["env"], "SPEECHD_ADDRESS": f"unix_socket:{sock}"}
    server = subprocess.Popen(["speech-dispatcher", "-s", "-C", str(conf_dir), "-c", "unix_socket", "-S",
                               str(sock), "-t", "0", "-L", str(tmp_path)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None, f"speech-dispatcher exited with {server.returncode}"
            assert time.monotonic() < deadline, "speech-dispatcher did not create its socket"
            time.sleep(0.1)
        modules = subprocess.run(["spd-say", "-O"], env=env, capture_output=True, text=True, timeout=60)
        assert "vallexd" in modules.stdout, modules.stdout + modules.stderr
        said = subprocess.run(["spd-say", "-o", "vallexd", "-l", "en", "-w", "Hello from speech dispatcher."],
                              env=env, capture_output=True, text=True, timeout=180)
        assert said.returncode == 0, said.stderr
        # A rate other than 0 still speaks (as a speed where vallexctl has --speed, else ignored).
        faster = subprocess.run(["spd-say", "-o", "vallexd", "-l", "en", "-r", "50", "-w", "Faster now."],
                                env=env, capture_output=True, text=True, timeout=180)
        assert faster.returncode == 0, faster.stderr
        files = played(tools["out"])
        assert len(files) == 2, list(tmp_path.glob("*.log"))
        assert all(0 < wav_seconds(f) < 60 for f in files)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
