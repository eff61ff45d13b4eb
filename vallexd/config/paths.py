"""Default locations: XDG base directories for a user, RuntimeDirectory=/StateDirectory=/
CacheDirectory= under systemd. Torch-free: the client imports `default_paths` to find the socket."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vallexd.constants import CHECKPOINT_FILE, ENCODEC_FILE, VOCOS_DIR, WHISPER_DEFAULT_SIZE, WHISPER_DIR


@dataclass(frozen=True)
class DefaultPaths:
    socket_path: Path
    presets_dir: Path
    cache_dir: Path
    models_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.models_dir / CHECKPOINT_FILE

    @property
    def vocos_dir(self) -> Path:
        return self.models_dir / VOCOS_DIR

    @property
    def encodec(self) -> Path:
        return self.models_dir / ENCODEC_FILE

    @property
    def whisper(self) -> Path:
        return self.models_dir / WHISPER_DIR / f"{WHISPER_DEFAULT_SIZE}.pt"


def default_paths(environ: Mapping[str, str] | None = None) -> DefaultPaths:
    """Where things live when nothing is configured.

    Under systemd the unit's RuntimeDirectory=/StateDirectory=/CacheDirectory=
    export RUNTIME_DIRECTORY etc. (possibly colon-separated lists; the first
    entry is ours); otherwise the XDG base directories of the user.
    """
    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())

    def first(name: str) -> Path | None:
        value = env.get(name, "")
        head = value.split(":")[0]
        return Path(head) if head else None

    data_home = first("XDG_DATA_HOME") or home / ".local" / "share"
    runtime = first("RUNTIME_DIRECTORY")
    state = first("STATE_DIRECTORY")
    cache = first("CACHE_DIRECTORY")

    if runtime is not None:
        socket_path = runtime / "vallexd.sock"
    elif (xdg_runtime := first("XDG_RUNTIME_DIR")) is not None:
        socket_path = xdg_runtime / "vallexd" / "vallexd.sock"
    else:
        # No per-user runtime dir (e.g. a plain ssh session without logind): a
        # per-uid folder in /tmp; the daemon creates it 0700 so others cannot squat it.
        socket_path = Path("/tmp") / f"vallexd-{os.getuid()}" / "vallexd.sock"

    presets_dir = state / "presets" if state else data_home / "vallexd" / "presets"
    models_dir = state / "models" if state else data_home / "vallexd" / "models"
    cache_dir = cache if cache is not None else (first("XDG_CACHE_HOME") or home / ".cache") / "vallexd"
    return DefaultPaths(socket_path, presets_dir, cache_dir, models_dir)
