"""The ingress under Ray Serve: the daemon's own HTTP API (server/http_api.py, unchanged) over a
service whose model requests go to the replicas through Ray Serve deployment handles.

    HTTP client -> HttpApi (token, Host, Origin, body rules; validation; wire errors)
                -> RemoteService: presets and cache from the shared folders (StorageApi),
                   synthesize / presets.create / status -> replica handle (Ray's routing)
                -> ReplicaServer.call / .stream on one replica

Why the same aiohttp app instead of a Starlette port of it for Ray's HTTP proxy: every rule of
the HTTP API then has one implementation, and the ingress answers byte for byte as the daemon
does (the tests compare them).  Ray Serve still does what it is for: placement, replica restarts,
autoscaling, routing and backpressure, all on the handle calls.

Ray's failures become vallexd's wire errors here: backpressure (`max_queued_requests`) is BUSY
(QUEUE_FULL), a replica that died or left mid-request is UNAVAILABLE (REPLICA_LOST); the next
request goes to a live replica while Ray starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from vallexd import __version__
from vallexd.config import Config
from vallexd.errors import Busy, Timeout, Unavailable, VallexError, cancelled_error
from vallexd.server.transport import consume_outcome, to_wire_error
from vallexd.service.requests import SynthesisRequest, validate_synthesize
from vallexd.service.result import SynthesisResult
from vallexd.service.storage_api import StorageApi
from vallexd.service.stream import EncodedChunk
from vallexd.storage.cache import static_url

log = logging.getLogger("vallexd.serve.ingress")

#: How often the ingress asks Ray how many replicas run (for /health).
WATCH_INTERVAL_S = 2.0
#: How long /status waits for a replica before the ingress answers it alone.
STATUS_WAIT_S = 2.0


def from_ray(exc: BaseException, context: str) -> VallexError:
    """The wire error for an exception a Ray Serve handle raised (see the module docstring)."""
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    if isinstance(exc, serve_errors.BackPressureError):
        return Busy("every replica is busy and the cluster queue is full; retry later", reason="QUEUE_FULL")
    if isinstance(exc, (serve_errors.RequestCancelledError, ray_errors.TaskCancelledError)):
        return Timeout("request cancelled", reason="CANCELLED")
    lost = (ray_errors.RayActorError, ray_errors.ActorUnavailableError, serve_errors.ReplicaUnavailableError,
            serve_errors.DeploymentUnavailableError)
    if isinstance(exc, lost):
        log.warning("%s: the replica was lost: %s", context, str(exc).splitlines()[0] if str(exc) else exc)
        return Unavailable("the model replica serving this request stopped; retry (Ray is starting "
                           "a new one, and the next request goes to a live replica)", reason="REPLICA_LOST")
    return to_wire_error(exc, context)


def _answer(reply: Any) -> Any:
    """The value of a replica's {"ok": ...} / {"error": ...} reply."""
    if isinstance(reply, dict) and "error" in reply:
        raise VallexError.from_wire(reply["error"])
    return reply["ok"]


