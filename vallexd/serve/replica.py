"""One model replica under Ray Serve: the daemon's `Service` (model worker with continuous
batching, text front end, cache) on the cache and presets folders that every replica shares.

Ray calls it through deployment handles from the ingress (ingress.py).  What crosses the process
boundary is plain data, never a live exception: `call` answers `{"ok": value}` or
`{"error": <wire error>}` (errors.py's wire map: the same codes the daemon's transports send),
and `stream` yields `("replica", name)`, `("chunk", EncodedChunk)` items, then
`("result", SynthesisResult)` or `("error", <wire error>)`.  So a VallexError keeps its code,
reason and details across Ray, and a bug becomes INTERNAL here, logged with its traceback in
the replica's log (transport.py).

Cancellation: when the ingress cancels a request (its HTTP client went away), Ray cancels this
coroutine; `synthesize_cancellable` and `SynthesisStream` turn that into the service's
`cancelled` event, so the worker drops the job or stops its row at the next AR step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from vallexd.config import Config
from vallexd.errors import Unavailable
from vallexd.server.transport import synthesize_cancellable, to_wire_error
from vallexd.service.service import Service

log = logging.getLogger("vallexd.serve.replica")

class ReplicaServer:
    """The replica deployment's class (wrapped by `serve.deployment` in vallexd.serve.ray).

    `name`: this replica's Ray Serve id (shown to clients as the X-Vallexd-Replica header).
    Raises Unavailable(MODEL_LOAD_FAILED) from the constructor if the model cannot load; Ray then
    marks the replica unhealthy and retries it.
    """

    def __init__(self, config: Config, service: Service | None = None, name: str | None = None) -> None:
        # The Service starts no transports: the ingress serves HTTP and the static files.
        self.service = service if service is not None else Service(config, shared=True)
        self.name = name if name is not None else _replica_name()
        #: What the ingress may ask through `call` (the rest it answers itself).
        self._methods = {"synthesize": self._synthesize, "presets_create": self._presets_create,
                         "status": self._status, "health": self._health}

    async def start(self) -> None:
        await self.service.start()
        log.info("replica %s ready (pid %d)", self.name, os.getpid())

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request: {"ok": value} or {"error": wire error}."""
        try:
            handler = self._methods.get(method)
            if handler is None:
                raise Unavailable(f"replicas do not answer {method!r}", reason="BAD_METHOD")
            return {"ok": await handler(params)}
        except Exception as exc:
            return {"error": to_wire_error(exc, f"replica {method}").to_wire()}

    async def _synthesize(self, params: dict[str, Any] | None) -> Any:
        result = await synthesize_cancellable(self.service, params or {})
        result.replica = self.name
        return result

    async def _presets_create(self, params: dict[str, Any] | None) -> Any:
        return await self.service.presets_create(params or {})

    async def _status(self, params: dict[str, Any] | None) -> Any:
        status = await self.service.status(params)
        status["replica"] = {"id": self.name, "pid": os.getpid()}
        return status

    async def _health(self, params: dict[str, Any] | None) -> Any:
        return {**self.service.health(), "replica": self.name}

    async def stream(self, params: dict[str, Any]) -> AsyncIterator[tuple[str, Any]]:
        """A streamed synthesis: ("replica", name), ("chunk", EncodedChunk)..., then ("result",
        SynthesisResult) or ("error", wire error)."""
        yield "replica", self.name
        try:
            async with self.service.synthesize_stream(params) as stream:
                async for chunk in stream.chunks():
                    yield "chunk", chunk
            assert stream.result is not None
            stream.result.replica = self.name
            yield "result", stream.result
        except Exception as exc:  # a VallexError keeps its code; a bug becomes INTERNAL, logged
            yield "error", to_wire_error(exc, "replica stream").to_wire()

    async def check_health(self) -> None:
        """Ray's periodic probe: a replica whose model is gone (a fatal accelerator error) is
        replaced by a fresh one."""
        health = self.service.health()
        if self.service.state == "ready" and not health["model_loaded"]:
            raise RuntimeError("the model is not loaded (the model worker failed); restart this replica")

    async def stop(self, grace_s: float) -> None:
        """Finish what was accepted (within `grace_s`), then release the model."""
        await self.service.drain(grace_s)


def _replica_name() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside a Serve replica (tests drive the class directly)
        return f"pid-{os.getpid()}"
