"""Validation of the wire params of docs/protocol.md (torch-free).

Every check happens here, before anything is queued or written, so bad input
gets a precise `InvalidArgument`/`TooLarge` and changes nothing.  Reasons used:

    UNKNOWN_FIELD, MISSING_FIELD, BAD_TYPE, OUT_OF_RANGE, BAD_VALUE,
    BAD_NAME, BAD_TEXT, EMPTY_TEXT, UNKNOWN_LANGUAGE, TEXT_TOO_LONG

`details` always carries {"field": <param name>} so clients can point at it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from vallexd.audio.formats import check_format, check_speed
from vallexd.constants import ACCENTS, MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE, REQUEST_LANGUAGES
from vallexd.errors import InvalidArgument, TooLarge, text_too_long

RETURN_MODES = ("audio", "path")
MAX_SEED = 2**63
_ECHO_MAX = 64  # unknown keys are echoed back at most this long
NAME_MAX = 64
# Letters (any script), digits, "_", "-", ".", "'" and space (checked separately: not
# starting with ".", no leading/trailing space, and short enough in UTF-8 for a file name).
_NAME_RE = re.compile(r"[\w\-.' ]+")  # used with fullmatch: "$" would accept a trailing newline
_NAME_MAX_UTF8 = 240  # name + ".npz" + temp-file decoration must stay under NAME_MAX (255 bytes)
# C0 controls other than tab/newline/CR cannot be spoken and usually mean binary junk.
_BAD_TEXT_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

LongMode = Literal["auto"] | bool
#: How the pieces of a long text are prompted (the reference's two modes): "fixed" = every piece by
#: the voice; "sliding" = after each piece, on a coin, by the piece just made.  Without a voice a
#: request always slides.  None = the default: fixed with a voice.
LONG_MODES = ("fixed", "sliding")


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    voice: str | None = None
    language: str = "auto"
    accent: str = "native"
    long: LongMode = "auto"
    long_mode: str | None = None  # "fixed" | "sliding" | None (see LONG_MODES)
    seed: int | None = None
    top_k: int = 0
    temperature: float = 1.0
    return_mode: str = "audio"  # wire name: "return"
    progress: bool = False
    fresh: bool = False  # regenerate even on a cache hit, and replace the entry
    format: str = "wav"  # of the returned/streamed audio; the cache always keeps WAV
    speed: float = 1.0  # tempo of the returned/streamed audio (pitch unchanged)
    stream: bool = False  # the transport sends the audio piece by piece (socket `audio` events)


@dataclass(frozen=True)
class InstallRequest:
    name: str
    data: bytes
    overwrite: bool = False


@dataclass(frozen=True)
class PruneRequest:
    max_age_s: float | None = None
    max_bytes: int | None = None
    dry_run: bool = False


def _params(params: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidArgument("params must be a map", reason="BAD_TYPE", details={"field": "params"})
    for key in params:
        if key not in allowed:
            shown = str(key)[:_ECHO_MAX]
            raise InvalidArgument(
                f"unknown field {shown!r}; accepted: {', '.join(allowed)}",
                reason="UNKNOWN_FIELD",
                details={"field": shown},
            )
    return params


def _bad_type(field: str, expected: str, value: Any) -> InvalidArgument:
    return InvalidArgument(
        f"{field} must be {expected}, got {type(value).__name__}", reason="BAD_TYPE", details={"field": field}
    )


def _bool(params: dict[str, Any], field: str, default: bool) -> bool:
    value = params.get(field, default)
    if not isinstance(value, bool):
        raise _bad_type(field, "a boolean", value)
    return value


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # bool is a subclass of int: refuse it
        raise _bad_type(field, "an integer", value)
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_type(field, "a number", value)
    try:
        result = float(value)
    except OverflowError:  # an int too large for a float
        raise InvalidArgument(f"{field} is out of range", reason="OUT_OF_RANGE",
                              details={"field": field}) from None
    if not math.isfinite(result):
        raise InvalidArgument(f"{field} must be finite", reason="OUT_OF_RANGE", details={"field": field})
    return result


def _choice(params: dict[str, Any], field: str, default: str, choices: tuple[str, ...],
            reason: str = "BAD_VALUE") -> str:
    value = params.get(field, default)
    if not isinstance(value, str):
        raise _bad_type(field, "a string", value)
    if value not in choices:
        raise InvalidArgument(
            f"{field} must be one of {', '.join(choices)}, got {value[:40]!r}",
            reason=reason,
            details={"field": field, "allowed": list(choices)},
        )
    return value


def validate_name(name: Any, field: str = "name") -> str:
    """A preset name, NFC-normalised: 1-64 of letters, digits, `_ - . '` and space, not starting with '.'.

    Returns the NFC form: every place a name enters (install, lookup, HTTP, socket, the
    presets folders) calls this and uses the result, so `Tugão` typed composed and decomposed
    (macOS file names) are one name. Never a path: '/', '\\', NUL and a leading '.' (hence
    '..') are all refused; the error names the first offending code point.
    """
    if not isinstance(name, str):
        raise _bad_type(field, "a string", name)
    name = unicodedata.normalize("NFC", name)
    if (
        not (1 <= len(name) <= NAME_MAX)
        or name.startswith(".")
        or name != name.strip(" ")
        or not _NAME_RE.fullmatch(name)
        or len(name.encode("utf-8", "replace")) > _NAME_MAX_UTF8
    ):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidArgument(
            f"invalid preset name {shown!r}{_name_problem(name)}: use 1-{NAME_MAX} letters, digits, "
            "'_', '-', '.', \"'\" or spaces, not starting with '.' nor starting/ending with a space",
            reason="BAD_NAME",
            details={"field": field},
        )
    return name


def _name_problem(name: str) -> str:
    """Which rule a (NFC) name breaks, naming the code point: the name may print exactly like a
    valid one (a combining mark, a look-alike space, a control character)."""
    for i, ch in enumerate(name):
        if not _NAME_RE.fullmatch(ch):
            label = unicodedata.name(ch, unicodedata.category(ch))
            return f" (character {i + 1} is U+{ord(ch):04X} {label}, which is not allowed)"
    if not name:
        return " (empty)"
    if len(name) > NAME_MAX or len(name.encode("utf-8", "replace")) > _NAME_MAX_UTF8:
        return " (too long)"
    return ""


def is_valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidArgument:
        return False
    return True


def validate_text(value: Any, max_chars: int) -> str:
    """A text to speak: InvalidArgument (MISSING_FIELD, BAD_TYPE, BAD_TEXT for NUL/control
    characters) or TooLarge (TEXT_TOO_LONG, over `max_chars` characters)."""
    if value is None:
        raise InvalidArgument("text is required", reason="MISSING_FIELD", details={"field": "text"})
    if not isinstance(value, str):
        raise _bad_type("text", "a string", value)
    if len(value) > max_chars:
        raise text_too_long(len(value), max_chars)
    if _BAD_TEXT_RE.search(value):
        raise InvalidArgument("text contains NUL or control characters", reason="BAD_TEXT",
                              details={"field": "text"})
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a sloppy JSON client
        raise InvalidArgument("text is not valid Unicode", reason="BAD_TEXT",
                              details={"field": "text"}) from None
    if not value.strip():
        raise InvalidArgument("text is empty", reason="EMPTY_TEXT", details={"field": "text"})
    return value


SYNTHESIZE_FIELDS = ("text", "voice", "language", "accent", "long", "long_mode", "seed", "top_k",
                     "temperature", "return", "progress", "fresh", "format", "speed", "stream")


def validate_synthesize(params: Any, *, max_text_chars: int) -> SynthesisRequest:
    """Every `synthesize` param of docs/protocol.md, typed and range-checked; unknown fields are
    refused (UNKNOWN_FIELD). Errors name the field in `details["field"]`."""
    p = _params(params, SYNTHESIZE_FIELDS)
    text = validate_text(p.get("text"), max_text_chars)

    voice = p.get("voice")
    if voice is not None:
        voice = validate_name(voice, "voice")

    language = _choice(p, "language", "auto", REQUEST_LANGUAGES, reason="UNKNOWN_LANGUAGE")
    accent = _choice(p, "accent", "native", ACCENTS)

    long: LongMode = p.get("long", "auto")
    if long != "auto" and not isinstance(long, bool):
        raise InvalidArgument('long must be true, false or "auto"', reason="BAD_TYPE",
                              details={"field": "long"})

    long_mode = p.get("long_mode")
    if long_mode is not None:
        long_mode = _choice(p, "long_mode", "fixed", LONG_MODES)

    seed = p.get("seed")
    if seed is not None:
        seed = _int(seed, "seed")
        if not 0 <= seed < MAX_SEED:
            raise InvalidArgument("seed must be within 0 <= seed < 2**63", reason="OUT_OF_RANGE",
                                  details={"field": "seed"})

    top_k = _int(p.get("top_k", 0), "top_k")
    if not 0 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be within 0..{MAX_TOP_K} (0 disables it)", reason="OUT_OF_RANGE",
                              details={"field": "top_k"})

    temperature = _number(p.get("temperature", 1.0), "temperature")
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgument(f"temperature must be within {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}",
                              reason="OUT_OF_RANGE",
                              details={"field": "temperature"})

    return_mode = _choice(p, "return", "audio", RETURN_MODES)
    fmt = check_format(p.get("format", "wav"))
    speed = check_speed(p.get("speed", 1.0))
    if return_mode == "path" and (fmt != "wav" or speed != 1.0):
        # The path is the cache's canonical WAV; other formats exist only as returned bytes.
        raise InvalidArgument('return "path" gives the cached WAV: format must be wav and speed 1.0',
                              reason="BAD_VALUE", details={"field": "format"})

    return SynthesisRequest(
        text=text,
        voice=voice,
        language=language,
        accent=accent,
        long=long,
        long_mode=long_mode,
        seed=seed,
        top_k=top_k,
        temperature=temperature,
        return_mode=return_mode,
        progress=_bool(p, "progress", False),
        fresh=_bool(p, "fresh", False),
        format=fmt,
        speed=speed,
        stream=_bool(p, "stream", False),
    )


def required_name(p: dict[str, Any]) -> str:
    """p["name"], present and a valid preset name (NFC): InvalidArgument MISSING_FIELD / BAD_NAME."""
    if "name" not in p:
        raise InvalidArgument("name is required", reason="MISSING_FIELD", details={"field": "name"})
    return validate_name(p["name"])


def required_bytes(p: dict[str, Any], field: str, expected: str) -> bytes:
    """p[field], present and binary: InvalidArgument MISSING_FIELD / BAD_TYPE naming `expected`."""
    value = p.get(field)
    if value is None:
        raise InvalidArgument(f"{field} is required", reason="MISSING_FIELD", details={"field": field})
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _bad_type(field, expected, value)
    return bytes(value)


def validate_install(params: Any, *, max_bytes: int) -> InstallRequest:
    """`presets.install` params: a valid name, `data` bytes of at most `max_bytes`, `overwrite`."""
    p = _params(params, ("name", "data", "overwrite"))
    name = required_name(p)
    data = required_bytes(p, "data", "binary (.npz bytes)")
    if len(data) > max_bytes:
        raise TooLarge(f"preset upload of {len(data)} bytes exceeds the limit of {max_bytes} bytes",
                       reason="UPLOAD_TOO_LARGE", details={"field": "data", "limit": max_bytes})
    if not data:
        raise InvalidArgument("data is empty", reason="BAD_PROMPT", details={"field": "data"})
    return InstallRequest(name=name, data=data, overwrite=_bool(p, "overwrite", False))


def validate_remove(params: Any) -> str:
    """`presets.remove` params: the preset name."""
    p = _params(params, ("name",))
    if "name" not in p:
        raise InvalidArgument("name is required", reason="MISSING_FIELD", details={"field": "name"})
    return validate_name(p["name"])


def _optional_non_negative(p: dict[str, Any], field: str, parse: Callable[[Any, str], Any]) -> Any:
    """p[field] parsed and >= 0, or None when absent."""
    value = p.get(field)
    if value is None:
        return None
    value = parse(value, field)
    if value < 0:
        raise InvalidArgument(f"{field} must be >= 0", reason="OUT_OF_RANGE", details={"field": field})
    return value


def validate_prune(params: Any) -> PruneRequest:
    """`cache.prune` params: `max_age_s` (seconds) and `max_bytes`, each >= 0 or absent; `dry_run`."""
    p = _params(params, ("max_age_s", "max_bytes", "dry_run"))
    max_age = _optional_non_negative(p, "max_age_s", _number)
    max_bytes = _optional_non_negative(p, "max_bytes", _int)
    if max_age is None and max_bytes is None:
        # An empty prune is almost certainly a mistake; "clear everything" is max_bytes=0.
        raise InvalidArgument("give max_age_s and/or max_bytes (max_bytes=0 empties the cache)",
                              reason="MISSING_FIELD", details={"field": "max_age_s"})
    return PruneRequest(max_age_s=max_age, max_bytes=max_bytes, dry_run=_bool(p, "dry_run", False))


def validate_empty(params: Any) -> None:
    """Methods without params (status, cache.stats, ...) still refuse unknown fields."""
    _params(params, ())