class RemoteService(StorageApi):
    """`ServiceLike` for HttpApi: presets and cache locally (shared folders), the model on replicas.

    `replicas`: the replica deployment's DeploymentHandle.  The HTTP API never passes `progress`
    or `on_audio` (socket-only features), so they are not forwarded.
    """

    def __init__(self, config: Config, replicas: Any) -> None:
        super().__init__(config, shared=True)
        self.replicas = replicas
        self.static_base_url: str | None = None
        self.http_url: str | None = None
        self.running_replicas = 0
        self.model_identity: str | None = None
        self._draining = False
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Wait for a replica to answer (the model identity, for /health), then watch the count."""
        await self.rescan_presets()
        health = await self._call("health", None)
        self.model_identity = health.get("model_identity")
        self.running_replicas = max(self.running_replicas, 1)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        self._draining = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        failures = 0
        while True:
            try:
                self.running_replicas = await asyncio.to_thread(_running_replicas)
                failures = 0
            except Exception as exc:  # the controller restarting: keep the last count
                failures += 1
                # Once it lasts (three polls), say so: /health now answers from a stale count.
                log.log(logging.WARNING if failures == 3 else logging.DEBUG,
                        "replica count unavailable (%d polls); /health keeps the last count: %s",
                        failures, exc)
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _call(self, method: str, params: dict[str, Any] | None,
                    cancelled: asyncio.Event | None = None) -> Any:
        response = self.replicas.call.remote(method, params)
        try:
            if cancelled is None:
                return _answer(await response)
            waiter = asyncio.ensure_future(cancelled.wait())
            call = asyncio.ensure_future(response)  # a DeploymentResponse is awaitable
            try:
                await asyncio.wait({call, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            if not call.done():
                response.cancel()
                call.add_done_callback(consume_outcome)
                raise cancelled_error()
            return _answer(call.result())
        except asyncio.CancelledError:
            response.cancel()  # the replica drops the job (its cancelled event is set)
            raise
        except Exception as exc:
            raise from_ray(exc, f"replica {method}") from None

    # ------------------------------------------------------------------ ServiceLike
    async def synthesize(self, params: dict[str, Any], *, progress: Any = None,
                         cancelled: asyncio.Event | None = None, on_audio: Any = None) -> SynthesisResult:
        result: SynthesisResult = await self._call("synthesize", params, cancelled)
        if self.static_base_url and result.path is not None:
            result.url = static_url(self.static_base_url, result.cache_key)
        return result

    def synthesize_stream(self, params: dict[str, Any], *, progress: Any = None,
                          cancelled: asyncio.Event | None = None) -> RemoteStream:
        """Validated here (InvalidArgument / TooLarge before any replica is asked), as the daemon does."""
        request = validate_synthesize(params, max_text_chars=self.config.max_text_chars)
        return RemoteStream(self.replicas, params, request)

    async def presets_create(self, params: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = await self._call("presets_create", params)
        await self.refresh_presets()
        return created

    async def status(self) -> dict[str, Any]:
        """One replica's status (its counters, queue and batch), with the cluster's view added.

        When every replica is busy (the status call would be refused BUSY or wait behind
        syntheses), the ingress answers alone after STATUS_WAIT_S: version, state, replicas,
        cache and presets, with `"replica": null` and `"busy": true`.
        """
        call = asyncio.ensure_future(self._call("status", None))
        try:
            status: dict[str, Any] = await asyncio.wait_for(asyncio.shield(call), STATUS_WAIT_S)
        except (asyncio.TimeoutError, Busy):
            call.cancel()
            call.add_done_callback(consume_outcome)
            status = {"version": __version__, "state": "ready" if self.running_replicas else "loading",
                      "model_loaded": self.running_replicas > 0, "model_identity": self.model_identity,
                      "cache": await self.cache_stats(), "presets": len(self.presets),
                      "replica": None, "busy": True}
        status.update(static_url=self.static_base_url, http_url=self.http_url,
                      replicas={"running": self.running_replicas})
        return status

    def health(self) -> dict[str, Any]:
        return {"version": __version__, "model_loaded": self.running_replicas > 0,
                "model_identity": self.model_identity, "draining": self._draining}


def _running_replicas() -> int:
    """Replicas of the model deployment that Ray reports RUNNING (blocking: a controller call)."""
    from ray import serve

    from vallexd.serve.ray import APP_NAME, REPLICA_DEPLOYMENT

    app = serve.status().applications.get(APP_NAME)
    deployment = app.deployments.get(REPLICA_DEPLOYMENT) if app is not None else None
    if deployment is None:
        return 0
    return int(deployment.replica_states.get("RUNNING", 0))


class RemoteStream:
    """`AudioStream` over a replica's `stream` generator (Ray's streaming handle).

    Leaving the `async with` early cancels the generator on the replica, which cancels its job.
    """

    def __init__(self, replicas: Any, params: dict[str, Any], request: SynthesisRequest) -> None:
        self.request = request
        self.result: SynthesisResult | None = None
        self.replica: str | None = None
        self._replicas = replicas
        self._params = params
        self._generator: Any = None

    async def __aenter__(self) -> RemoteStream:
        self._generator = self._replicas.options(stream=True).stream.remote(self._params)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.result is None and self._generator is not None:
            self._generator.cancel()

    async def chunks(self) -> AsyncIterator[EncodedChunk]:
        assert self._generator is not None, "use `async with` first"
        try:
            async for kind, value in self._generator:
                if kind == "chunk":
                    yield value
                elif kind == "replica":
                    self.replica = value
                elif kind == "result":
                    self.result = value
                else:
                    raise VallexError.from_wire(value)
        except VallexError:
            raise
        except Exception as exc:
            raise from_ray(exc, "replica stream") from None
