"""vallexctl against a real daemon (tiny random weights) over its real Unix socket.

Most calls go through click's CliRunner (fast, in-process); the ones where the
process boundary matters (stdout bytes, exit codes, TTY refusal, quickstart
starting a detached daemon) run the installed `vallexctl` as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import pty
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner, Result
from daemon_harness import DaemonProcess, daemon_env, pid_alive

from vallexctl.cli import cli
from vallexctl.client import Client
from vallexctl.output import EXIT_BUSY, exit_code_for
from vallexctl.units import parse_duration, parse_size
from vallexd import protocol
from vallexd.errors import Busy, InvalidArgument, ProtocolError
from vallexd.storage.prompts import Prompt, save_prompt

VALLEXCTL = Path(sys.executable).with_name("vallexctl")


@pytest.fixture(scope="module")
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    # The smallest phoneme budget, so two short sentences make two pieces (progress events).
    return daemon_factory("ctl", ["--long-budget", "16"])


def ctl(daemon: DaemonProcess, *args: str, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, ["--socket", str(daemon.socket_path), *args], input=input)


def ctl_proc(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
             **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(VALLEXCTL), *args], capture_output=True, timeout=timeout,
                          env=env or daemon_env(), **kwargs)  # type: ignore[call-overload]


def isolated_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """HOME and XDG folders inside tmp_path, so nothing touches the real user's files."""
    env = daemon_env({"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run"), **extra})
    for key in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "VALLEXCTL_MODELS_BASE_URL"):
        env.pop(key, None)
    env.update(extra)
    (tmp_path / "run").mkdir(mode=0o700, exist_ok=True)
    return env


def wav_info(data: bytes) -> tuple[int, int, int]:
    audio, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    return rate, audio.shape[1], audio.shape[0]


# --------------------------------------------------------------------------- speak


def test_speak_to_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    out = tmp_path / "hello.wav"
    result = ctl(daemon, "speak", "--seed", "1", "-o", str(out), "Hi.")
    assert result.exit_code == 0, result.output
    rate, channels, frames = wav_info(out.read_bytes())
    assert (rate, channels) == (24000, 1) and frames > 0
    assert str(out) in result.stdout
    assert oct(stat.S_IMODE(out.stat().st_mode)) != "0o600"  # a normal file, not mkstemp's private one
    assert [p.name for p in tmp_path.iterdir()] == ["hello.wav"]  # no temp file left beside it


def test_speak_to_stdout_is_the_same_wav(daemon: DaemonProcess, tmp_path: Path) -> None:
    out = tmp_path / "a.wav"
    assert ctl(daemon, "speak", "--seed", "7", "-o", str(out), "Same words.").exit_code == 0
    done = ctl_proc("--socket", str(daemon.socket_path), "speak", "--seed", "7", "--stdout", "Same words.")
    assert done.returncode == 0, done.stderr
    assert done.stdout[:4] == b"RIFF" and done.stdout == out.read_bytes()  # second one is a cache hit


def test_speak_reads_stdin_and_prints_json(daemon: DaemonProcess) -> None:
    result = ctl(daemon, "speak", "--json", "-l", "en", input="Text from a pipe.\n")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["sample_rate"] == 24000 and "audio" not in data
    assert Path(data["path"]).is_file() and data["url"].startswith("http://127.0.0.1:")


def test_speak_long_text_shows_progress(daemon: DaemonProcess) -> None:
    result = ctl(daemon, "speak", "--long", "--progress", "--json", "Hello there. Good day.")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pieces"] == 2
    assert "speaking  1/2 pieces" in result.stderr and "speaking  2/2 pieces" in result.stderr


def test_speak_long_mode_reaches_the_daemon(daemon: DaemonProcess) -> None:
    text = "Hello there. Good day."
    fixed = json.loads(ctl(daemon, "speak", "--long-mode", "fixed", "--json", "--seed", "2", text).stdout)
    sliding = json.loads(ctl(daemon, "speak", "--long-mode", "sliding", "--json", "--seed", "2", text).stdout)
    # Without a voice a request always slides: both spellings are the same cache entry.
    assert sliding["cached"] is True and sliding["cache_key"] == fixed["cache_key"]
    bad = ctl(daemon, "speak", "--long-mode", "window", text)
    assert bad.exit_code == 2 and "window" in bad.output


