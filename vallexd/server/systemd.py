"""systemd integration without a dependency on libsystemd or python-systemd.

Three small protocols, each documented in systemd's man pages:

* sd_notify(3): datagrams like ``READY=1`` sent to the AF_UNIX socket named by
  ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``).
* sd_listen_fds(3): socket activation hands over already-listening sockets as
  fds 3..3+N-1, announced by ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``.
* sd_watchdog_enabled(3): ``WATCHDOG_USEC`` (and optionally ``WATCHDOG_PID``)
  ask for ``WATCHDOG=1`` pings more often than that interval.

Everything is a no-op when the variables are absent, so the daemon runs the
same way from a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("vallexd.server.systemd")

#: First fd passed by socket activation (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def _notify_address(raw: str) -> str | bytes:
    # An abstract socket name starts with "@" in the variable and with a NUL byte on the wire.
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(*lines: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=..."``) as one datagram.

    Returns True when a message was sent, False when there is no notify socket.
    A failure to send is logged, never raised: the daemon must not die because
    the service manager went away.
    """
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET")
    if not raw or not lines:
        return False
    if not (raw.startswith("/") or raw.startswith("@")):
        log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract name", raw)
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_notify_address(raw))
            sock.sendall(payload)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", raw, exc)
        return False
    return True


def listen_fds(
    *, unset_environment: bool = True, environ: MutableMapping[str, str] | None = None
) -> list[tuple[int, str]]:
    """Return the sockets passed by socket activation as ``[(fd, name), ...]``.

    Only honoured when ``LISTEN_PID`` is our pid (the variables are inherited by
    children, who must not grab their parent's sockets).  The variables are
    removed afterwards so our own child processes never see them; the fds are
    marked close-on-exec for the same reason.
    """
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names_raw = env.get("LISTEN_FDNAMES")
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    names = names_raw.split(":") if names_raw else []
    result: list[tuple[int, str]] = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        result.append((fd, names[i] if i < len(names) else "unknown"))
    return result


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds within which the manager expects a ``WATCHDOG=1`` ping, or None when off."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000
