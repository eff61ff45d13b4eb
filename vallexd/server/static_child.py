"""Supervise the static-file child server (`vallexd.server.static_server`) from the daemon's loop.

The child stays in vallexd's process group (no new session), so a terminal's Ctrl-C
or systemd's KillMode=control-group reaches it too.  It gets the read end of a
lifeline pipe; we keep the write end (close-on-exec, so no other child inherits it)
and the kernel closes it when we die however we die, which makes the child exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from vallexd.errors import Unavailable

log = logging.getLogger("vallexd.server.static_child")

READY_PREFIX = "READY port="
#: How long a fresh child may take to print its ready line.
START_TIMEOUT_S = 15.0
#: Restart backoff: doubles from BACKOFF_MIN_S up to BACKOFF_MAX_S; reset after a stable run.
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_RUN_S = 30.0
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")
#: The folder holding the `vallexd` package (put on the child's PYTHONPATH).
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
#: Pause before supervision resumes after an unexpected error in it.
WATCH_RETRY_S = 1.0


def _installed() -> bool:
    """True if the package lives in a site-packages folder (then the child finds it by itself;
    putting that folder on PYTHONPATH would rank it above the standard library)."""
    import site

    sites = {os.path.realpath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return os.path.realpath(_PACKAGE_PARENT) in sites


class StaticServerError(Unavailable):
    """The child static server could not be started."""


class StaticChild:
    """Start, watch, restart and stop one static server child process."""

    def __init__(self, root: Path, host: str, port: int) -> None:
        self.root = root
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._lifeline_w: int | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise StaticServerError("the static file server is not running", reason="STATIC_DOWN")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child and wait until it listens; raise StaticServerError if it cannot."""
        self._stopping = False
        await self._spawn(self.requested_port)
        self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="static-child-watch")

    async def _spawn(self, port: int) -> None:
        # Always called on the event-loop thread, which lives as long as the daemon: that matters
        # because PR_SET_PDEATHSIG fires when the *thread* that forked the child exits.
        read_fd, write_fd = os.pipe()  # both close-on-exec; read_fd is passed explicitly below
        # The child must not talk to systemd or see activation fds meant for us.
        env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV)}
        # `python -m` puts the working directory first on sys.path: run the child in "/" so a stray
        # module in the daemon's cwd (say a `socket.py`) cannot shadow the standard library there.
        # Our own package stays importable when it runs from a source tree (relative PYTHONPATH
        # entries keep meaning what they meant in our cwd).
        search = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if not _installed():
            search.insert(0, _PACKAGE_PARENT)
        if search:
            env["PYTHONPATH"] = os.pathsep.join(search)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "vallexd.server.static_server",
                "--root", os.path.abspath(self.root), "--host", self.host, "--port", str(port),
                "--lifeline-fd", str(read_fd),
                pass_fds=(read_fd,), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                env=env, cwd="/",
            )
        except OSError:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._proc, self._lifeline_w = proc, write_fd
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        text = line.decode(errors="replace").strip()
        if not text.startswith(READY_PREFIX):
            await self._reap(proc)
            raise StaticServerError(
                f"static file server did not start on {self.host}:{port} (exit status {proc.returncode}; "
                "see its message above)",
                reason="STATIC_START_FAILED",
            )
        self.port = int(text[len(READY_PREFIX):])
        log.info("static server pid %d serving %s at %s", proc.pid, self.root, self.base_url)

    async def _watch(self) -> None:
        """Supervise until stopped; an unexpected error is logged and supervision goes on
        (a silently ended watch would leave the static server dead for good)."""
        while not self._stopping:
            try:
                await self._supervise()
            except Exception:
                log.exception("static server supervision failed; resuming in %.0fs", WATCH_RETRY_S)
                await asyncio.sleep(WATCH_RETRY_S)

    async def _supervise(self) -> None:
        """Restart the child with backoff whenever it dies while we are not stopping."""
        backoff = BACKOFF_MIN_S
        while not self._stopping:
            proc = self._proc
            assert proc is not None and proc.stdout is not None
            started = time.monotonic()
            await proc.stdout.read()  # nothing more is printed; EOF means it exited
            rc = await proc.wait()
            self._close_lifeline()
            if self._stopping:
                return
            if time.monotonic() - started > STABLE_RUN_S:
                backoff = BACKOFF_MIN_S
            log.error("static server pid %d exited with status %s; restarting in %.1fs",
                      proc.pid, rc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            if self._stopping:
                return
            try:
                # Keep the port we had so URLs already handed out stay valid.
                await self._spawn(self.port or self.requested_port)
            except (OSError, StaticServerError) as exc:
                # _spawn reaped the failed child, so the next turn sees it exited and retries.
                log.error("static server restart failed: %s", exc)

    async def _reap(self, proc: asyncio.subprocess.Process, timeout: float = 3.0) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._close_lifeline()

    def _close_lifeline(self) -> None:
        if self._lifeline_w is not None:
            os.close(self._lifeline_w)
            self._lifeline_w = None

    def expect_exit(self) -> None:
        """Shutdown has begun: a child exit from now on is not a crash (systemd and a terminal's
        Ctrl-C signal the whole process group, so the child may go before we stop it)."""
        self._stopping = True

    async def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; idempotent."""
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        if self._proc is not None:
            await self._reap(self._proc, timeout)
            log.info("static server pid %d stopped", self._proc.pid)
        self.port = None