def test_speak_with_a_voice(daemon: DaemonProcess, tmp_path: Path) -> None:
    # A real prompt file, only very short: the tiny model's work grows with the prompt length.
    rng = np.random.default_rng(0)
    prompt = Prompt(rng.integers(0, 1024, (1, 12, 8)), np.array([[10, 20, 30]]), "en")
    save_prompt(prompt, tmp_path / "short.npz")
    assert ctl(daemon, "preset", "install", str(tmp_path / "short.npz"), "--overwrite").exit_code == 0
    result = ctl(daemon, "speak", "-v", "short", "--seed", "3", "--json", "Hi.")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["duration_s"] > 0


def test_speak_stdout_refuses_a_terminal(daemon: DaemonProcess) -> None:
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run([str(VALLEXCTL), "--socket", str(daemon.socket_path), "speak", "--stdout",
                               "hi"], stdout=terminal, stderr=subprocess.PIPE, timeout=60, env=daemon_env())
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == 2
    assert b"terminal" in done.stderr


def test_play_uses_a_player_from_path(daemon: DaemonProcess, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "played.wav"
    player = bin_dir / "aplay"
    player.write_text(f"#!/bin/sh\n# stands in for alsa's aplay: keep what it was asked to play\n"
                      f"for last; do :; done\ncp \"$last\" {record}\n")
    player.chmod(0o755)
    env = daemon_env({"PATH": f"{bin_dir}:/usr/bin:/bin"})
    done = ctl_proc("--socket", str(daemon.socket_path), "speak", "--play", "Play me.", env=env)
    assert done.returncode == 0, done.stderr
    assert wav_info(record.read_bytes())[0] == 24000

    empty = tmp_path / "empty"
    empty.mkdir()
    done = ctl_proc("--socket", str(daemon.socket_path), "speak", "--play", "x",
                    env=daemon_env({"PATH": str(empty)}))
    assert done.returncode == 4 and b"no audio player" in done.stderr


# --------------------------------------------------------------------------- status, presets, cache


def test_status_human_and_json(daemon: DaemonProcess) -> None:
    human = ctl(daemon, "status")
    assert human.exit_code == 0 and "model:" in human.stdout and "loaded" in human.stdout
    as_json = ctl(daemon, "--json", "status")  # global position
    data = json.loads(as_json.stdout)
    where = "its own thread" if data["nar_thread"] else "the model thread"
    assert f"of {data['max_batch']} rows, {data['threads']} threads, NAR on {where}" in human.stdout
    assert data["pid"] == daemon.pid and data["protocol"] == 1
    assert json.loads(ctl(daemon, "status", "--json").stdout)["pid"] == daemon.pid  # per-command position


def test_presets_install_list_remove(daemon: DaemonProcess, shared_presets_dir: Path) -> None:
    src = shared_presets_dir / "upstream" / "vctk_1.npz"
    installed = ctl(daemon, "--json", "preset", "install", str(src), "--name", "my voice")
    assert installed.exit_code == 0, installed.output
    assert json.loads(installed.stdout)["language"] == "en"

    listed = json.loads(ctl(daemon, "presets", "list", "--json").stdout)["presets"]
    assert "my voice" in [p["name"] for p in listed]
    assert "my voice" in ctl(daemon, "presets", "list").stdout

    again = ctl(daemon, "preset", "install", str(src), "--name", "my voice")
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    assert ctl(daemon, "preset", "install", str(src), "--name", "my voice", "--overwrite").exit_code == 0

    removed = ctl(daemon, "--json", "preset", "remove", "my voice")
    assert removed.exit_code == 0 and json.loads(removed.stdout)["removed"] is True
    gone = ctl(daemon, "preset", "remove", "my voice")
    assert gone.exit_code == 4 and gone.stderr.count("\n") == 1


def test_preset_names_are_checked_before_anything_happens(daemon: DaemonProcess,
                                                         shared_presets_dir: Path) -> None:
    src = shared_presets_dir / "upstream" / "vctk_1.npz"
    result = ctl(daemon, "preset", "install", str(src), "--name", "../../etc/evil")
    assert result.exit_code == 2 and "invalid preset name" in result.stderr
    assert ctl(daemon, "preset", "install", "/no/such/file.npz").exit_code == 4


def test_available_presets_from_the_catalogue(daemon: DaemonProcess) -> None:
    result = ctl(daemon, "presets", "list", "--available", "--json")
    assert result.exit_code == 0
    names = {p["name"] for p in json.loads(result.stdout)["presets"]}
    assert {"paimon", "Y'shtola-Finetuned", "vctk_1"} <= names and len(names) == 53


def test_cache_stats_and_prune_dry_run_then_real(daemon: DaemonProcess) -> None:
    assert ctl(daemon, "speak", "--seed", "99", "Fill the cache.").exit_code == 0
    stats = json.loads(ctl(daemon, "cache", "stats", "--json").stdout)
    assert stats["files"] >= 1 and stats["bytes"] > 0

    dry = ctl(daemon, "--json", "cache", "prune", "--max-size", "0", "--dry-run")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] is True and plan["removed"] == stats["files"]
    assert all((daemon.cache_dir / f).is_file() for f in plan["files"])  # nothing removed yet

    human = ctl(daemon, "cache", "prune", "--older-than", "0s")
    assert human.exit_code == 0 and human.stdout.startswith("removed ")
    after = json.loads(ctl(daemon, "cache", "stats", "--json").stdout)
    assert after["files"] == 0
    assert not any((daemon.cache_dir / f).exists() for f in plan["files"])


