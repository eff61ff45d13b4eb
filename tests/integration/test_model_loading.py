"""Issue 14 item 9: the daemon listens before its model is loaded, and says so.

The load is held open for as long as the test wants by a Linux file lease on a copy of the
checkpoint (fcntl F_SETLEASE F_WRLCK in a helper process): the daemon's real `open()` of the real
file blocks until the helper lets go. No hook in the daemon, no mock.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from daemon_harness import DaemonProcess, RpcClient, daemon_env, start_daemon

VALLEXCTL = [str(Path(sys.executable).with_name("vallexctl"))]

LEASE_HOLDER = """
import fcntl, os, signal, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)  # the kernel signals the holder when a reader waits
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
except OSError as exc:  # a file system without leases (NFS, some overlays)
    print(f"no lease: {exc}", flush=True)
    sys.exit(0)
print("held", flush=True)
sys.stdin.readline()
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
os.close(fd)
"""


class HeldCheckpoint:
    """A copy of the tiny checkpoint that nobody can open until `release()`."""

    def __init__(self, tiny_models: object, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "vallex-checkpoint.pt"
        shutil.copyfile(tiny_models.checkpoint, self.path)  # type: ignore[attr-defined]
        self.models = SimpleNamespace(checkpoint=self.path, vocos_dir=tiny_models.vocos_dir)  # type: ignore[attr-defined]
        self.proc = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(self.path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.answer = self.proc.stdout.readline().strip()

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(10)


@pytest.fixture
def held(tiny_models: object, tmp_path: Path) -> Iterator[HeldCheckpoint]:
    lease = HeldCheckpoint(tiny_models, tmp_path / "models")
    if lease.answer != "held":
        pytest.skip(f"cannot hold the checkpoint open with a file lease here ({lease.answer})")
    try:
        yield lease
    finally:
        lease.release()


def ping_when_listening(d: DaemonProcess, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert d.proc.poll() is None, d.log_text()
        try:
            with RpcClient(d.socket_path, 5.0) as c:
                return c.call("ping")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def ctl(d: DaemonProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VALLEXCTL, "--socket", str(d.socket_path), *args], capture_output=True,
                          text=True, timeout=timeout, env=daemon_env())


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_listening_while_the_model_loads(held: HeldCheckpoint, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d", held.models, ["--threads", "1"], wait=False)
    try:
        assert ping_when_listening(d)["state"] == "loading"
        status = ctl(d, "status")
        assert status.returncode == 0, status.stderr
        assert "model:          loading" in status.stdout
        with RpcClient(d.socket_path) as c:
            assert c.call("status")["state"] == "loading"
            _, refused = c.request("synthesize", {"text": "Hi.", "language": "en"})
        assert refused["ok"] is False and refused["error"]["code"] == "UNAVAILABLE"
        assert refused["error"]["reason"] == "MODEL_LOADING"

        # Out of patience: exit 5 ("retry later"), one line that names the next step.
        impatient = ctl(d, "--timeout", "1", "speak", "Hi.")
        assert impatient.returncode == 5, impatient.stderr
        line = impatient.stderr.strip().splitlines()[-1]
        assert "still loading" in line and "--timeout" in line

        # A patient speak: a note while it waits, then the WAV once the model is in.
        out = tmp_path / "hi.wav"
        speak = subprocess.Popen([*VALLEXCTL, "--socket", str(d.socket_path), "speak", "-o", str(out), "Hi."],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=daemon_env())
        time.sleep(1.5)
        assert speak.poll() is None  # still waiting
        held.release()
        stdout, stderr = speak.communicate(timeout=120)
        assert speak.returncode == 0, stderr
        assert "loading its model; waiting" in one_line(stderr)
        assert out.stat().st_size > 44 and str(out) in stdout
        assert ctl(d, "--json", "status").stdout.count('"state": "ready"') == 1
    finally:
        held.release()
        assert d.stop() == 0, d.log_text()


def test_sigterm_while_loading_exits_cleanly(held: HeldCheckpoint, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "d", held.models, ["--threads", "1"], wait=False)
    try:
        assert ping_when_listening(d)["state"] == "loading"
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log_text()  # without waiting for the blocked load
        assert not d.socket_path.exists()
        assert "stopped before the model finished loading" in d.log_text()
    finally:
        held.release()
        d.kill()
