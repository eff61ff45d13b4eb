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
import errno
import fcntl
import grp
import logging
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from vallexd import __version__, sd
from vallexd.child import StaticChild
from vallexd.config import Config
from vallexd.errors import VallexError
from vallexd.http_api import HttpApi, check_http_config
from vallexd.rpc import RpcServer

log = logging.getLogger("vallexd")


class StartupError(Exception):
    """The daemon cannot start; `exit_code` is what the process exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def setup_logging(level: str) -> None:
    """Log to stderr, one line per record; no timestamps when the journal adds its own."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr,
                        force=True)


class InstanceLock:
    """flock(2) on `<socket>.lock`: held for the daemon's lifetime, freed by the kernel on any exit.

    The lock file is never deleted: unlinking it would let two daemons lock two
    different inodes under the same name.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, socket_path: Path) -> None:
        # O_NOFOLLOW: a symlink planted at the lock's name must not make us open (and later
        # truncate) some other file; nothing is truncated before the lock is ours.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise StartupError(f"cannot open the lock file {self.path}: {why}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StartupError(f"the lock file {self.path} is not a regular file; refusing to use it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StartupError(
                    f"another vallexd (pid {holder}) is already serving {socket_path}; "
                    f"stop it first or choose another --socket"
                ) from None
            raise StartupError(f"cannot lock {self.path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last fd drops the flock
            self._fd = None


def _socket_dir(path: Path, group_id: int | None) -> None:
    """Create the socket's folder if missing (private, or group-searchable when a group is set),
    then make sure nobody else controls it: the fallback /tmp/vallexd-<uid>/ may have been
    created by another user before us."""
    folder = path.parent
    created = False
    if not folder.is_dir():
        try:
            folder.mkdir(parents=True, mode=0o750 if group_id is not None else 0o700)
            created = True
        except FileExistsError:
            pass  # someone else made it meanwhile: the checks below decide
        if created and group_id is not None:
            os.chown(folder, -1, group_id, follow_symlinks=False)
    check_socket_dir(folder, group_id)


def check_socket_dir(folder: Path, group_id: int | None) -> None:
    """Refuse a socket folder another user could tamper with (StartupError, exit 1).

    It must be a real folder (not a symlink) owned by us, writable by nobody else; group write is
    accepted only when a socket group is configured and the folder belongs to it.  A shared
    sticky folder owned by root (like /tmp itself) is accepted: others cannot replace our entries.
    """
    st = folder.lstat()
    euid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise StartupError(f"the socket folder {folder} is a symbolic link; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"the socket folder {folder} is not a folder")
    if st.st_mode & stat.S_ISVTX and st.st_uid == 0:
        return
    if st.st_uid != euid:
        raise StartupError(
            f"the socket folder {folder} belongs to uid {st.st_uid}, not to us (uid {euid}); "
            f"someone else may control it: remove it or choose another --socket")
    if st.st_mode & stat.S_IWOTH:
        raise StartupError(f"the socket folder {folder} is writable by other users; "
                           f"fix its mode (chmod o-w) or choose another --socket")
    if st.st_mode & stat.S_IWGRP and (group_id is None or st.st_gid != group_id):
        raise StartupError(f"the socket folder {folder} is writable by its group; "
                           f"fix its mode (chmod g-w) or choose another --socket")


def _chmod_nofollow(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode, follow_symlinks=False)
    except (NotImplementedError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        # No lchmod here: chmod only what is still the socket we just bound (not a link).
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(errno.EPERM, "the socket was replaced before chmod") from None
        os.chmod(path, mode)


def check_socket_path(path: Path) -> bool:
    """True if a (stale) socket file is at `path`; refuse anything else that is in the way."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    return True


def bind_unix_socket(path: Path, mode: int, group_id: int | None) -> socket.socket:
    """Bind and listen on `path` with `mode`/group set BEFORE listen(), so nobody connects early.

    Call only while holding the instance lock: a leftover socket file then belongs
    to a dead daemon and is replaced; anything that is not a socket is left alone.
    """
    if check_socket_path(path):
        log.info("replacing stale socket %s left by a previous run", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        _chmod_nofollow(path, mode)
        if group_id is not None:
            os.chown(path, -1, group_id, follow_symlinks=False)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise StartupError(f"socket group {name!r} does not exist", exit_code=2) from None


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
        group_id = _group_id(cfg.socket_group)
        try:
            _socket_dir(cfg.lock_path, group_id)
        except OSError as exc:
            raise StartupError(f"cannot create {cfg.lock_path.parent}: {exc.strerror or exc}") from None
        self.lock.acquire(cfg.socket_path)
        if not inherited:
            check_socket_path(cfg.socket_path)  # fail before the (slow) model load, not after

        # Import here: service pulls in the worker (and lazily torch); a config error or a
        # held lock should be reported before paying for that.
        from vallexd.service import Service

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
                             idle_timeout_s=cfg.idle_timeout_s)
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
        if self.service is not None:
            close = getattr(self.service, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
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