def test_cache_prune_needs_a_rule_and_parses_units(daemon: DaemonProcess) -> None:
    assert ctl(daemon, "cache", "prune").exit_code == 2
    bad = ctl(daemon, "cache", "prune", "--max-size", "lots")
    assert bad.exit_code == 2 and "500M" in bad.output
    assert parse_size("2G") == 2 << 30 and parse_size("1.5k") == 1536 and parse_size("4096") == 4096
    assert parse_duration("7d") == 7 * 86400 and parse_duration("1d12h") == 36 * 3600
    with pytest.raises(InvalidArgument):
        parse_duration("7 days")


# --------------------------------------------------------------------------- exit codes


def test_daemon_down_is_exit_3(tmp_path: Path) -> None:
    done = ctl_proc("--socket", str(tmp_path / "nothing.sock"), "status")
    assert done.returncode == 3
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and "cannot reach vallexd" in lines[0] and "systemctl start vallexd" in lines[0]

    stale = tmp_path / "stale.sock"  # a socket file nobody listens on: connection refused
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    result = CliRunner().invoke(cli, ["--socket", str(stale), "--json", "speak", "hi"])
    assert result.exit_code == 3
    assert json.loads(result.stdout)["error"]["reason"] == "DAEMON_UNREACHABLE"

    env = daemon_env({"VALLEXD_SOCKET": str(stale)})
    assert ctl_proc("cache", "stats", env=env).returncode == 3


def test_unknown_voice_is_exit_4(daemon: DaemonProcess) -> None:
    done = ctl_proc("--socket", str(daemon.socket_path), "speak", "-v", "nobody-here", "hi")
    assert done.returncode == 4
    assert done.stderr.decode().count("\n") == 1 and b"presets list" in done.stderr


def test_unwritable_output_is_refused_before_any_work(tmp_path: Path) -> None:
    # The daemon is down, yet the answer is "no such folder" (4), not "unreachable" (3).
    result = CliRunner().invoke(cli, ["--socket", str(tmp_path / "none.sock"), "speak", "-o",
                                      str(tmp_path / "missing" / "a.wav"), "hi"])
    assert result.exit_code == 4 and "does not exist" in result.stderr


def test_usage_errors_are_exit_2(daemon: DaemonProcess) -> None:
    assert ctl(daemon, "speak", "--temperature", "0", "hi").exit_code == 2
    assert ctl(daemon, "speak", "--language", "fr", "hi").exit_code == 2
    assert ctl(daemon, "speak", "--stdout", "--json", "hi").exit_code == 2
    assert exit_code_for(Busy("queue full")) == EXIT_BUSY == 5


# --------------------------------------------------------------------------- the client on the wire


