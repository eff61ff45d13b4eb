"""What the socket and HTTP transports share: the service they call, the drain gate, and the one
mapping from exceptions to wire errors (a `VallexError` keeps its code; anything else is INTERNAL,
logged with its traceback, and the client sees no internals)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any, Protocol

from vallexd.errors import Internal, VallexError
from vallexd.service.result import SynthesisResult
from vallexd.service.stream import AudioStream

log = logging.getLogger("vallexd.server")


class ServiceLike(Protocol):
    """The part of `vallexd.service.service.Service` the transports call (docs/architecture.md)."""

    async def synthesize(self, params: dict[str, Any], *, progress: Any = None,
                         cancelled: asyncio.Event | None = None, on_audio: Any = None) -> SynthesisResult: ...
    def synthesize_stream(self, params: dict[str, Any], *, progress: Any = None,
                          cancelled: asyncio.Event | None = None) -> AudioStream: ...
    async def status(self) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...
    async def presets_list(self) -> dict[str, Any]: ...
    async def presets_install(self, params: dict[str, Any]) -> dict[str, Any]: ...
    async def presets_remove(self, params: dict[str, Any]) -> dict[str, Any]: ...
    async def presets_create(self, params: dict[str, Any]) -> dict[str, Any]: ...
    async def cache_stats(self) -> dict[str, Any]: ...
    async def cache_prune(self, params: dict[str, Any]) -> dict[str, Any]: ...


class DrainGate:
    """Counts requests in progress so shutdown can stop accepting, then wait for them to finish."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Hold the gate open for one request."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in progress; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


async def synthesize_cancellable(service: ServiceLike, params: dict[str, Any]) -> SynthesisResult:
    """`service.synthesize(params)`; if the caller is cancelled (an HTTP client hung up, a Ray
    request was cancelled), the service is told through its `cancelled` event, so the job leaves
    the queue or stops at the next AR step instead of running for nobody."""
    cancelled = asyncio.Event()
    task = asyncio.get_running_loop().create_task(service.synthesize(params, cancelled=cancelled))
    task.add_done_callback(consume_outcome)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancelled.set()
        raise


def consume_outcome(task: asyncio.Future[Any]) -> None:
    # An abandoned synthesis still finishes (or is cancelled); read its outcome so asyncio
    # does not warn about an exception that was never retrieved.
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()


def to_wire_error(exc: BaseException, context: str) -> VallexError:
    """Map any exception to the error a client may see; log unexpected ones with traceback."""
    if isinstance(exc, VallexError):
        return exc
    log.error("internal error in %s", context, exc_info=exc)
    return Internal("internal error; the daemon log has the details")


def outcome(err: VallexError | None) -> str:
    """The access-log field for a request's result: "ok" or "error=CODE/REASON"."""
    if err is None:
        return "ok"
    return f"error={err.code.value}" + (f"/{err.reason}" if err.reason else "")


def log_safe(value: Any, limit: int = 40) -> str:
    """A client-supplied value fit for a one-line log: short, and escaped unless printable."""
    text = str(value)
    return text if text.isprintable() and len(text) <= limit else repr(text[:limit])


#: HTTP status -> the OpenAI error `type` that SDKs and their users match on.
_OPENAI_TYPES = {401: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error"}


def to_openai_error(err: VallexError, param_names: dict[str, str] | None = None) -> dict[str, Any]:
    """The OpenAI error body {"error": {"message", "type", "param", "code"}} of a wire error.

    `type` follows the status (`invalid_request_error` for 4xx, `server_error` for 5xx); `code` is
    the reason in lower case (e.g. "preset_not_found", "bad_token"), else the code; `param` is the
    field at fault, renamed through `param_names` (vallexd's "text" is OpenAI's "input").
    """
    status = err.http_status
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    field = err.details.get("field")
    param = (param_names or {}).get(field, field) if isinstance(field, str) else None
    code = (err.reason or err.code.value).lower()
    if err.reason == "BAD_TOKEN":
        code = "invalid_api_key"  # what OpenAI itself answers for a wrong key
    return {"error": {"message": err.message, "type": kind, "param": param, "code": code}}
