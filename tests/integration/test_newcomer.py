"""Issue 14: the newcomer's path, through the real `vallexctl` and real daemons on tiny weights.

Every failing command is checked for its exit code and for ONE stderr line that names the next
step.  The first test is the whole journey of a fresh HOME; the others take one item each
(the issue's item numbers are in the test names' docstrings).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import soundfile as sf
from cli_harness import VALLEXCTL, ScratchUser, error_line, preset_file, tone, write_catalogue
from daemon_harness import DaemonProcess, daemon_env, pid_alive
from loopback_http import serving

from vallexctl.client import Client
from vallexctl.output import error_line as format_error
from vallexd.errors import VallexError

DAEMON_OPTS = ["--", "--threads", "1", "--static-port", "0", "--device", "cpu"]


# --------------------------------------------------------------------------- the journey


def test_fresh_home_demo_then_real_weights(tiny_models: object, tmp_path: Path) -> None:
    """quickstart --demo → daemon stop → daemon start → quickstart from a mirror → speak (items 1, 10,
    17, 19)."""
    user = ScratchUser(tmp_path, VALLEXD_QUEUE_LIMT="3")  # a typo the daemon must warn about
    first = user.ctl("quickstart", "--demo", "--text", "Hi.", "-o", "demo.wav", *DAEMON_OPTS)
    assert first.returncode == 0, first.stderr
    assert "noise" in first.stdout and (tmp_path / "demo.wav").stat().st_size > 44
    assert (user.demo_dir / "DEMO-WEIGHTS.txt").is_file()
    assert "did you mean VALLEXD_QUEUE_LIMIT?" in user.log_file.read_text()
    demo_pid = int((user.socket_path.parent / "vallexd.pid").read_text())

    # Item 19: a reused daemon reports its real pid.
    again = user.ctl("--json", "quickstart", "--demo", "--text", "Hi.", "-o", "again.wav")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["daemon_pid"] == demo_pid and json.loads(again.stdout)["demo"] is True

    # Item 19: --from-audio finds the demo EnCodec.
    made = user.ctl("preset", "install", "--from-audio", str(tone(tmp_path / "me.wav", 0.4)),
                    "--transcript", "Hello.", "--name", "me", "-l", "en")
    assert made.returncode == 0, made.stderr

    # Item 17: the demo weights are recognised by `models verify`.
    verify = user.ctl("models", "verify", "--dir", str(user.demo_dir))
    assert verify.returncode == 0, verify.stderr
    assert "demo weights" in verify.stdout and "delete" not in verify.stdout

    stopped = user.ctl("daemon", "stop")
    assert stopped.returncode == 0 and not pid_alive(demo_pid)
    # Item 10: nothing running is not an error.
    twice = user.ctl("daemon", "stop")
    assert twice.returncode == 0 and "not running" in twice.stdout and twice.stderr == ""
    # Item 10: a plain start without real weights names the demo weights and how to start them.
    plain = user.ctl("daemon", "start")
    assert plain.returncode == 4
    line = error_line(plain)
    assert "vallexctl models fetch" in line and "vallexctl daemon start --demo" in line
    assert str(user.demo_dir) in line
    # Item 17: `models verify` of the empty models folder mentions the demo weights too.
    missing = user.ctl("models", "verify")
    assert missing.returncode == 4 and "daemon start --demo" in missing.stderr.splitlines()[-1]
    demo = user.ctl("--json", "daemon", "start", "--demo", *DAEMON_OPTS)
    assert demo.returncode == 0, demo.stderr
    assert json.loads(demo.stdout)["demo"] is True

    # Item 1: quickstart with a mirror fetches the real (here: tiny) weights and replaces the demo
    # daemon it started itself; the JSON says which weights spoke.
    with serving(tiny_models.root) as mirror:  # type: ignore[attr-defined]
        real = user.ctl("--json", "quickstart", "--base-url", mirror.url, "--text", "Hi.", "-o", "real.wav",
                        *DAEMON_OPTS)
    assert real.returncode == 0, real.stderr
    data = json.loads(real.stdout)
    assert data["demo"] is False and data["models_dir"] == str(user.models_dir)
    assert data["daemon_reused"] is False and data["daemon_pid"] != json.loads(demo.stdout)["pid"]
    assert "restarting vallexd" in real.stderr and str(user.demo_dir) in real.stderr
    status = json.loads(user.ctl("--json", "status").stdout)
    assert status["checkpoint"] == str(user.models_dir / "vallex-checkpoint.pt")

    spoken = user.ctl("speak", "-o", "hello.wav", "Hello, world.")
    assert spoken.returncode == 0, spoken.stderr
    assert sf.info(str(tmp_path / "hello.wav")).samplerate == 24000
    final = user.ctl("daemon", "stop")
    assert final.returncode == 0 and "stopped vallexd" in final.stdout


def test_a_daemon_not_ours_with_other_weights_is_not_touched(tmp_path: Path,
                                                             daemon: DaemonProcess) -> None:
    """Item 1: quickstart never stops a daemon vallexctl did not start; it says what to do."""
    user = ScratchUser(tmp_path)
    done = user.ctl("--socket", str(daemon.socket_path), "quickstart", "--demo", "-o", "x.wav")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]  # after the "making demo weights" note
    assert "was not started by vallexctl" in line and "stop it" in line
    assert daemon.proc.poll() is None


# --------------------------------------------------------------------------- one daemon for the rest


@pytest.fixture(scope="module")
def daemon(daemon_factory: Callable[..., DaemonProcess],
           tmp_path_factory: pytest.TempPathFactory) -> DaemonProcess:
    # Item 6 (socket_mode written as in systemd units) and item 13 (no static server).
    config = tmp_path_factory.mktemp("config") / "vallexd.toml"
    config.write_text("socket_mode = 600\nstatic = false\n")
    return daemon_factory("newcomer", ["--config", str(config), "--threads", "1"])


def ctl(daemon: DaemonProcess, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VALLEXCTL, "--socket", str(daemon.socket_path), *args], capture_output=True,
                          text=True, timeout=timeout, env={**daemon_env(), **(env or {})})


def test_toml_socket_mode_digits_are_octal(daemon: DaemonProcess) -> None:
    """Item 6: `socket_mode = 600` in TOML means 0o600, as SocketMode=600 in a unit."""
    assert stat.S_IMODE(daemon.socket_path.stat().st_mode) == 0o600


def test_no_none_without_static_server(daemon: DaemonProcess) -> None:
    """Item 13."""
    spoken = ctl(daemon, "speak", "--seed", "5", "Hi.")
    assert spoken.returncode == 0, spoken.stderr
    assert "None" not in spoken.stdout and spoken.stdout.splitlines()[0].endswith(".wav")
    status = ctl(daemon, "status")
    assert "static url:     off" in status.stdout and "None" not in status.stdout


def test_speak_fresh_is_a_new_take(daemon: DaemonProcess) -> None:
    """Item 18: unseeded text comes from the cache, unless --fresh."""
    first = json.loads(ctl(daemon, "--json", "speak", "Once more.").stdout)
    cached = json.loads(ctl(daemon, "--json", "speak", "Once more.").stdout)
    fresh = json.loads(ctl(daemon, "--json", "speak", "--fresh", "Once more.").stdout)
    assert first["cached"] is False and cached["cached"] is True and fresh["cached"] is False
    assert fresh["cache_key"] == first["cache_key"]


def test_usage_errors_are_one_line(daemon: DaemonProcess) -> None:
    """Item 4."""
    done = ctl(daemon, "speak", "-l", "fr", "x")
    assert done.returncode == 2
    line = error_line(done)
    assert "'fr' is not one of" in line and "see `vallexctl speak --help`" in line


def test_a_failing_player_is_an_error(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Item 12."""
    player = tmp_path / "bin" / "paplay"
    player.parent.mkdir()
    player.write_text("#!/bin/sh\nexit 3\n")
    player.chmod(0o755)
    done = ctl(daemon, "speak", "--play", "Hi.", env={"PATH": f"{player.parent}:{os.environ['PATH']}"})
    assert done.returncode == 1
    line = error_line(done)
    assert "paplay exited with status 3" in line and "-o FILE" in line


