"""A synthesis whose audio comes out piece by piece, already encoded (torch-free).

    async with service.synthesize_stream(params, cancelled=event) as stream:
        async for chunk in stream.chunks():      # EncodedChunk, in order
            send(chunk.data)
    stream.result                                # the SynthesisResult (no audio bytes)

The model hands each piece's audio over as soon as it is vocoded (`ModelWorker.run(on_audio=)`);
a cache hit hands the whole audio over at once.  Leaving the `async with` early (the client went
away, a write failed) sets `cancelled`, so the worker drops the rest of the job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vallexd.audio.encode import Encoder
from vallexd.service.requests import SynthesisRequest
from vallexd.service.result import SynthesisResult

if TYPE_CHECKING:
    from vallexd.service.service import ProgressCallback, Service

_END = object()


@dataclass(frozen=True)
class EncodedChunk:
    """Bytes of the encoded stream. index: the piece they come from (for the final flush: the
    number of pieces); offset: that piece's first sample in the whole audio (before any speed
    change); samples: the piece's length in samples (0 for the flush); last: the final chunk."""

    index: int
    offset: int
    samples: int
    data: bytes
    last: bool = False


class AudioStream(Protocol):
    """What the transports iterate: `SynthesisStream` in the daemon, `serve.ingress.RemoteStream`
    over a Ray replica. `replica` names the replica once the first chunk came (else None)."""

    request: SynthesisRequest
    result: SynthesisResult | None
    replica: str | None

    async def __aenter__(self) -> AudioStream: ...
    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...
    def chunks(self) -> AsyncIterator[EncodedChunk]: ...


class SynthesisStream:
    """Iterate one synthesis' audio as it is made; see the module docstring.

    request: the validated request (format, speed...). result: set once the audio is complete.
    Errors of the synthesis (NotFound, Busy, Timeout...) are raised by the iteration.
    """

    def __init__(self, service: Service, params: dict[str, Any], request: SynthesisRequest, *,
                 progress: ProgressCallback | None, cancelled: asyncio.Event | None,
                 sample_rate: int) -> None:
        self.request = request
        self.sample_rate = sample_rate
        self.cancelled = cancelled if cancelled is not None else asyncio.Event()
        self.result: SynthesisResult | None = None
        self.replica: str | None = None
        self._service = service
        self._params = params
        self._progress = progress
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[SynthesisResult] | None = None

    async def __aenter__(self) -> SynthesisStream:
        self._task = asyncio.get_running_loop().create_task(self._service.synthesize(
            self._params, progress=self._progress, cancelled=self.cancelled, on_audio=self._queue.put_nowait))
        self._task.add_done_callback(lambda _task: self._queue.put_nowait(_END))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        task = self._task
        if task is not None and not task.done():
            # Left early: the rest of the audio has nobody to go to.
            self.cancelled.set()
            task.add_done_callback(_consume)

    async def audio(self) -> AsyncIterator[np.ndarray]:
        """Each piece's float32 samples, in order; then sets `result` (or raises its error)."""
        assert self._task is not None, "use `async with` first"
        while True:
            item = await self._queue.get()
            if item is _END:
                break
            yield item
        self.result = self._task.result()

    async def chunks(self) -> AsyncIterator[EncodedChunk]:
        """The audio encoded to the request's format and speed, one chunk per piece, then the
        flush (`last`); the encoder runs in a worker thread, off the event loop."""
        req = self.request
        encoder = Encoder(req.format, self.sample_rate, speed=req.speed)
        index = offset = 0
        async for samples in self.audio():
            data = await asyncio.to_thread(encoder.feed, samples)
            yield EncodedChunk(index, offset, int(samples.size), data)
            index += 1
            offset += int(samples.size)
        yield EncodedChunk(index, offset, 0, await asyncio.to_thread(encoder.finish), last=True)


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()
