"""The audio formats clients may ask for, their HTTP types and the speed range (no numpy, no
FFmpeg: vallexctl imports this to check options without loading either)."""

from __future__ import annotations

from typing import Any

from vallexd.errors import InvalidArgument

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
#: What HTTP answers carry for each format (opus is in an Ogg container; pcm is raw s16le).
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
#: File name extensions, for clients that pick a format from an output path.
EXTENSIONS = {"mp3": "mp3", "opus": "opus", "aac": "aac", "flac": "flac", "wav": "wav", "pcm": "pcm"}
MIN_SPEED, MAX_SPEED = 0.25, 4.0


def check_format(fmt: Any, field: str = "format") -> str:
    """`fmt` if it is one of FORMATS, else InvalidArgument(BAD_VALUE) naming `field`."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        shown = fmt[:40] if isinstance(fmt, str) else type(fmt).__name__
        raise InvalidArgument(f"{field} must be one of {', '.join(FORMATS)}, got {shown!r}",
                              reason="BAD_VALUE", details={"field": field, "allowed": list(FORMATS)})
    return fmt


def check_speed(speed: Any, field: str = "speed") -> float:
    """`speed` as a float within 0.25..4.0, else InvalidArgument (BAD_TYPE / OUT_OF_RANGE)."""
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise InvalidArgument(f"{field} must be a number", reason="BAD_TYPE", details={"field": field})
    if not MIN_SPEED <= float(speed) <= MAX_SPEED:
        raise InvalidArgument(f"{field} must be within {MIN_SPEED:g}..{MAX_SPEED:g}", reason="OUT_OF_RANGE",
                              details={"field": field})
    return float(speed)