def test_closed_pipe_is_quiet(daemon: DaemonProcess) -> None:
    """Item 14: the reader went away: no message, 141 as for a tool killed by SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before vallexctl writes anything
    try:
        done = subprocess.run([VALLEXCTL, "--socket", str(daemon.socket_path), "status"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, env=daemon_env())
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == ""


def test_messages_do_not_repeat_themselves(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Item 15: the daemon's advice and vallexctl's hint are said once."""
    npz = preset_file(tmp_path / "twice.npz")
    assert ctl(daemon, "preset", "install", str(npz)).returncode == 0
    again = ctl(daemon, "preset", "install", str(npz))
    assert again.returncode == 1
    line = error_line(again)
    assert line.count("replace it") == 1 and "--overwrite" in line and "set overwrite" not in line
    busy = VallexError.from_wire({"code": "BUSY", "message": "the queue is full (1 waiting); retry later",
                                  "reason": "QUEUE_FULL"})
    assert format_error(busy).count("retry") == 1 and format_error(busy).count("queue is full") == 1


def test_sha256_is_checked_before_downloading(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Item 15: a malformed --sha256 is a usage error before any request."""
    preset_file(tmp_path / "p.npz")
    with serving(tmp_path) as server:
        done = ctl(daemon, "preset", "install", f"{server.url}/p.npz", "--sha256", "xyz")
        assert server.log == []
    assert done.returncode == 2 and "64 hex digits" in error_line(done)


def test_offline_preset_install_says_what_to_do(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Item 16: cannot reach the catalogue's URL → check the network, or install a file."""
    catalogue = write_catalogue(tmp_path / "c.toml", "http://127.0.0.1:9",
                                [("paimon", preset_file(tmp_path / "paimon.npz"))])
    done = ctl(daemon, "preset", "install", "paimon", env={"VALLEXCTL_CATALOGUE": str(catalogue)})
    assert done.returncode == 1
    line = error_line(done)
    assert "cannot reach" in line and "network" in line and "preset install FILE.npz --name paimon" in line


def test_client_default_uses_the_vallexctl_socket(daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """Item 5: Client.default() resolves the socket as vallexctl does."""
    monkeypatch.setenv("VALLEXD_SOCKET", str(daemon.socket_path))
    with Client.default() as c:
        assert c.wait_ready(5)["state"] == "ready"
    monkeypatch.delenv("VALLEXD_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert Client.default().socket_path == tmp_path / "vallexd" / "vallexd.sock"


# --------------------------------------------------------------------------- setup without a daemon


def test_help_has_the_answers(tmp_path: Path) -> None:
    """Item 3: `models fetch --help` lists the files and URLs; item 19: `--help` the /tmp fallback;
    item 7: daemon options go after --."""
    user = ScratchUser(tmp_path)
    fetch_help = user.ctl("models", "fetch", "--help").stdout
    assert "vallex-checkpoint.pt" in fetch_help
    assert "https://huggingface.co/Plachta/VALL-E-X/resolve/main/vallex-checkpoint.pt" in fetch_help
    assert "https://dl.fbaipublicfiles.com/encodec/v0/encodec_24khz-d7cc33bc.th" in fetch_help
    assert "/tmp/vallexd-UID" in " ".join(user.ctl("--help").stdout.split())
    assert "vallexctl daemon start -- --threads 1" in user.ctl("daemon", "start", "--help").stdout


def test_fetch_404_says_what_is_in_place(tiny_models: object, tmp_path: Path) -> None:
    """Item 16: a mirror missing a file: which files are in place, and what to do (exit 4)."""
    user = ScratchUser(tmp_path)
    partial = tmp_path / "mirror"
    partial.mkdir()
    (partial / "vallex-checkpoint.pt").write_bytes(tiny_models.checkpoint.read_bytes())  # type: ignore[attr-defined]
    with serving(partial) as mirror:
        done = user.ctl("models", "fetch", "--base-url", mirror.url, "--no-encodec")
    assert done.returncode == 4
    line = error_line(done)
    assert "HTTP 404" in line and "already in place: vallex-checkpoint.pt" in line
    assert "run `vallexctl models fetch` again" in line


def test_ctrl_c_during_fetch_says_rerun_resumes(tmp_path: Path) -> None:
    """Item 16: Ctrl-C → one line saying that running it again resumes; exit 130."""
    user = ScratchUser(tmp_path)
    silent = socket.socket()  # accepts, never answers: the download waits
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    # As at a terminal: Ctrl-C's signal is not ignored (a runner started in the background with
    # `&` or nohup ignores SIGINT, and a child inherits that, so Python would never see it).
    proc = subprocess.Popen([VALLEXCTL, "models", "fetch", "--base-url",
                             f"http://127.0.0.1:{silent.getsockname()[1]}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=user.env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        conn, _ = silent.accept()  # the request arrived
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        conn.close()
    finally:
        silent.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "run `vallexctl models fetch` again to resume" in lines[0]


def test_model_load_errors_name_the_file_and_the_fix(tiny_models: object, tmp_path: Path) -> None:
    """Item 11, and item 19's static port: one sentence each, through `daemon start`."""
    user = ScratchUser(tmp_path)
    models = user.install_models(tiny_models)
    config = models / "vocos-encodec-24khz" / "config.yaml"
    config.write_text("feature_extractor: [unclosed\n")
    broken = user.ctl("daemon", "start", *DAEMON_OPTS)
    assert broken.returncode == 1
    line = error_line(broken)
    assert str(config) in line and "vallexctl models verify" in line and "' ^'" not in line
    assert line.count("cannot load the model") == 1

    config.write_bytes((tiny_models.vocos_dir / "config.yaml").read_bytes())  # type: ignore[attr-defined]
    (models / "vallex-checkpoint.pt").write_bytes(os.urandom(4096))
    garbage = user.ctl("daemon", "start", *DAEMON_OPTS)
    assert garbage.returncode == 1
    line = error_line(garbage)
    assert "vallex-checkpoint.pt" in line and "weights_only" not in line and "models fetch" in line

    user.install_models(tiny_models)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        taken = user.ctl("daemon", "start", "--", "--threads", "1", "--static-port",
                         str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert taken.returncode == 1
    line = error_line(taken)
    assert "--static-port" in line and "--no-static" in line
    assert not (user.socket_path.parent / "vallexd.pid").exists()


@pytest.fixture
def loaded_user(tiny_models: object, tmp_path: Path) -> Iterator[ScratchUser]:
    user = ScratchUser(tmp_path)
    user.install_models(tiny_models)
    yield user
    user.ctl("daemon", "stop")


def test_daemon_options_after_double_dash(loaded_user: ScratchUser) -> None:
    """Item 7: `daemon start -- OPTIONS` reaches vallexd; a misplaced --socket is a usage error."""
    started = loaded_user.ctl("--json", "daemon", "start", "--", "--threads", "1", "--static-port", "0",
                              "--queue-limit", "3")
    assert started.returncode == 0, started.stderr
    status = json.loads(loaded_user.ctl("--json", "status").stdout)
    assert status["queue_limit"] == 3 and status["threads"] == 1
    wrong = loaded_user.ctl("daemon", "start", "--", "--socket", "/tmp/x.sock")
    assert wrong.returncode == 2 and "vallexctl --socket PATH daemon start" in error_line(wrong)


def test_stop_with_a_stale_pid_file_is_not_running(loaded_user: ScratchUser) -> None:
    """Item 10: `daemon stop` of a stale pid file (the pid now someone else's): not running, exit 0."""
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        loaded_user.socket_path.parent.mkdir(parents=True, exist_ok=True)
        (loaded_user.socket_path.parent / "vallexd.pid").write_text(f"{stranger.pid}\n")
        done = loaded_user.ctl("daemon", "stop")
        assert done.returncode == 0 and "not running" in done.stdout
        assert stranger.poll() is None  # never signalled
        assert not (loaded_user.socket_path.parent / "vallexd.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_stop_refuses_a_daemon_not_ours(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Item 10: `daemon stop` of a daemon vallexctl did not start is refused, and says where to stop it."""
    user = ScratchUser(tmp_path)
    done = user.ctl("--socket", str(daemon.socket_path), "daemon", "stop")
    assert done.returncode == 1
    assert "not started by vallexctl" in error_line(done) and "systemctl" in error_line(done)
    assert daemon.proc.poll() is None
