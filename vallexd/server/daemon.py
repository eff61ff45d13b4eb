"""The daemon process: lock, service start, child server, listeners, signals, shutdown.

Start order (each step only after the previous one worked):

    config check → lock <socket>.lock → Service → static child → socket (and HTTP) listen
    → model load → Wyoming listen → sd_notify READY=1

The socket listens before the model loads (seconds for the real checkpoint): `ping` and
`status` answer at once with `state: "loading"`, and `synthesize` is refused with
UNAVAILABLE / MODEL_LOADING until the model is in (clients wait, as vallexctl does).
READY=1 still means "the model is loaded", as systemd's Type=notify expects.

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
from vallexd.errors import ErrorCode, VallexError
from vallexd.server import systemd as sd
from vallexd.server.http_api import HttpApi, check_http_config
from vallexd.server.metrics import Metrics
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


#: Load failures that are the configuration's fault (exit 2), and the option to change.
#: reason -> (the option at fault, a value that always loads)
_CONFIG_REASONS = {"BAD_DTYPE": ("--dtype", "auto"), "BAD_DEVICE": ("--device", "auto"),
                   "DEVICE_UNAVAILABLE": ("--device", "auto"), "BAD_QUANTIZE": ("--quantize", "none")}


def load_failure(exc: VallexError) -> tuple[str, int]:
    """One sentence for a failed model load, naming the file or option and the fix; and the exit code."""
    cause = exc.__cause__ if isinstance(exc.__cause__, VallexError) else exc
    detail = cause.message.removeprefix("cannot load the model: ")
    fix = _CONFIG_REASONS.get(cause.reason or "")
    if fix is not None:
        option, safe = fix
        return (f"cannot load the model: {detail}; change {option} "
                f"(or VALLEXD_{option[2:].upper()}), e.g. {option} {safe}"), 2
    if cause.code == ErrorCode.NOT_FOUND:
        return (f"cannot load the model: {detail}; fetch the files with `vallexctl models fetch` "
                "or point --checkpoint/--vocos at them"), 1
    if cause.code == ErrorCode.INVALID_ARGUMENT:  # a file that exists but is not usable
        return (f"cannot load the model: {detail}; check the files with `vallexctl models verify`, "
                "then delete the damaged one and run `vallexctl models fetch`"), 1
    return f"cannot load the model: {detail}", 1


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.lock = InstanceLock(config.lock_path)
        self.service: Any = None
        self.rpc: RpcServer | None = None
        self.http: HttpApi | None = None
        self.child: StaticChild | None = None
        self.wyoming: Any = None  # server.wyoming.WyomingServer, imported only when configured
        self.metrics = Metrics()
        self.activated = False
        self._socket_inode: tuple[int, int] | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inherited: list[tuple[int, str]] = []
        self._group_id: int | None = None
        #: True when SIGTERM came while the model was still loading (its thread is left to exit).
        self.load_abandoned = False
        self._exit_code = 0

    async def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, shut down; returns the exit status."""
        try:
            await self._start()
        except BaseException:
            await self._shutdown(quiet=True)  # undo what did start (child, lock), then report
            raise
        try:
            self._install_signal_handlers()
            if await self._load_model():
                self._ready()
                await self._stop.wait()
        finally:
            await self._shutdown()
        return self._exit_code

    # ------------------------------------------------------------------ start
    async def _start(self) -> None:
        """Everything before the model load, in order; each step only after the previous one worked."""
        self._inherited = sd.listen_fds()  # read (and clear) first, before any child can inherit the env
        self._check_config()
        self._take_lock()
        self._make_service()
        await self._start_static_child()
        await self._listen_socket()
        await self._listen_http()

    def _check_config(self) -> None:
        """Refuse an unusable HTTP setup (exit 2) before anything else happens."""
        cfg = self.config
        if cfg.http_port is not None:
            try:
                check_http_config(cfg.http_host, cfg.http_token)
            except VallexError as exc:
                raise StartupError(exc.message, exit_code=2) from None
        if cfg.wyoming_uri is not None:
            self.wyoming = self._make_wyoming()  # a bad URI fails here, before the model load

    def _take_lock(self) -> None:
        """The socket folder, the instance lock, and (unless activated) a socket path we may replace."""
        cfg = self.config
        self._group_id = group_id_of(cfg.socket_group)
        try:
            prepare_socket_dir(cfg.lock_path, self._group_id)
        except OSError as exc:
            raise StartupError(f"cannot create {cfg.lock_path.parent}: {exc.strerror or exc}") from None
        self.lock.acquire(cfg.socket_path)
        if not self._inherited:
            check_socket_path(cfg.socket_path)

    def _make_service(self) -> None:
        """The service, with its stores; the model is loaded later by `_load_model`."""
        # Import here: service pulls in the worker (and lazily torch); a config error or a
        # held lock should be reported before paying for that.
        from vallexd.service.service import Service

        try:
            self.service = Service(self.config)
        except VallexError as exc:
            raise StartupError(exc.message, exit_code=2) from None
        except OSError as exc:
            where = exc.filename or "the data folders"
            raise StartupError(f"cannot prepare {where}: {exc.strerror}") from None

    async def _start_static_child(self) -> None:
        cfg = self.config
        if not cfg.static_enabled:
            return
        self.child = StaticChild(cfg.cache_dir, cfg.static_host, cfg.static_port)
        try:
            await self.child.start()
        except (VallexError, OSError) as exc:
            raise StartupError(
                f"cannot start the static file server on {cfg.static_host}:{cfg.static_port}: {exc}; "
                "pick another port with --static-port PORT (0 = any free port) or turn it off with "
                "--no-static") from None
        self.service.static_base_url = self.child.base_url

    async def _listen_socket(self) -> None:
        """Serve the socket now, before the model loads: ping and status answer `state: loading`."""
        cfg = self.config
        self.rpc = RpcServer(self.service, max_frame=cfg.max_frame_bytes, max_connections=cfg.max_connections,
                             idle_timeout_s=cfg.idle_timeout_s,
                             max_connections_per_uid=cfg.max_connections_per_uid or None)
        self.rpc.use_metrics(self.metrics)
        if self._inherited:
            fd, name = self._inherited[0]
            if len(self._inherited) > 1:
                log.warning("socket activation passed %d sockets; serving only the first",
                            len(self._inherited))
            sock = socket.socket(fileno=fd)
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise StartupError(f"socket-activation fd {fd} ({name}) is not a Unix stream socket", 2)
            sock.setblocking(False)
            self.activated = True
            await self.rpc.start(sock=sock)
            log.info("serving the socket-activated fd %d (%s)", fd, name)
        else:
            sock = bind_unix_socket(cfg.socket_path, cfg.socket_mode, self._group_id)
            st = cfg.socket_path.stat()
            self._socket_inode = (st.st_dev, st.st_ino)
            await self.rpc.start(sock=sock)
            log.info("listening on %s", cfg.socket_path)

    async def _listen_http(self) -> None:
        """The optional HTTP API, also before the model: /health says 503 until it is loaded."""
        cfg = self.config
        if cfg.http_port is None:
            return
        try:
            self.http = HttpApi.from_config(self.service, cfg)
            self.http.use_metrics(self.metrics)
            await self.http.start()
        except VallexError as exc:
            raise StartupError(str(exc.message), exit_code=2) from None
        except OSError as exc:
            raise StartupError(f"cannot listen for HTTP on {cfg.http_host}:{cfg.http_port}: "
                               f"{exc.strerror or exc}") from None
        self.service.http_url = self.http.url

    def _install_signal_handlers(self) -> None:
        # Before the model load: SIGTERM while loading must shut down cleanly (socket removed).
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._rescan()))

    async def _load_model(self) -> bool:
        """Load the model while the listeners already answer; False when stopped before it was loaded.

        A load failure is a StartupError: exit 2 when the configuration asks for the impossible
        (a dtype or device this machine lacks), else 1.
        """
        started = time.monotonic()
        load = asyncio.ensure_future(self.service.start())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([load, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not load.done():
            # The load runs in a thread that cannot be interrupted: leave it to the process exit.
            self.load_abandoned = True
            load.cancel()
            log.info("stopped before the model finished loading")
            return False
        exc = load.exception()
        if exc is not None:
            if isinstance(exc, VallexError):
                message, exit_code = load_failure(exc)
                raise StartupError(message, exit_code) from None
            raise exc
        log.info("model ready in %.1fs", time.monotonic() - started)
        self.service.worker.on_fatal = self._on_fatal
        self.metrics.attach(self.service)
        await self._start_wyoming()
        return True

    # Wyoming (optional, off by default): built before the model load so a bad --wyoming-uri
    # fails fast, started once the model is in, drained and closed with the other transports.
    def _make_wyoming(self) -> Any:
        from vallexd.server.wyoming import WyomingServer

        cfg = self.config
        try:
            return WyomingServer(None, cfg.wyoming_uri or "", allow_remote=cfg.wyoming_allow_remote,
                                 max_event_bytes=cfg.max_frame_bytes, socket_mode=cfg.socket_mode,
                                 group_id=group_id_of(cfg.socket_group))
        except VallexError as exc:
            raise StartupError(exc.message, exit_code=2) from None

    async def _start_wyoming(self) -> None:
        if self.wyoming is None:
            return
        self.wyoming.service = self.service
        self.wyoming.use_metrics(self.metrics)
        await self.wyoming.start()

    def _ready(self) -> None:
        where = "socket-activated fd" if self.activated else str(self.config.socket_path)
        parts = [f"vallexd {__version__} on {where}"]
        if self.child is not None:
            parts.append(f"static {self.child.base_url}")
        if self.http is not None:
            parts.append(f"http {self.http.url}")
        if self.wyoming is not None:
            parts.append(f"wyoming {self.wyoming.url}")
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

    def _on_fatal(self, err: VallexError) -> None:
        """The accelerator failed for good (a poisoned CUDA context): stop and exit 1 so that
        systemd (Restart=on-failure) starts a fresh process; the worker already refuses work."""
        log.critical("%s: shutting down with exit status 1 for a restart", err.message)
        sd.notify("STATUS=accelerator failed; exiting for a restart")
        self._exit_code = 1
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
        if self.rpc is not None or self.http is not None or self.wyoming is not None:
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
        if self.wyoming is not None:
            self.wyoming.stop_accepting()
        transports = [t for t in (self.rpc, self.http, self.wyoming) if t is not None]
        if transports:
            await self._within_grace(*(t.wait_idle(self.config.grace_s) for t in transports))
        if self.service is not None:
            await self._within_grace(self.service.drain(max(0.0, deadline - time.monotonic())))
        if self.rpc is not None:
            await self.rpc.close()
        if self.http is not None:
            await self.http.stop()
        if self.wyoming is not None:
            await self.wyoming.close()
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
