"""The daemon process: lock, service start, child server, listeners, signals, shutdown.

Start order (each step only after the previous one worked, so clients never reach
a half-started daemon):

    lock <socket>.lock → Service.start() (model load) → static child → listeners
    → sd_notify READY=1

Shutdown (SIGTERM/SIGINT): STOPPING=1 → stop accepting → in-flight requests finish
within config.grace_s → child stopped → socket removed (unless socket-activated:
systemd owns it) → exit 0.  SIGHUP rescans the preset folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from vallexd import __version__
from vallexd.config import Config
from vallexd.errors import VallexError
from vallexd.server import systemd as sd
from vallexd.server.http_api import HttpApi, check_http_config
from vallexd.server.rpc import RpcServer
from vallexd.server.static_child import StaticChild
from vallexd.server.unix_socket import (
    InstanceLock,
    StartupError,
    bind_unix_socket,
    check_socket_path,
    group_id_of,
    prepare_socket_dir,
)

log = logging.getLogger("vallexd")


def setup_logging(level: str) -> None:
    """Log to stderr, one line per record; no timestamps when the journal adds its own."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr,
                        force=True)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.lock = InstanceLock(config.lock_path)
        self.service: Any = None
        self.rpc: RpcServer | None = None
        self.http: HttpApi | None = None
        self.child: StaticChild | None = None
        self.activated = False
        self._socket_inode: tuple[int, int] | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, shut down; returns the exit status."""
        loop = asyncio.get_running_loop()
        try:
            await self._start()
        except BaseException:
            await self._shutdown(quiet=True)  # undo what did start (child, lock), then report
            raise
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_stop_signal, sig)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._rescan()))
            self._ready()
            await self._stop.wait()
        finally:
            await self._shutdown()
        return 0

    # ------------------------------------------------------------------ start
    async def _start(self) -> None:
        cfg = self.config
        inherited = sd.listen_fds()  # read (and clear) first, before any child can inherit the env
        if cfg.http_port is not None:
            try:
                check_http_config(cfg.http_host, cfg.http_token)
            except VallexError as exc:
                raise StartupError(exc.message, exit_code=2) from None
        group_id = group_id_of(cfg.socket_group)
        try:
            prepare_socket_dir(cfg.lock_path, group_id)
        except OSError as exc:
            raise StartupError(f"cannot create {cfg.lock_path.parent}: {exc.strerror or exc}") from None
        self.lock.acquire(cfg.socket_path)
        if not inherited:
            check_socket_path(cfg.socket_path)  # fail before the (slow) model load, not after

        # Import here: service pulls in the worker (and lazily torch); a config error or a
        # held lock should be reported before paying for that.
        from vallexd.service.service import Service

        try:
            self.service = Service(cfg)
        except VallexError as exc:
            raise StartupError(exc.message, exit_code=2) from None
        except OSError as exc:
            where = exc.filename or "the data folders"
            raise StartupError(f"cannot prepare {where}: {exc.strerror}") from None
        started = time.monotonic()
        try:
            await self.service.start()
        except VallexError as exc:
            raise StartupError(f"cannot load the model: {exc.message}") from None
        log.info("model ready in %.1fs", time.monotonic() - started)

        if cfg.static_enabled:
            self.child = StaticChild(cfg.cache_dir, cfg.static_host, cfg.static_port)
            try:
                await self.child.start()
            except (VallexError, OSError) as exc:
                raise StartupError(f"cannot start the static file server: {exc}") from None
            self.service.static_base_url = self.child.base_url

        self.rpc = RpcServer(self.service, max_frame=cfg.max_frame_bytes, max_connections=cfg.max_connections,
                             idle_timeout_s=cfg.idle_timeout_s,
                             max_connections_per_uid=cfg.max_connections_per_uid or None)
        if inherited:
            fd, name = inherited[0]
            if len(inherited) > 1:
                log.warning("socket activation passed %d sockets; serving only the first", len(inherited))
            sock = socket.socket(fileno=fd)
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise StartupError(f"socket-activation fd {fd} ({name}) is not a Unix stream socket", 2)
            sock.setblocking(False)
            self.activated = True
            await self.rpc.start(sock=sock)
            log.info("serving the socket-activated fd %d (%s)", fd, name)
        else:
            sock = bind_unix_socket(cfg.socket_path, cfg.socket_mode, group_id)
            st = cfg.socket_path.stat()
            self._socket_inode = (st.st_dev, st.st_ino)
            await self.rpc.start(sock=sock)
            log.info("listening on %s", cfg.socket_path)

        if cfg.http_port is not None:
            try:
                self.http = HttpApi(self.service, host=cfg.http_host, port=cfg.http_port,
                                    token=cfg.http_token, cors_origins=cfg.http_cors_origins,
                                    max_body=cfg.http_max_body)
                await self.http.start()
            except VallexError as exc:
                raise StartupError(str(exc.message), exit_code=2) from None
            except OSError as exc:
                raise StartupError(f"cannot listen for HTTP on {cfg.http_host}:{cfg.http_port}: "
                                   f"{exc.strerror or exc}") from None
            self.service.http_url = self.http.url

    def _ready(self) -> None:
        where = "socket-activated fd" if self.activated else str(self.config.socket_path)
        parts = [f"vallexd {__version__} on {where}"]
        if self.child is not None:
            parts.append(f"static {self.child.base_url}")
        if self.http is not None:
            parts.append(f"http {self.http.url}")
        status = "; ".join(parts)
        log.info("ready: %s", status)
        sd.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        interval = sd.watchdog_interval()
        if interval:
            self._spawn(self._watchdog(interval))

    # ------------------------------------------------------------------ running
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_stop_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning("%s again: cutting the grace period short", signal.Signals(sig).name)
            self._force.set()
            return
        log.info("%s: shutting down (grace %.0fs)", signal.Signals(sig).name, self.config.grace_s)
        if self.child is not None:
            self.child.expect_exit()
        self._stop.set()

    async def _rescan(self) -> None:
        log.info("SIGHUP: rescanning presets")
        try:
            await self.service.rescan_presets()
        except Exception:
            log.exception("preset rescan failed")

    async def _watchdog(self, interval: float) -> None:
        # Pinging from the event loop proves the loop itself is not stuck.
        while True:
            sd.notify("WATCHDOG=1")
            await asyncio.sleep(interval / 2)

    # ------------------------------------------------------------------ stop
    async def _shutdown(self, *, quiet: bool = False) -> None:
        if self.rpc is not None or self.http is not None:
            sd.notify("STOPPING=1", "STATUS=draining in-flight requests")
        for task in list(self._tasks):
            task.cancel()
        # Drain outside-in: the transports stop taking requests and let the ones they hold finish
        # (including any still in the text front end, before the worker); only then does the
        # service stop its worker. Draining the service first would refuse those half-way requests.
        deadline = time.monotonic() + self.config.grace_s
        if self.rpc is not None:
            self.rpc.stop_accepting()
        if self.http is not None:
            self.http.stop_accepting()
        transports = [t for t in (self.rpc, self.http) if t is not None]
        if transports:
            await self._within_grace(*(t.wait_idle(self.config.grace_s) for t in transports))
        if self.service is not None:
            await self._within_grace(self.service.drain(max(0.0, deadline - time.monotonic())))
        if self.rpc is not None:
            await self.rpc.close()
        if self.http is not None:
            await self.http.stop()
        if self.child is not None:
            await self.child.stop()
        self._remove_socket()
        self.lock.release()
        if not quiet:
            log.info("stopped")

    async def _within_grace(self, *aws: Any) -> None:
        """Await `aws` together, but give up early on a second SIGTERM/SIGINT."""
        work = asyncio.ensure_future(asyncio.gather(*aws, return_exceptions=True))
        force = asyncio.ensure_future(self._force.wait())
        await asyncio.wait([work, force], timeout=self.config.grace_s + 1.0,
                           return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        if not work.done():
            work.cancel()
            log.warning("grace period over: cutting off the remaining requests")

    def _remove_socket(self) -> None:
        """Remove our socket file, but only if it is still ours (same inode) and not systemd's."""
        if self.activated or self._socket_inode is None:
            return
        path = self.config.socket_path
        with contextlib.suppress(FileNotFoundError):
            st = path.lstat()
            if (st.st_dev, st.st_ino) == self._socket_inode:
                path.unlink()
