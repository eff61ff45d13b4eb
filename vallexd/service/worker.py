"""The one model worker: a dedicated thread that owns the Engine and runs jobs one at a time.

Why one thread: the model is big, a second copy would not fit many GPUs, and
torch already uses every core for one job.  The event loop never runs torch;
it only keeps a bounded queue of waiting jobs and hands them over one by one.

Job life: `run()` appends a Job to the waiting deque (over `queue_limit` waiting
-> Busy/QUEUE_FULL).  The dispatcher task pops it and runs it in the model
thread.  A job whose client went away (`cancelled` event) or whose deadline
passed is removed from the deque at once (so it stops counting against the
limit), or, if already running, stopped through the engine's `should_stop`
poll.  Progress callbacks from the model thread are marshalled back with
`loop.call_soon_threadsafe`.

torch is imported lazily inside the model thread (via vallexd.inference.engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vallexd.errors import Busy, Internal, Timeout, Unavailable, VallexError
from vallexd.types import Piece, Sampling

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
#: on_audio(samples): one piece's float32 audio at 24 kHz, called on the event loop, in order.
AudioFn = Callable[[np.ndarray], None]
#: on_step(batch_size): called from the MODEL THREAD once per AR step; must be cheap and thread-safe.
StepFn = Callable[[int], None]


@dataclass(eq=False)
class Job:
    pieces: list[Piece]
    prompt: Any  # prompts.Prompt | None
    sampling: Sampling
    deadline: float  # time.monotonic() value
    future: asyncio.Future[np.ndarray]
    progress: ProgressFn | None = None
    on_audio: AudioFn | None = None
    abandon: threading.Event = field(default_factory=threading.Event)

    def should_stop(self) -> bool:
        # Polled from the model thread once per AR step: keep it cheap.
        return self.abandon.is_set() or time.monotonic() > self.deadline


def default_loader(
    checkpoint: Path, vocos_dir: Path, device: str, dtype: str, threads: int = 0
) -> Callable[[], Any]:
    def load() -> Any:
        import torch  # only ever imported in the model thread

        from vallexd.inference.engine import Engine

        if threads:  # process-wide, but the model thread is the only one running torch
            torch.set_num_threads(threads)
        return Engine.load(checkpoint, vocos_dir, device=device, dtype=dtype)

    return load


class ModelWorker:
    def __init__(self, loader: Callable[[], Any], *, queue_limit: int) -> None:
        self._loader = loader
        self.queue_limit = queue_limit
        self.engine: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vallexd-model")
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        # Counters for status (and for tests that prove a cache hit never reached the model).
        self.jobs_run = 0
        self.jobs_dropped = 0
        self.jobs_failed = 0
        #: Set when the accelerator failed for good; `on_fatal` (set by the lifecycle) is then called.
        self.fatal: VallexError | None = None
        self.on_fatal: Callable[[VallexError], None] | None = None
        #: Seconds the model load took, and seconds the model thread spent on jobs (for metrics).
        self.load_s: float | None = None
        self.busy_s = 0.0
        #: Metrics hook, see StepFn. Until the batching worker lands, one call per `should_stop`
        #: poll with batch size 1: one per AR step plus one per NAR stage (7 per piece).
        self.on_step: StepFn | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def model_loaded(self) -> bool:
        return self.engine is not None

    @property
    def identity(self) -> str:
        if self.engine is None:
            raise Unavailable("the model is not loaded", reason="MODEL_NOT_LOADED")
        return str(self.engine.identity)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return 1 if self._running is not None else 0

    async def start(self) -> None:
        """Load the engine in the model thread; a failure is Unavailable(MODEL_LOAD_FAILED)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        started = time.monotonic()
        try:
            self.engine = await loop.run_in_executor(self._executor, self._loader)
        except Exception as exc:
            # One reason for every load failure (missing file, bad checkpoint, CUDA absent...) so
            # the lifecycle can exit non-zero with this message.
            log.debug("model load failed", exc_info=True)
            detail = exc.message if isinstance(exc, VallexError) else str(exc) or type(exc).__name__
            raise Unavailable(f"cannot load the model: {detail}", reason="MODEL_LOAD_FAILED") from exc
        self.load_s = time.monotonic() - started
        log.info("model loaded in %.1f s (device %s, dtype %s)", self.load_s,
                 getattr(self.engine, "device", "?"), getattr(self.engine, "dtype", "?"))
        self._accepting = True
        self._dispatcher = loop.create_task(self._dispatch(), name="vallexd-dispatch")

    async def stop(self, grace_s: float) -> None:
        """Refuse new jobs, let queued and running ones finish within `grace_s`, cut off the rest."""
        self._accepting = False
        if self._idle is not None and not self._idle.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=max(grace_s, 0.0))
        for job in list(self._waiting):
            self._fail(job, Unavailable("the daemon is shutting down", reason="SHUTTING_DOWN"))
        self._waiting.clear()
        running = self._running
        if running is not None:
            self._fail(running, Unavailable("the daemon is shutting down", reason="SHUTTING_DOWN"))
            # The engine polls should_stop once per AR step: this returns within a step or a decode.
            if self._idle is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout=10.0)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.engine = None

    # ------------------------------------------------------------------ submitting
    async def run(
        self,
        pieces: list[Piece],
        prompt: Any,
        sampling: Sampling,
        *,
        timeout_s: float,
        progress: ProgressFn | None = None,
        cancelled: asyncio.Event | None = None,
        on_audio: AudioFn | None = None,
    ) -> np.ndarray:
        """Queue one synthesis and wait for its float audio (the concatenation of its pieces).

        on_audio(samples) is called on the event loop with each piece's float32 24 kHz audio, in
        order, as soon as that piece is vocoded, and never after this returns or raises.
        """
        if not self._accepting or self._loop is None or self._wakeup is None or self._idle is None:
            raise Unavailable("the daemon is shutting down" if self.engine else "the model is not loaded",
                              reason="SHUTTING_DOWN" if self.engine else "MODEL_NOT_LOADED")
        busy = self._running is not None or bool(self._waiting)
        if busy and len(self._waiting) >= self.queue_limit:
            raise Busy(f"the queue is full ({self.queue_limit} waiting); retry later", reason="QUEUE_FULL",
                       details={"queue_limit": self.queue_limit})
        job = Job(list(pieces), prompt, sampling, time.monotonic() + timeout_s, self._loop.create_future(),
                  progress, on_audio)
        self._waiting.append(job)
        self._idle.clear()
        self._wakeup.set()

        waiter = asyncio.ensure_future(cancelled.wait()) if cancelled is not None else None
        try:
            watched: set[asyncio.Future[Any]] = {job.future} if waiter is None else {job.future, waiter}
            await asyncio.wait(watched, timeout=max(timeout_s, 0.0), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the transport's task itself was cancelled
            self._abandon(job)
            raise
        finally:
            if waiter is not None:
                waiter.cancel()
        if job.future.done():
            return job.future.result()
        self._abandon(job)
        if cancelled is not None and cancelled.is_set():
            raise Timeout("request cancelled: the client went away", reason="CANCELLED")
        raise Timeout(f"request ran past its deadline of {timeout_s:g} s", reason="DEADLINE",
                      details={"timeout_s": timeout_s})

    def _abandon(self, job: Job) -> None:
        job.abandon.set()
        with contextlib.suppress(ValueError):
            self._waiting.remove(job)
            self.jobs_dropped += 1
        if not job.future.done():
            job.future.cancel()
        self._update_idle()

    def _fail(self, job: Job, err: VallexError) -> None:
        job.abandon.set()
        if not job.future.done():
            job.future.set_exception(err)

    def _update_idle(self) -> None:
        if self._idle is not None and self._running is None and not self._waiting:
            self._idle.set()

    # ------------------------------------------------------------------ dispatching
    async def _dispatch(self) -> None:
        assert self._loop is not None and self._wakeup is not None
        while True:
            while not self._waiting:
                self._update_idle()
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self._waiting.popleft()
            if job.future.done() or job.should_stop():
                self.jobs_dropped += 1
                if not job.future.done():
                    job.future.set_exception(
                        Timeout("request ran past its deadline while queued", reason="DEADLINE"))
                continue
            self._running = job
            started = time.monotonic()
            try:
                audio = await self._loop.run_in_executor(self._executor, self._execute, job)
            except VallexError as err:
                self.jobs_failed += 1
                if not job.future.done():
                    job.future.set_exception(err)
            except Exception as exc:
                self.jobs_failed += 1
                log.exception("synthesis failed")
                if not job.future.done():
                    job.future.set_exception(
                        Internal("synthesis failed; see the daemon log", reason="ENGINE_ERROR"))
                del exc
            else:
                if not job.future.done():
                    job.future.set_result(audio)
            finally:
                self.busy_s += time.monotonic() - started
                self._running = None
                self._update_idle()

    def _execute(self, job: Job) -> np.ndarray:
        """Runs in the model thread."""
        if job.should_stop():
            raise Timeout("request abandoned before it started", reason="CANCELLED")
        loop = self._loop
        assert loop is not None
        report = job.progress
        progress = None
        if report is not None:
            future = job.future

            def deliver(done: int, total: int) -> None:
                # On the loop: once the job's future is done (result sent, cancelled, timed out)
                # a late progress frame would arrive after the response; drop it.
                if not future.done():
                    report(done, total)

            def progress(done: int, total: int) -> None:
                loop.call_soon_threadsafe(deliver, done, total)

        should_stop = job.should_stop
        on_step = self.on_step
        if on_step is not None:
            def should_stop() -> bool:
                on_step(1)
                return job.should_stop()

        self.jobs_run += 1
        extra: dict[str, Any] = {}
        if job.on_audio is not None:
            extra["on_audio"] = self._audio_relay(job, loop)
        try:
            audio = self.engine.synthesize(job.pieces, job.prompt, job.sampling, progress=progress,
                                           should_stop=should_stop, **extra)
        except VallexError:
            raise
        except Exception as exc:
            err = self._classify(exc)
            if err is None:
                raise  # a bug: _dispatch logs the traceback and answers INTERNAL
            raise err from None
        return np.asarray(audio, dtype=np.float32)

    @staticmethod
    def _audio_relay(job: Job, loop: asyncio.AbstractEventLoop) -> AudioFn:
        """The model-thread callback that hands each piece's audio to job.on_audio on the loop."""
        sink, future = job.on_audio, job.future
        assert sink is not None

        def deliver(samples: np.ndarray) -> None:
            # Like progress: nothing goes out once the job is over (cancelled, timed out).
            if not future.done():
                sink(samples)

        def relay(samples: np.ndarray) -> None:
            loop.call_soon_threadsafe(deliver, np.asarray(samples, dtype=np.float32))

        return relay

    def _classify(self, exc: Exception) -> VallexError | None:
        """Model thread: OOM -> ResourceExhausted (memory released); a poisoned accelerator -> fatal."""
        from vallexd.inference.failures import classify, is_fatal  # torch is loaded by now

        err = classify(exc, str(getattr(self.engine, "device", "")))
        if err is not None and is_fatal(exc) and self.fatal is None:
            log.critical("fatal accelerator error: the daemon stops and must be restarted", exc_info=exc)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._on_fatal_error, err)
        return err

    def _on_fatal_error(self, err: VallexError) -> None:
        """On the loop: refuse everything from now on, report not-ready, tell the lifecycle (once)."""
        if self.fatal is not None:
            return
        self.fatal = err
        self._accepting = False
        self.engine = None  # model_loaded is False: /health answers 503, status says not loaded
        for job in list(self._waiting):
            self._fail(job, err)
        self._waiting.clear()
        self._update_idle()
        if self.on_fatal is not None:
            self.on_fatal(err)
