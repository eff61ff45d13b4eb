"""What a synthesis returns to the transports: one typed result, and its wire form."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SynthesisResult:
    """One synthesis, from the cache or the model.

    audio: the bytes in `format` (None for `return: path` or a streamed result); path: the cache
    file, always WAV (None when the cache could not be written); url: that file on the static server
    (None when it is off); duration_s: seconds of the delivered audio (after a speed change);
    pieces: model runs (0 for a cache hit); timings: milliseconds per stage, for the log;
    replica: which model replica answered (vallexd.serve only; an HTTP header, not in the wire map).
    """

    cache_key: str
    duration_s: float
    sample_rate: int
    cached: bool
    pieces: int
    path: Path | None = None
    url: str | None = None
    audio: bytes | None = None
    format: str = "wav"  # of `audio` (the cached file at `path` is always WAV)
    timings: dict[str, float] = field(default_factory=dict)
    replica: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The `synthesize` result map of docs/protocol.md (bytes stay bytes: msgpack bin)."""
        wire: dict[str, Any] = {
            "sample_rate": self.sample_rate,
            "duration_s": self.duration_s,
            "cached": self.cached,
            "cache_key": self.cache_key,
            "path": str(self.path) if self.path is not None else None,
            "url": self.url,
            "pieces": self.pieces,
            "format": self.format,
            "timings": dict(self.timings),
        }
        if self.audio is not None:
            wire["audio"] = self.audio
        return wire
