"""The optional HTTP API (aiohttp), served inside the daemon's own event loop.

Routes:
    POST /generate        the old VALLEX-Inference-Http API: {textPrompt, character, language,
                          noaccent, longprompt} -> {audioURL, code, error}, code == HTTP status
    POST /v1/synthesize   protocol.md params as JSON -> audio/wav body (or JSON with return=path)
    GET  /health          200 when the model is loaded (and not draining), else 503
    GET  /presets, /status
    POST /v1/audio/voices a voice from an uploaded recording (multipart; voices_api.py)
    POST /v1/audio/speech, GET /v1/models, /v1/audio/voices: OpenAI's API (openai_api.py)

Security defaults, because a local HTTP port is reachable from every web page the
user opens: a request carrying an Origin that is not allow-listed is refused outright
(403 BAD_ORIGIN: a "simple" cross-site POST needs no preflight, so CORS headers alone
would not stop it); POST bodies must be application/json (a form post cannot send that
without a preflight); when bound to loopback
the Host header must name loopback (defeats DNS rebinding); a bearer token is
optional on loopback and REQUIRED on any other address (refuse to start without).

This module is the one place where exceptions become HTTP errors.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vallexd.audio.formats import CONTENT_TYPES
from vallexd.config.settings import DEFAULT_VOICE_ALIASES, Config
from vallexd.errors import (
    ErrorCode,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TooLarge,
    Unauthenticated,
    Unavailable,
    VallexError,
)
from vallexd.protocol import MAX_NESTING, nesting_depth
from vallexd.server import voices_api
from vallexd.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vallexd.server.metrics import Metrics
from vallexd.server.openai_api import (
    REPLICA_HEADER,
    OpenAIApi,
    is_openai_path,
    openai_error_response,
    write_audio_stream,
)
from vallexd.server.transport import (
    DrainGate,
    ServiceLike,
    log_safe,
    outcome,
    synthesize_cancellable,
    to_wire_error,
)
from vallexd.service.result import SynthesisResult

log = logging.getLogger("vallexd.http")
access_log = logging.getLogger("vallexd.access")

#: Old UI language names (matched case-insensitively) → request language.
LANGUAGE_NAMES = {
    "en": "en", "english": "en",
    "zh": "zh", "中文": "zh", "chinese": "zh",
    "ja": "ja", "日本語": "ja", "japanese": "ja",
    "mix": "mix",
    "auto": "auto",
}
OLD_API_FIELDS = ("textPrompt", "character", "language", "noaccent", "longprompt")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_http_config(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a token (called before the model loads, to fail fast)."""
    if not is_loopback(host) and not token:
        raise InvalidArgument(
            f"the HTTP API on non-loopback address {host} needs a bearer token "
            "(set VALLEXD_HTTP_TOKEN or --http-token)",
            reason="BAD_CONFIG", details={"key": "http_token"},
        )


def map_old_request(body: Any) -> dict[str, Any]:
    """Translate an old /generate body into synthesize params (validation of values is the service's).

    Fields it does not know are ignored (logged at debug), as the old server (pydantic's
    defaults) did: its later clients send more, e.g. a request time. /v1/* stays strict.
    """
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object", reason="BAD_TYPE")
    unknown = [key for key in body if key not in OLD_API_FIELDS]
    if unknown:
        log.debug("/generate: ignoring unknown field(s) %s", ", ".join(log_safe(k, 40) for k in unknown[:8]))
    if "textPrompt" not in body:
        raise InvalidArgument("textPrompt is required", reason="MISSING_FIELD",
                              details={"field": "textPrompt"})
    params: dict[str, Any] = {"text": body["textPrompt"], "return": "path"}
    character = body.get("character")
    if character not in (None, ""):
        params["voice"] = character
    language = body.get("language")
    if language not in (None, ""):
        mapped = LANGUAGE_NAMES.get(language.strip().lower()) if isinstance(language, str) else None
        if mapped is None:
            raise InvalidArgument(f"unsupported language {str(language)[:40]!r}; use en, zh, ja, mix or auto",
                                  reason="UNKNOWN_LANGUAGE", details={"field": "language"})
        params["language"] = mapped
    for field, target, if_true, if_false in (("noaccent", "accent", "native", "request"),
                                               ("longprompt", "long", True, False)):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise InvalidArgument(f"{field} must be true or false", reason="BAD_TYPE",
                                  details={"field": field})
        params[target] = if_true if value else if_false
    if body.get("longprompt") is True:
        params["long_mode"] = "sliding"  # what the reference's longprompt ran (sliding-window)
    return params


