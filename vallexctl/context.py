"""The per-invocation state every vallexctl command reads (click's ctx.obj): socket, timeout, --json.

Commands reach the daemon through `state().client()`, never by importing `vallexctl.cli`,
so the command modules and the group do not import each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from vallexctl.client import Client

SYSTEM_SOCKET = Path("/run/vallexd/vallexd.sock")


def default_socket() -> Path:
    """$VALLEXD_SOCKET; else the daemon's own default for this user; else the system service's socket
    if only that exists.

    A user's shell has no RUNTIME_DIRECTORY, so the daemon's default resolves to the per-user
    path; when only the system service (systemd/vallexd.socket) is running, use its socket.
    """
    from vallexd.config import default_paths

    if os.environ.get("VALLEXD_SOCKET"):
        return Path(os.environ["VALLEXD_SOCKET"])
    mine = default_paths().socket_path
    if not mine.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return mine


@dataclass
class State:
    """Per-invocation options shared by every command (ctx.obj)."""

    socket_path: Path
    json: bool = False
    timeout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self) -> Client:
        """A connection to the daemon (use as a context manager)."""
        return Client(self.socket_path, timeout=self.timeout)


def state(ctx: click.Context | None = None) -> State:
    ctx = ctx or click.get_current_context()
    obj = ctx.find_object(State)
    assert obj is not None, "the vallexctl group sets State"
    return obj