def scripted_server(path: Path, replies: list[Callable[[Any], list[dict[str, Any]]]]) -> threading.Thread:
    """A real Unix socket that answers each request frame with the frames its script makes from the id."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            for reply in replies:
                request = protocol.recv_frame(conn)
                if request is None:
                    return
                for frame in reply(request["id"]):
                    conn.sendall(protocol.pack(frame))
            # then hang up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_client_events_ids_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = scripted_server(path, [
        lambda rid: [protocol.event(rid, "progress", {"done": 1, "total": 2}), protocol.ok(rid, {"x": 1})],
        lambda rid: [protocol.error(rid, Busy("queue full", reason="QUEUE_FULL"))],
        lambda rid: [protocol.ok(rid + 100, {})],  # an answer to some other request
    ])
    events: list[tuple[str, dict[str, Any]]] = []
    with Client(path, timeout=10) as c:
        assert c.call("synthesize", {}, on_event=lambda n, d: events.append((n, d))) == {"x": 1}
        assert events == [("progress", {"done": 1, "total": 2})]
        with pytest.raises(Busy) as busy:
            c.call("status")
        assert busy.value.reason == "QUEUE_FULL" and exit_code_for(busy.value) == 5
        with pytest.raises(ProtocolError) as mismatch:
            c.call("status")
        assert mismatch.value.reason == "ID_MISMATCH"
    server.join(5)

    path2 = tmp_path / "t.sock"
    server = scripted_server(path2, [lambda rid: []])  # reads the request, then hangs up
    with Client(path2, timeout=10) as c, pytest.raises(ProtocolError) as closed:
        c.call("status")
    assert closed.value.reason == "CLOSED"
    server.join(5)


# --------------------------------------------------------------------------- quickstart


def test_quickstart_demo_from_nothing_then_daemon_stop(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = isolated_env(tmp_path, VALLEXD_STATIC_PORT="0", VALLEXD_DEVICE="cpu")
    out = tmp_path / "first.wav"
    done = ctl_proc("quickstart", "--demo", "--text", "Hi.", "-o", str(out), env=env, timeout=180,
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout.decode() and b"noise" in done.stdout
    assert wav_info(out.read_bytes())[0] == 24000
    pid = int((tmp_path / "run" / "vallexd" / "vallexd.pid").read_text())
    assert pid_alive(pid)
    assert (home / ".local" / "state" / "vallexd" / "vallexd.log").is_file()

    try:
        again = ctl_proc("--json", "quickstart", "--demo", "--text", "Hi.", "-o", str(tmp_path / "b.wav"),
                         env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["daemon_reused"] is True
    finally:
        stopped = ctl_proc("daemon", "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert not pid_alive(pid)
    assert ctl_proc("status", env=env).returncode == 3


def test_daemon_stop_never_signals_a_stranger(tmp_path: Path) -> None:
    """A stale pid file whose pid now belongs to another program: refused, the program untouched."""
    env = isolated_env(tmp_path)
    sock_dir = tmp_path / "run" / "vallexd"
    sock_dir.mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        (sock_dir / "vallexd.pid").write_text(f"{stranger.pid}\n")
        done = ctl_proc("daemon", "stop", env=env)  # nothing of ours runs: "not running", exit 0
        assert done.returncode == 0 and b"not running" in done.stdout
        assert stranger.poll() is None
        assert not (sock_dir / "vallexd.pid").exists()
        assert ctl_proc("daemon", "stop", env=env).returncode == 0  # no pid file at all
    finally:
        stranger.kill()
        stranger.wait()


def test_quickstart_offline_says_what_to_do(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, VALLEXCTL_MODELS_BASE_URL="http://127.0.0.1:9")
    done = ctl_proc("quickstart", env=env, timeout=60)
    assert done.returncode == 1
    *_notes, error = done.stderr.decode().splitlines()  # progress notes, then the ONE error line
    assert error.startswith("vallexctl: could not fetch the model weights")
    assert "quickstart --demo" in error and "noise" in error
    assert not (tmp_path / "run" / "vallexd" / "vallexd.pid").exists()  # no daemon was started


def test_daemon_hints_only_on_daemon_errors() -> None:
    """A local failure (e.g. a download) must not be told to look at the daemon."""
    from vallexctl.output import error_line
    from vallexd.errors import Unavailable, VallexError

    local = Unavailable("download failed: connection refused", reason="DOWNLOAD_FAILED")
    assert "daemon" not in error_line(local)
    wire = {"code": "UNAVAILABLE", "message": "shutting down", "reason": "SHUTTING_DOWN"}
    remote = VallexError.from_wire(wire)
    assert remote.remote and "vallexctl status" in error_line(remote)
