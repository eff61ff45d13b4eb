"""The one frozen `Config` the daemon reads once at start (built by `options.load_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vallexd.errors import InvalidArgument
from vallexd.protocol import DEFAULT_MAX_REQUEST_FRAME

#: OpenAI's voice names -> presets of the catalogue (English speakers), for clients that only
#: know those names (`voice_aliases` replaces or extends the table; `vallexctl preset install NAME`).
DEFAULT_VOICE_ALIASES: dict[str, str] = {
    "alloy": "acou_1", "ash": "acou_2", "ballad": "acou_3", "coral": "acou_4",
    "echo": "librispeech_1", "fable": "vctk_1", "onyx": "librispeech_2", "nova": "vctk_2",
    "sage": "librispeech_3", "shimmer": "vctk_3", "verse": "librispeech_4", "marin": "vctk_4",
    "cedar": "neutral",
}


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
    quantize: str = "none"  # int8 weight matmuls: none | nar | all (inference/quantize.py)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    max_batch: int = 4  # AR rows decoded together (see bench/bench_serving.py)
    nar_thread: str = "auto"  # NAR + vocoder on a second thread: auto | on | off
    compile: bool = False  # torch.compile at start
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
    wyoming_uri: str | None = None  # tcp://HOST:PORT or unix://PATH; None = no Wyoming server
    wyoming_allow_remote: bool = False  # Wyoming has no auth: a non-loopback address needs this
    # Voices from recordings (presets.create): EnCodec and Whisper weights, loaded on first use.
    encodec: Path | None = None
    whisper: Path | None = None
    max_audio_bytes: int = 10 * 1024 * 1024  # a 15 s 48 kHz stereo float WAV is 5.8 MB
    whisper_idle_s: float = 600.0  # Whisper medium holds ~3 GB: released after this idle time; 0 = keep
    # OpenAI voice name -> preset, for /v1/audio/speech (the defaults merged with the configured ones).
    voice_aliases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_VOICE_ALIASES))
    max_connections_per_uid: int = 0  # socket connections one peer uid may hold; 0 = half of max_connections
    # Replicas on Ray Serve (`vallexd-ray`, vallexd.serve): read by it only; the daemon ignores them.
    ray_address: str | None = None  # an existing cluster ("auto", "HOST:6379"); None = start a local one
    ray_replicas: int = 1  # replicas when autoscaling is off
    ray_replica_cpus: float = 1.0  # CPUs each replica reserves (fractions allowed)
    ray_replica_gpus: float = 0.0  # GPUs each replica reserves (1 = one GPU per replica)
    ray_min_replicas: int | None = None  # set with ray_max_replicas to autoscale
    ray_max_replicas: int | None = None
    ray_target_ongoing: float = 2.0  # autoscaling: requests in progress per replica to aim for

    @property
    def presets_install_dir(self) -> Path:
        """Where `presets.install` writes: the first presets dir."""
        return self.presets_dirs[0]
