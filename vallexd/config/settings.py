"""The one frozen `Config` the daemon reads once at start (built by `options.load_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vallexd.errors import InvalidArgument
from vallexd.protocol import DEFAULT_MAX_REQUEST_FRAME


class ConfigError(InvalidArgument):
    """A configuration value is unusable; `details` names the source and key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(
            f"invalid configuration: {key} from {source}: {problem}",
            reason="BAD_CONFIG",
            details={"source": source, "key": key},
        )


@dataclass(frozen=True)
class Config:
    socket_path: Path
    lock_path: Path
    checkpoint: Path | None
    vocos_dir: Path | None
    presets_dirs: tuple[Path, ...]
    cache_dir: Path
    socket_mode: int = 0o660
    socket_group: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = torch's default
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    http_token: str | None = None
    http_cors_origins: tuple[str, ...] = ()
    http_max_body: int = DEFAULT_MAX_REQUEST_FRAME
    static_host: str = "127.0.0.1"
    static_port: int = 8080
    static_enabled: bool = True
    queue_limit: int = 16
    request_timeout_s: float = 600.0
    max_text_chars: int = 5000
    max_frame_bytes: int = DEFAULT_MAX_REQUEST_FRAME
    max_connections: int = 64
    idle_timeout_s: float = 300.0
    grace_s: float = 30.0
    log_level: str = "INFO"
    # Extras beyond the architecture contract:
    max_upload_bytes: int = 4 * 1024 * 1024  # a 15 s prompt is ~75 KB; this leaves ample room
    long_budget: int | None = None  # phoneme budget per piece for long text; None = front-end default
    max_connections_per_uid: int = 0  # socket connections one peer uid may hold; 0 = half of max_connections

    @property
    def presets_install_dir(self) -> Path:
        """Where `presets.install` writes: the first presets dir."""
        return self.presets_dirs[0]
