"""Start a real `python -m vallexd` subprocess for tests, and talk to it over its socket.

    d = start_daemon(tmp_path, tiny_models, extra_args=["--http-port", "0"])
    with d.client() as c:
        assert c.call("ping")["pong"]
    d.stop()                      # SIGTERM; returns the exit status

Everything the daemon writes lives under `workdir` (socket, lock, cache, presets,
log), so tests can snapshot that tree.  The daemon's stderr goes to `workdir/daemon.log`
(a file, not a pipe, so a chatty daemon can never block on a full pipe).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vallexd import protocol
from vallexd.errors import VallexError

READY_TIMEOUT_S = 90.0


class RpcClient:
    """A minimal blocking client of the socket protocol (one connection)."""

    def __init__(self, path: Path | str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._next_id = 0

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(protocol.pack(message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """Next frame, or None when the daemon closed the connection."""
        try:
            return protocol.recv_frame(self.sock)
        except ConnectionResetError:
            return None

    def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict]:
        """Send one request; return (events, response) without interpreting errors."""
        self._next_id += 1
        rid = self._next_id
        self.send(protocol.request(rid, method, params))
        events: list[dict[str, Any]] = []
        while True:
            frame = self.recv()
            if frame is None:
                raise ConnectionError(f"daemon closed the connection during {method}")
            if "event" in frame:
                events.append(frame)
                continue
            assert frame.get("id") == rid, frame
            return events, frame

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Result of `method`, or raise the daemon's error as a VallexError."""
        _, response = self.request(method, params)
        if not response["ok"]:
            raise VallexError.from_wire(response["error"])
        return response["result"]


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    workdir: Path
    socket_path: Path
    cache_dir: Path
    presets_dir: Path
    log_path: Path
    args: list[str] = field(default_factory=list)
    #: Filled from `status` once the daemon is ready (None when that server is off).
    static_url: str | None = None
    http_url: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout: float = 60.0) -> RpcClient:
        return RpcClient(self.socket_path, timeout)

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        with self.client(timeout) as c:
            return c.call(method, params)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the daemon's log matches `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log_text())
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"log never matched {pattern!r}; log tail:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll `ping` until it answers with the model loaded; fail early with the log if the process exits.

        The socket listens while the model still loads (`state: "loading"`): wait for "ready".
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"vallexd exited with {self.proc.returncode} before it was ready; "
                                     f"log:\n{self.log_text()}")
            with contextlib.suppress(OSError, ConnectionError):
                if self.call("ping", timeout=5.0).get("state", "ready") == "ready":
                    status = self.call("status", timeout=10.0)
                    self.static_url, self.http_url = status.get("static_url"), status.get("http_url")
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"vallexd not ready after {timeout}s; log:\n{self.log_text()}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def children(self) -> list[int]:
        """Pids of the daemon's direct child processes (Linux /proc)."""
        return child_pids(self.pid)


def child_pids(pid: int) -> list[int]:
    result = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the ")" that ends the command name, which may contain spaces.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            result.append(int(entry.name))
    return result


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def daemon_command(workdir: Path, tiny_models: Any, extra_args: Sequence[str] = ()) -> list[str]:
    """`python -m vallexd ...` with every path inside `workdir` and the static server on a free port."""
    return [
        sys.executable, "-m", "vallexd",
        "--socket", str(workdir / "vallexd.sock"),
        "--checkpoint", str(tiny_models.checkpoint),
        "--vocos", str(tiny_models.vocos_dir),
        "--cache-dir", str(workdir / "cache"),
        "--presets-dir", str(workdir / "presets"),
        "--static-port", "0",
        "--device", "cpu",
        *extra_args,
    ]


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without anything systemd- or vallexd-specific that could leak in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VALLEXD_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_"))}
    env.update(extra or {})
    return env


def start_daemon(
    workdir: Path,
    tiny_models: Any,
    extra_args: Sequence[str] = (),
    *,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    pass_fds: Sequence[int] = (),
    wait: bool = True,
) -> DaemonProcess:
    """Start a daemon whose files all live in `workdir`; by default wait until it answers ping.

    `command` replaces the command line (e.g. a launcher for socket activation); it must
    still use the paths `daemon_command` puts in `workdir`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "presets").mkdir(exist_ok=True)
    args = command or daemon_command(workdir, tiny_models, extra_args)
    log_path = workdir / "daemon.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=workdir,
                                env=daemon_env(env), pass_fds=tuple(pass_fds))
    daemon = DaemonProcess(proc, workdir, workdir / "vallexd.sock", workdir / "cache", workdir / "presets",
                           log_path, args)
    if wait:
        daemon.wait_ready()
    return daemon


@contextlib.contextmanager
def running_daemon(workdir: Path, tiny_models: Any, extra_args: Sequence[str] = (),
                   **kwargs: Any) -> Iterator[DaemonProcess]:
    """Context manager form: the daemon is stopped (SIGTERM, then SIGKILL) on exit."""
    daemon = start_daemon(workdir, tiny_models, extra_args, **kwargs)
    try:
        yield daemon
    finally:
        daemon.stop()


def tree_snapshot(root: Path, exclude: Sequence[Path] = ()) -> set[str]:
    """Relative paths of everything under `root` except the `exclude` subtrees (for 'nothing written')."""
    skip = [p.resolve() for p in exclude]
    result: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath).resolve()
        dirnames[:] = [d for d in dirnames if (here / d).resolve() not in skip]
        for name in filenames + dirnames:
            path = here / name
            if path.resolve() not in skip:
                result.add(str(path.relative_to(root.resolve())))
    return result
