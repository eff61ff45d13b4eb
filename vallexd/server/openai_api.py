"""OpenAI's speech API on the HTTP port, for the apps that already speak it (Open WebUI,
SillyTavern, LibreChat, the `openai` SDKs...).

Routes (registered on the HttpApi's aiohttp app, so the same token, Host, Origin and body-size
rules apply):
    POST /v1/audio/speech   {model, input, voice, response_format, speed, stream_format,
                            instructions} + vallexd's language, accent, seed, top_k, temperature,
                            long_mode -> audio (whole, chunked as pieces finish, or SSE events)
    GET  /v1/models         the accepted model names (all the same VALL-E X model)
    GET  /v1/audio/voices   {"voices": [{"id", "name", ...}]}: installed presets and voice aliases

Errors have OpenAI's shape (`transport.to_openai_error`) so SDKs raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from vallexd.audio.formats import CONTENT_TYPES
from vallexd.constants import HOP
from vallexd.errors import InvalidArgument, NotFound, VallexError
from vallexd.server.transport import synthesize_cancellable, to_openai_error, to_wire_error
from vallexd.service.stream import AudioStream, EncodedChunk

if TYPE_CHECKING:
    from vallexd.server.http_api import HttpApi

#: The model replica that answered (vallexd.serve); absent from a plain daemon's answers.
REPLICA_HEADER = "X-Vallexd-Replica"

log = logging.getLogger("vallexd.http")

MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "vallex")
STREAM_FORMATS = ("audio", "sse")
#: OpenAI fields, then vallexd's extensions passed through to `synthesize` as they are.
SPEECH_FIELDS = ("model", "input", "voice", "response_format", "speed", "stream_format", "instructions",
                 "stream")
EXTENSION_FIELDS = ("language", "accent", "seed", "top_k", "temperature", "long_mode")
#: synthesize param -> the OpenAI field a client sent it as (for the error's `param`).
PARAM_NAMES = {"text": "input", "format": "response_format"}
PATHS = ("/v1/audio/", "/v1/models")
INSTRUCTIONS_HEADER = "X-Vallexd-Instructions"


def is_openai_path(path: str) -> bool:
    return path.startswith(PATHS)


def openai_error_response(err: VallexError, status: int, headers: dict[str, str] | None) -> web.Response:
    return web.json_response(to_openai_error(err, PARAM_NAMES), status=status, headers=headers)


def speech_params(body: Any, aliases: dict[str, str],
                  installed: set[str]) -> tuple[dict[str, Any], str | None]:
    """(synthesize params, stream_format or None) of a /v1/audio/speech body.

    Raises InvalidArgument (unknown field, model, stream_format; bad instructions) and NotFound
    (a voice that is neither an installed preset nor an alias of one).
    """
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object", reason="BAD_TYPE")
    for key in body:
        if key not in SPEECH_FIELDS and key not in EXTENSION_FIELDS:
            shown = str(key)[:64]
            raise InvalidArgument(f"unknown field {shown!r}", reason="UNKNOWN_FIELD",
                                  details={"field": shown})
    model = body.get("model")
    if model not in MODELS:
        raise InvalidArgument(f"model must be one of {', '.join(MODELS)} (all are VALL-E X)",
                              reason="UNKNOWN_MODEL", details={"field": "model"})
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidArgument("instructions must be a string", reason="BAD_TYPE",
                              details={"field": "instructions"})
    stream_format = body.get("stream_format")
    if stream_format is not None and stream_format not in STREAM_FORMATS:
        raise InvalidArgument('stream_format must be "audio" or "sse"', reason="BAD_VALUE",
                              details={"field": "stream_format"})
    params: dict[str, Any] = {
        "voice": resolve_voice(body.get("voice"), aliases, installed),
        "format": body.get("response_format", "mp3"),
        "speed": body.get("speed", 1.0),
    }
    if "input" in body:
        params["text"] = body["input"]
    params.update({key: body[key] for key in EXTENSION_FIELDS if key in body})
    return params, stream_format


def resolve_voice(voice: Any, aliases: dict[str, str], installed: set[str]) -> str:
    """The preset a `voice` names: itself when installed, else through the alias table."""
    if isinstance(voice, dict) and set(voice) == {"id"}:
        voice = voice["id"]  # the SDK's custom-voice form {"id": "..."}
    if not isinstance(voice, str) or not voice:
        raise InvalidArgument("voice is required: a preset name or an alias (see GET /v1/audio/voices)",
                              reason="MISSING_FIELD" if voice is None else "BAD_TYPE",
                              details={"field": "voice"})
    if voice in installed:
        return voice
    preset = aliases.get(voice)
    if preset is not None and preset in installed:
        return preset
    if preset is not None:
        raise NotFound(f"voice {voice[:64]!r} speaks with preset {preset!r}, which is not installed: "
                       f"`vallexctl preset install {preset}`, or map it to another preset (voice_aliases)",
                       reason="PRESET_NOT_FOUND", details={"field": "voice", "preset": preset})
    raise NotFound(f"no voice {voice[:64]!r}: not an installed preset nor an alias (GET /v1/audio/voices)",
                   reason="PRESET_NOT_FOUND", details={"field": "voice"})


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class OpenAIApi:
    """The OpenAI routes of one HttpApi (its middleware, body reader and service)."""

    def __init__(self, http: HttpApi, voice_aliases: dict[str, str]) -> None:
        self.http = http
        self.aliases = dict(voice_aliases)
        self.created = int(time.time())
        http.app.add_routes([
            web.post("/v1/audio/speech", self.speech),
            web.get("/v1/models", self.models),
            web.get("/v1/audio/voices", self.voices),
        ])

    async def _installed(self) -> dict[str, dict[str, Any]]:
        listing = await self.http.service.presets_list()
        return {p["name"]: p for p in listing.get("presets", [])}

    async def speech(self, request: web.Request) -> web.StreamResponse:
        body = await self.http._json_body(request)
        params, stream_format = speech_params(body, self.aliases, set(await self._installed()))
        headers = {}
        if isinstance(body, dict) and body.get("instructions"):
            # VALL-E X has no style control: say so rather than pretend.
            headers[INSTRUCTIONS_HEADER] = "ignored"
        if stream_format is None:
            from vallexd.server.http_api import result_headers  # (http_api imports this module)

            result = await synthesize_cancellable(self.http.service, params)
            headers.update(result_headers(result))
            headers["Content-Type"] = CONTENT_TYPES[result.format]
            return web.Response(body=result.audio, headers=headers)
        stream = self.http.service.synthesize_stream(params)
        if stream_format == "sse":
            return await write_sse(self.http, request, stream, headers)
        return await write_audio_stream(self.http, request, stream, headers)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "vallexd"} for name in MODELS
        ]})

    async def voices(self, request: web.Request) -> web.Response:
        installed = await self._installed()
        voices = [{"id": name, "name": name, "language": p.get("language"), "preset": name}
                  for name, p in sorted(installed.items())]
        voices += [{"id": alias, "name": f"{alias} ({preset})", "language": installed[preset].get("language"),
                    "preset": preset}
                   for alias, preset in sorted(self.aliases.items())
                   if preset in installed and alias not in installed]
        return web.json_response({"voices": voices})


@contextlib.asynccontextmanager
async def _started(
        stream: AudioStream) -> AsyncIterator[tuple[EncodedChunk, AsyncIterator[EncodedChunk]]]:
    """Enter the stream and wait for its first chunk, so that an error before any audio (unknown
    voice, queue full...) still becomes a plain HTTP error with its status."""
    async with stream:
        chunks = stream.chunks()
        try:
            first = await chunks.__anext__()
            yield first, chunks
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]


async def _prepare(http: HttpApi, request: web.Request, headers: dict[str, str],
                   stream: AudioStream) -> web.StreamResponse:
    if stream.replica is not None:  # known once the first chunk came (vallexd.serve)
        headers = {**headers, REPLICA_HEADER: stream.replica}
    response = web.StreamResponse(headers=headers)
    response.enable_chunked_encoding()
    http._cors(request, response)  # headers go out now, not after the handler returns
    await response.prepare(request)
    return response


def _gone(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    log.info("HTTP %s %s: the client went away mid-stream", request.method, request.path)
    return response


async def write_audio_stream(http: HttpApi, request: web.Request, stream: AudioStream,
                             headers: dict[str, str]) -> web.StreamResponse:
    """Chunked audio: the first bytes go out as soon as the first piece is encoded."""
    headers = {**headers, "Content-Type": CONTENT_TYPES[stream.request.format], "X-Vallexd-Stream": "audio"}
    async with _started(stream) as (first, chunks):
        response = await _prepare(http, request, headers, stream)
        try:
            await response.write(first.data)
            async for chunk in chunks:
                await response.write(chunk.data)
        except asyncio.CancelledError:
            raise
        except ConnectionError:
            return _gone(request, response)  # leaving the `async with` cancels the rest
        except Exception as exc:
            # Too late for an error status: cut the connection so the client sees a broken
            # transfer, never a short file that looks complete.
            to_wire_error(exc, "HTTP audio stream")
            log.warning("HTTP audio stream ended early: %s", exc)
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    return response


async def write_sse(http: HttpApi, request: web.Request, stream: AudioStream,
                    headers: dict[str, str]) -> web.StreamResponse:
    """OpenAI's server-sent events: speech.audio.delta (base64 audio) ..., then speech.audio.done."""
    headers = {**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Vallexd-Audio-Format": stream.request.format}
    samples = 0
    async with _started(stream) as (first, chunks):
        response = await _prepare(http, request, headers, stream)
        try:
            chunk: EncodedChunk | None = first
            while chunk is not None:
                samples = chunk.offset + chunk.samples
                if chunk.data:
                    await response.write(sse_event({"type": "speech.audio.delta",
                                                    "audio": base64.b64encode(chunk.data).decode()}))
                chunk = await anext(chunks, None)
        except asyncio.CancelledError:
            raise
        except ConnectionError:
            return _gone(request, response)
        except Exception as exc:
            err = to_wire_error(exc, "HTTP SSE stream")
            await response.write(sse_event({"type": "error", **to_openai_error(err, PARAM_NAMES)}))
            await response.write_eof()
            return response
    # usage: vallexd counts no text tokens; its output tokens are the codec frames it generated.
    frames = samples // HOP
    await response.write(sse_event({"type": "speech.audio.done",
                                    "usage": {"input_tokens": 0, "output_tokens": frames,
                                              "total_tokens": frames}}))
    await response.write_eof()
    return response
