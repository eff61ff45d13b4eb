"""Human sizes and durations: parse what users type, format what they read.

Sizes use binary multiples (the way `du -h` and `ls -h` count): 2G = 2 GiB.
Durations accept a number with a unit, or several run together ("1d12h").
Bad input raises `InvalidArgument` whose message shows an accepted example.
"""

from __future__ import annotations

import math
import re

from vallexd.errors import InvalidArgument

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_DURATION_RE = re.compile(r"^\s*(?:\d+(?:\.\d+)?\s*[smhdw]\s*)+$")


def parse_size(text: str) -> int:
    """'2G' -> 2147483648; '500M', '1.5GiB', '4096' (bytes) also work."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise InvalidArgument(
            f"cannot read {text!r} as a size; use a number with an optional unit, e.g. 500M, 2G, 4096",
            reason="BAD_SIZE",
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str) -> float:
    """'7d' -> 604800.0; units s, m, h, d, w; combinations such as '1d12h'."""
    lowered = text.lower()
    if not _DURATION_RE.match(lowered):
        raise InvalidArgument(
            f"cannot read {text!r} as a duration; use a number with a unit s, m, h, d or w, "
            "e.g. 7d, 12h, 1d12h",
            reason="BAD_DURATION",
        )
    return float(sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(lowered)))


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB'; exact bytes below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """90 -> '1m30s'; 0.5 -> '0.5s'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    total = round(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else "", f"{minutes}m" if minutes else "",
             f"{secs}s" if secs and not days else ""]
    return "".join(parts)