def old_api_body(status: int, *, url: str | None = None, error: str | None = None) -> dict[str, Any]:
    """A /generate answer in the old server's types: `code` the HTTP status as a string, and
    `null` for whichever of audioURL / error does not apply. The HTTP status is the real one."""
    return {"audioURL": url, "code": str(status), "error": error}


class OneLineParserErrors(logging.Filter):
    """aiohttp logs a request its parser rejects (bad method, bad header, line too long) with a
    full traceback, at ERROR: a client's junk, not our bug. Keep one INFO line per request,
    without the traceback; everything else passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            first = str(getattr(exc, "message", "") or exc).strip().splitlines()
            args = (record.getMessage(), type(exc).__name__, log_safe(first[0] if first else "", 100))
            record.msg, record.args = "%s: rejected malformed request: %s %s", args
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_PARSER_FILTER = OneLineParserErrors()


class HttpApi:
    """Build, start and stop the aiohttp application on config.http_host/http_port."""

    def __init__(self, service: ServiceLike, *, host: str, port: int, token: str | None,
                 cors_origins: tuple[str, ...], max_body: int,
                 max_audio_bytes: int = Config.max_audio_bytes,
                 voice_aliases: dict[str, str] | None = None) -> None:
        check_http_config(host, token)
        self.service = service
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.token = token
        self.cors_origins = frozenset(cors_origins)
        self.max_body = max_body
        self.loopback = is_loopback(host)
        self.app = web.Application(client_max_size=max_body, middlewares=[self._middleware])
        self.app.add_routes([
            web.post("/generate", self.generate),
            web.post("/v1/synthesize", self.synthesize),
            web.get("/health", self.health),
            web.get("/presets", self.presets),
            web.get("/status", self.status),
            web.get("/metrics", self.metrics_route),
        ])
        voices_api.add_routes(self.app, service, max_audio_bytes=max_audio_bytes)  # POST /v1/audio/voices
        self.openai = OpenAIApi(self, DEFAULT_VOICE_ALIASES if voice_aliases is None else voice_aliases)
        self._runner: web.AppRunner | None = None
        self.gate = DrainGate()
        self.metrics: Metrics | None = None

    @classmethod
    def from_config(cls, service: ServiceLike, config: Config) -> HttpApi:
        """The HTTP API as `config` sets it up (http_host, http_port, token, CORS, limits, aliases)."""
        return cls(service, host=config.http_host, port=config.http_port or 0, token=config.http_token,
                   cors_origins=config.http_cors_origins, max_body=config.http_max_body,
                   max_audio_bytes=config.max_audio_bytes, voice_aliases=config.voice_aliases)

    def use_metrics(self, metrics: Metrics) -> None:
        """Serve `metrics` at /metrics and count every request ("METHOD /route"; others "other")."""
        routes = {f"{r.method} {r.resource.canonical}" for r in self.app.router.routes()
                  if r.resource is not None and r.method != "HEAD"}
        metrics.allow("http", routes)
        self.metrics = metrics

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(
            # handler_cancellation: a client that hangs up cancels its handler, which sets the
            # job's `cancelled` event (see _synthesize) so the model does not work for nobody.
            self.app, access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=2.0,
        )
        server_log = logging.getLogger("aiohttp.server")
        if _PARSER_FILTER not in server_log.filters:
            server_log.addFilter(_PARSER_FILTER)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("HTTP API at %s", self.url)

    def stop_accepting(self) -> None:
        """From now on new requests get 503 UNAVAILABLE; running ones continue."""
        self.gate.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being handled; False if `timeout` passed first."""
        return await self.gate.wait_idle(timeout)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ middleware
    def _allowed_host(self, request: web.Request) -> bool:
        if not self.loopback:
            return True  # the token protects a public bind; rebinding needs a loopback target
        host = (request.headers.get("Host") or "").lower()
        return host in {f"{name}:{self.port}" for name in LOOPBACK_NAMES}

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and origin in self.cors_origins and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        with self.gate.track():
            response, err = await self._guarded(request, handler, started)
        self._cors(request, response)
        if self.metrics is not None:
            route = request.match_info.route.resource
            self.metrics.request("http", f"{request.method} {route.canonical if route else '-'}", err)
        access_log.info(
            "http %s %s peer %s %d %.0fms cached=%s %s",
            request.method, log_safe(request.path, 100), request.remote,
            response.status, (time.monotonic() - started) * 1000,
            response.headers.get("X-Vallexd-Cache", "-"), outcome(err),
        )
        return response

    async def _guarded(self, request: web.Request, handler: Handler,
                       started: float) -> tuple[web.StreamResponse, VallexError | None]:
        """Run the request's checks and handler; every failure becomes one error response here."""
        try:
            self._check_request(request)
            if request.method == "OPTIONS":
                return self._preflight(request), None
            self._check_token(request)
            return await handler(request), None
        except asyncio.CancelledError:
            access_log.info("http %s %s peer %s client went away after %.0fms", request.method,
                            log_safe(request.path, 100), request.remote, (time.monotonic() - started) * 1000)
            raise
        except web.HTTPException as exc:
            # aiohttp's own refusals (no route, wrong method, body over client_max_size).
            err = _from_http_exception(exc)
            response = self._error_response(request, err, status=405 if exc.status == 405 else None)
            if exc.status == 405:
                response.headers["Allow"] = exc.headers.get("Allow", "")
            return response, err
        except Exception as exc:
            err = to_wire_error(exc, f"HTTP {request.method} {request.path}")
            return self._error_response(request, err), err

    def _check_request(self, request: web.Request) -> None:
        """Draining, Host (DNS rebinding) and Origin (CSRF) rules, before any handler runs."""
        if self.gate.draining and request.path != "/health":
            raise Unavailable("the daemon is shutting down", reason="SHUTTING_DOWN")
        if not self._allowed_host(request):
            raise PermissionDenied("Host header not allowed", reason="BAD_HOST")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.cors_origins:
            raise PermissionDenied("cross-origin requests from this origin are not allowed",
                                   reason="BAD_ORIGIN")

    def _preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if not origin or origin not in self.cors_origins:
            raise PermissionDenied("cross-origin requests from this origin are not allowed",
                                   reason="BAD_ORIGIN")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
        })

    def _check_token(self, request: web.Request) -> None:
        if not self.token or request.path == "/health":
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: encode back the same way, so
        # any bytes (non-ASCII, invalid UTF-8) compare as bytes and simply do not match.
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        expected = self.token.encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, expected):
            raise Unauthenticated("a valid bearer token is required", reason="BAD_TOKEN")

    def _error_response(self, request: web.Request, err: VallexError,
                        status: int | None = None) -> web.Response:
        status = status or err.http_status
        headers = {"WWW-Authenticate": "Bearer"} if err.code is ErrorCode.UNAUTHENTICATED else None
        if is_openai_path(request.path) and not voices_api.owns(request):
            return openai_error_response(err, status, headers)
        if request.path == "/generate":
            message = "Character not found" if err.code is ErrorCode.NOT_FOUND else err.message
            return web.json_response(old_api_body(status, error=message), status=status, headers=headers)
        return web.json_response({"error": err.to_wire()}, status=status, headers=headers)

    # ------------------------------------------------------------------ handlers
    async def _json_body(self, request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise InvalidArgument("the request body must be JSON sent as Content-Type: application/json",
                                  reason="BAD_CONTENT_TYPE",
                                  details={"content_type": request.content_type[:64]})
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise TooLarge(f"request body over the limit of {self.max_body} bytes",
                           reason="BODY_TOO_LARGE") from None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("the request body is not valid JSON", reason="BAD_JSON") from None
        except RecursionError:  # "[" * 100000: the parser recursed past Python's limit
            raise InvalidArgument(f"the request body nests deeper than {MAX_NESTING} levels",
                                  reason="BAD_JSON", details={"limit": MAX_NESTING}) from None
        if nesting_depth(body, MAX_NESTING) > MAX_NESTING:
            raise InvalidArgument(f"the request body nests deeper than {MAX_NESTING} levels",
                                  reason="BAD_JSON", details={"limit": MAX_NESTING})
        return body

    async def generate(self, request: web.Request) -> web.Response:
        params = map_old_request(await self._json_body(request))
        result = await synthesize_cancellable(self.service, params)
        return web.json_response(old_api_body(200, url=result.url), headers=result_headers(result))

    async def synthesize(self, request: web.Request) -> web.Response:
        params = await self._json_body(request)
        if not isinstance(params, dict):
            raise InvalidArgument("the request body must be a JSON object", reason="BAD_TYPE")
        if params.get("progress"):
            raise InvalidArgument("progress events are only available on the Unix socket",
                                  reason="BAD_VALUE", details={"field": "progress"})
        if params.get("stream") is True:
            return await write_audio_stream(self, request, self.service.synthesize_stream(params), {})
        result = await synthesize_cancellable(self.service, params)
        headers = result_headers(result)
        if result.audio is not None:
            headers["Content-Type"] = CONTENT_TYPES[result.format]
            return web.Response(body=result.audio, headers=headers)
        return web.json_response(result.to_wire(), headers=headers)

    async def health(self, request: web.Request) -> web.Response:
        # Cheap on purpose (probes poll it): no cache scan, no executor hop.
        health = self.service.health()
        draining = self.gate.draining or bool(health.get("draining"))
        if not health.get("model_loaded") or draining:
            return web.json_response({"status": "unavailable", "draining": draining}, status=503)
        return web.json_response({"status": "ok", "version": health.get("version"),
                                  "model_identity": health.get("model_identity")})

    async def presets(self, request: web.Request) -> web.Response:
        return web.json_response(await self.service.presets_list())

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.service.status())

    async def metrics_route(self, request: web.Request) -> web.Response:
        """Prometheus text format; same Host/Origin/token rules as every route (send the token)."""
        if self.metrics is None:
            raise NotFound("metrics are not enabled", reason="NO_ROUTE")
        body = await asyncio.to_thread(self.metrics.exposition)  # may walk the cache folder
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


def result_headers(result: SynthesisResult) -> dict[str, str]:
    headers = {
        "X-Vallexd-Cache": "hit" if result.cached else "miss",
        "X-Vallexd-Cache-Key": result.cache_key,
        "X-Vallexd-Duration": f"{result.duration_s:.3f}",
    }
    if result.replica is not None:
        headers[REPLICA_HEADER] = result.replica
    return headers


def _from_http_exception(exc: web.HTTPException) -> VallexError:
    if exc.status == 404:
        return NotFound("no such endpoint", reason="NO_ROUTE")
    if exc.status == 413:
        return TooLarge("request body over the limit", reason="BODY_TOO_LARGE")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return InvalidArgument(f"method not allowed on this route (allowed: {allowed or 'none'})",
                               reason="METHOD_NOT_ALLOWED", details={"allowed": allowed})
    return InvalidArgument(exc.reason or "bad request", reason="BAD_REQUEST")
