"""`POST /v1/audio/voices`: make a voice from an uploaded recording (multipart form), and
`voice_entry`, the one shape of a voice on the HTTP API (listing and creation alike).

Form fields: `file` (the recording: WAV, FLAC, OGG, MP3, M4A, WebM...; required), `name`
(required), `transcript` (optional: without it Whisper writes it), `language` (en, zh, ja or
auto), `overwrite` and `keep_audio` (true/false).  Parsed with aiohttp's streaming multipart
reader: the file is read in chunks and refused (413 TOO_LARGE AUDIO_TOO_LARGE) as soon as it
passes the limit, so an oversized upload is never held in memory whole.  The answer (201) is
`voice_entry` plus `transcript`, `transcribed` and `audio_kept`; errors are the API's usual
`{"error": {code, message, reason, details}}` (HttpApi's middleware: Origin, Host and token
checks apply here as everywhere).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from vallexd.errors import InvalidArgument
from vallexd.server.transport import ServiceLike
from vallexd.service.voices import audio_too_large

ROUTE = "/v1/audio/voices"
TEXT_FIELDS = ("name", "transcript", "language", "overwrite", "keep_audio")
BOOL_FIELDS = ("overwrite", "keep_audio")
_TEXT_FIELD_MAX = 64 * 1024  # a 5000-character transcript is at most 20 KB of UTF-8
_CHUNK = 64 * 1024
#: Room for the form's boundaries and small fields when comparing Content-Length with the limit.
_FORM_SLACK = 256 * 1024


def voice_entry(described: Mapping[str, Any]) -> dict[str, Any]:
    """One voice as `GET /v1/audio/voices` lists it and `POST /v1/audio/voices` returns it.

    `described` is an entry of `presets.list` (`Preset.describe`). Shape:
    {"id": name, "name": name, "object": "voice", "language": "en"|"zh"|"ja",
     "duration_s": float, "frames": int, "source": "installed" | folder}
    """
    name = str(described["name"])
    return {
        "id": name,
        "name": name,
        "object": "voice",
        "language": described.get("language"),
        "duration_s": described.get("duration_s"),
        "frames": described.get("frames"),
        "source": described.get("source"),
    }


def owns(request: web.Request) -> bool:
    """True for this module's own request (POST beside OpenAI's GET /v1/audio/voices): its errors
    keep vallexd's wire shape, since OpenAI defines no such route."""
    return request.method == "POST" and request.path == ROUTE


def add_routes(app: web.Application, service: ServiceLike, *, max_audio_bytes: int) -> None:
    """Register POST /v1/audio/voices on `app` (HttpApi's application)."""

    async def create_voice(request: web.Request) -> web.Response:
        params = await read_form(request, max_audio_bytes)
        result = await service.presets_create(params)
        body = {**voice_entry(result), "transcript": result.get("transcript"),
                "transcribed": result.get("transcribed"), "audio_kept": result.get("audio_kept")}
        return web.json_response(body, status=201)

    app.router.add_post(ROUTE, create_voice)


async def read_form(request: web.Request, max_audio_bytes: int) -> dict[str, Any]:
    """The multipart form -> presets.create params; refuses unknown, repeated or oversized fields."""
    if request.content_type != "multipart/form-data":
        raise InvalidArgument("send the recording as multipart/form-data (fields file, name, transcript, "
                              "language)", reason="BAD_CONTENT_TYPE",
                              details={"content_type": request.content_type[:64]})
    length = request.content_length
    if length is not None and length > max_audio_bytes + _FORM_SLACK:
        raise audio_too_large(None, max_audio_bytes)
    params: dict[str, Any] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            await _read_part(part, params, max_audio_bytes)
    except (ValueError, AssertionError, HttpProcessingError) as exc:
        # aiohttp's parser refuses a broken form with these (bad boundary, headers, early end).
        detail = str(exc).replace("\n", " ").strip()[:200] or type(exc).__name__
        raise InvalidArgument(f"malformed multipart form: {detail}", reason="BAD_FORM") from None
    if "audio" not in params:
        raise InvalidArgument("the form has no file field (the recording)", reason="MISSING_FIELD",
                              details={"field": "file"})
    if params.get("language") == "":
        params.pop("language")
    return params


async def _read_part(part: Any, params: dict[str, Any], max_audio_bytes: int) -> None:
    if not isinstance(part, BodyPartReader):
        raise InvalidArgument("nested multipart forms are not accepted", reason="BAD_FORM")
    field = part.name or ""
    key = "audio" if field == "file" else field
    if key in params:
        raise InvalidArgument(f"field {field!r} is given twice", reason="BAD_FORM", details={"field": field})
    if field == "file":
        params["audio"] = await _read_limited(part, max_audio_bytes, audio_too_large)
    elif field in TEXT_FIELDS:
        raw = await _read_limited(part, _TEXT_FIELD_MAX, _field_too_large(field))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"field {field!r} is not UTF-8 text", reason="BAD_TEXT",
                                  details={"field": field}) from None
        params[field] = _form_bool(field, text) if field in BOOL_FIELDS else text
    else:
        raise InvalidArgument(f"unknown form field {field[:64]!r}; accepted: file, {', '.join(TEXT_FIELDS)}",
                              reason="UNKNOWN_FIELD", details={"field": field[:64]})


async def _read_limited(part: BodyPartReader, limit: int, too_large: Any) -> bytes:
    buf = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise too_large(None, limit)
    return bytes(buf)


def _field_too_large(field: str) -> Any:
    def make(_size: int | None, limit: int) -> InvalidArgument:
        return InvalidArgument(f"field {field!r} is over {limit} bytes", reason="FIELD_TOO_LARGE",
                               details={"field": field})
    return make


def _form_bool(field: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise InvalidArgument(f"{field} must be true or false, got {text[:20]!r}", reason="BAD_TYPE",
                          details={"field": field})
