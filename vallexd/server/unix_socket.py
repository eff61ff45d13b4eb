"""The daemon's Unix socket: the instance lock, checks on the socket's folder, and binding.

Security rules (why): the fallback folder /tmp/vallexd-<uid>/ could be pre-created by another
user, so the folder must be ours and not writable by others; the lock file is opened with
O_NOFOLLOW; the socket's mode and group are set before listen() so nobody connects early.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger("vallexd")


class StartupError(Exception):
    """The daemon cannot start; `exit_code` is what the process exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code



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


def prepare_socket_dir(path: Path, group_id: int | None) -> None:
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


def group_id_of(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise StartupError(f"socket group {name!r} does not exist", exit_code=2) from None
