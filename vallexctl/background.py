"""A vallexd in the background, without systemd: start (or reuse), wait until ready, stop.

`vallexctl daemon start|stop` and `quickstart` use this.  The pid file `vallexd.pid` beside
the socket says which daemon vallexctl started; only that one is ever signalled or replaced.
A running daemon that serves other weights than the ones asked for (the demo daemon, when
the real weights are wanted) is replaced when vallexctl started it, and otherwise refused
with what to do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vallexctl.client import Client, ping
from vallexd.errors import InvalidArgument, Unavailable, VallexError

READY_TIMEOUT_S = 300.0  # loading the 1.5 GB checkpoint on a slow disk can take minutes


@dataclass(frozen=True)
class Started:
    pid: int
    reused: bool
    log: Path | None
    checkpoint: Path | None  # what the daemon serves (None: a daemon too old to say)
    replaced: int | None = None  # pid of a daemon of ours that served other weights and was stopped


def pid_file(socket_path: Path) -> Path:
    return socket_path.parent / "vallexd.pid"


def default_log_file() -> Path:
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "vallexd" / "vallexd.log"


def start_daemon(socket_path: Path, *, checkpoint: Path, vocos_dir: Path, log_file: Path,
                 extra_args: Sequence[str] = (), timeout: float = READY_TIMEOUT_S, replace: bool = True,
                 note: Callable[[str], None] | None = None) -> Started:
    """Reuse a daemon serving `checkpoint` at `socket_path`, or start one detached and wait until ready.

    With `replace`, a daemon of ours serving another checkpoint is stopped first and someone
    else's is refused (InvalidArgument OTHER_WEIGHTS, exit 2); without, any running daemon is
    reused. `extra_args` go to vallexd after ours.
    """
    replaced = None
    running = _status(socket_path)
    if running is not None:
        serving = Path(running["checkpoint"]) if running.get("checkpoint") else None
        if serving is None or not replace or _same_file(serving, checkpoint):
            _wait_ready(socket_path, None, log_file, timeout, note)
            return Started(pid=int(running.get("pid") or -1), reused=True, log=None, checkpoint=serving)
        if not _ours(socket_path):
            raise InvalidArgument(
                f"the vallexd at {socket_path} serves {serving}, not {checkpoint}, and was not started by "
                "vallexctl; stop it (e.g. `systemctl --user stop vallexd`) and run this again, or use "
                "another socket with `vallexctl --socket PATH`", reason="OTHER_WEIGHTS")
        if note is not None:
            note(f"vallexctl: restarting vallexd: it served {serving}, not {checkpoint}")
        replaced = stop_daemon(socket_path)
    args = [sys.executable, "-m", "vallexd", "--socket", str(socket_path), "--checkpoint", str(checkpoint),
            "--vocos", str(vocos_dir), *extra_args]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_start = log_file.stat().st_size if log_file.exists() else 0
    with log_file.open("ab") as log:
        # start_new_session: the daemon leaves our process group, so Ctrl-C here or closing the
        # terminal does not take it down; stdin from /dev/null so it never waits on a tty.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True, cwd="/")
    _write_pid(pid_file(socket_path), proc.pid)
    try:
        _wait_ready(socket_path, proc, log_file, timeout, note, log_start)
    except VallexError:
        pid_file(socket_path).unlink(missing_ok=True)
        raise
    return Started(pid=proc.pid, reused=False, log=log_file, checkpoint=checkpoint, replaced=replaced)


def _wait_ready(socket_path: Path, proc: subprocess.Popen[bytes] | None, log_file: Path, timeout: float,
                note: Callable[[str], None] | None, log_start: int = 0) -> None:
    """Until ping says `state: ready`; a daemon that exits while starting is reported from its log."""
    deadline = time.monotonic() + timeout
    told = False
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise _start_failure(proc.returncode, log_file, log_start)
        answer = ping(socket_path, timeout=1.0)
        if answer is not None and answer.get("state", "ready") == "ready":
            return
        if answer is not None and answer.get("state") == "draining":
            raise Unavailable(f"the vallexd at {socket_path} is shutting down; run this again once it has "
                              "stopped", reason="SHUTTING_DOWN")
        if answer is not None and not told and note is not None:
            note(f"vallexctl: vallexd is loading its model (log: {log_file}) ...")
            told = True
        time.sleep(0.25 if answer is not None else 0.1)  # each ping is a line in the daemon's log
    raise Unavailable(f"vallexd was not ready within {timeout:.0f} s; see {log_file}",
                      reason="DAEMON_START_TIMEOUT")


def _start_failure(returncode: int, log_file: Path, log_start: int) -> VallexError:
    """vallexd's own last `vallexd: ...` line from this start (not a traceback's last line)."""
    why = _reason_in_log(log_file, log_start) or f"it exited with status {returncode}"
    message = f"vallexd could not start: {why} (full log: {log_file})"
    if returncode == 2:  # vallexd: a bad configuration
        return InvalidArgument(message, reason="DAEMON_BAD_CONFIG")
    return Unavailable(message, reason="DAEMON_START_FAILED")


def _reason_in_log(log_file: Path, start: int) -> str:
    try:
        with log_file.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith("vallexd: ")]
    return own[-1].removeprefix("vallexd: ") if own else (lines[-1] if lines else "")


def stop_daemon(socket_path: Path, timeout: float = 30.0) -> int | None:
    """SIGTERM the daemon vallexctl started and wait for it; None when no daemon runs at all.

    A daemon that answers but is not ours is refused (VallexError NOT_OURS, exit 1);
    a stale pid file is removed.
    """
    path = pid_file(socket_path)
    pid = _ours(socket_path)
    if pid is None:
        path.unlink(missing_ok=True)  # absent or stale (pids get reused: never signal a stranger)
        if ping(socket_path) is not None:
            raise VallexError(f"the vallexd at {socket_path} was not started by vallexctl: stop it where it "
                              "was started (`systemctl stop vallexd`, `systemctl --user stop vallexd`, or "
                              "Ctrl-C in its terminal)", reason="NOT_OURS")
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    # Identity was checked above; now wait for the process itself to go (an exiting process
    # loses its cmdline before it is gone, so that check would end the wait too early).
    while _alive(pid):
        if time.monotonic() > deadline:
            raise VallexError(f"vallexd (pid {pid}) did not exit within {timeout:.0f} s of SIGTERM; "
                              f"`kill -9 {pid}` ends it without a clean shutdown", reason="STOP_TIMEOUT")
        time.sleep(0.05)
    path.unlink(missing_ok=True)
    return pid


def _ours(socket_path: Path) -> int | None:
    """The pid in the pid file when it is a running vallexd on `socket_path`, else None."""
    try:
        pid = int(pid_file(socket_path).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_vallexd(pid, socket_path) else None


def _status(socket_path: Path) -> dict[str, Any] | None:
    try:
        with Client(socket_path, connect_timeout=2.0, timeout=10.0) as c:
            return c.call("status")
    except VallexError:
        return None


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    return False


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _is_vallexd(pid: int, socket_path: Path) -> bool:
    """Alive and really our vallexd: pids get reused, so a stale pid file may name another program.

    `start_daemon` passes `--socket PATH` on the command line, so both must be there.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return _alive(pid) and b"vallexd" in argv and os.fsencode(str(socket_path)) in argv


def _write_pid(path: Path, pid: int) -> None:
    from vallexctl.output import write_file_atomic

    write_file_atomic(path, f"{pid}\n".encode())
