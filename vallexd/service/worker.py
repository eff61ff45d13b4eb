"""The one model worker: a dedicated thread that owns the Engine and batches concurrent jobs.

Why one model thread: the model is big, a second copy would not fit many GPUs, and torch already
uses every core.  The event loop never runs torch; it keeps a bounded deque of waiting jobs.
The model thread runs a scheduling loop (vallexd.inference.scheduler): at each AR step boundary
it takes waiting jobs while the batch has free rows (`max_batch`), turns them into rows, runs
one batched AR step, and hands rows that ended to the NAR stage (NAR, vocoder) — inline, or on
the scheduler's second thread under `nar_thread` (vallexd.inference.nar_stage), which is then the
only other thread that runs torch.  Each piece's audio goes to
the job's `on_audio` as soon as it is made; the job's result is their concatenation.

Job life: `run()` appends a Job to the waiting deque (over `queue_limit` waiting beyond the free
rows -> Busy/QUEUE_FULL).  A job whose client went away (`cancelled` event) or whose deadline
passed is removed from the deque at once (so it stops counting against the limit), or, if
already in the batch, leaves it at the next step through `should_stop` without disturbing the
other rows.  Results, errors, progress and audio go back to the loop with
`loop.call_soon_threadsafe`, and are dropped once the job's future is done.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vallexd.constants import NAR_THREAD_MODES
from vallexd.errors import Busy, Internal, Timeout, Unavailable, VallexError, cancelled_error, deadline_error
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
    long_mode: str = "fixed"
    abandon: threading.Event = field(default_factory=threading.Event)

    def should_stop(self) -> bool:
        # Polled from the model thread once per AR step: keep it cheap.
        return self.abandon.is_set() or time.monotonic() > self.deadline


def default_loader(
    checkpoint: Path, vocos_dir: Path, device: str, dtype: str, threads: int = 0, compile: bool = False,
    quantize: str = "none",
) -> Callable[[], Any]:
    def load() -> Any:
        import torch  # only ever imported in the model thread

        from vallexd.inference.engine import Engine

        if threads:  # process-wide, but the model thread is the only one running torch
            torch.set_num_threads(threads)
        engine = Engine.load(checkpoint, vocos_dir, device=device, dtype=dtype, quantize=quantize)
        if compile:
            started = time.monotonic()
            engine.compile()
            log.info("model compiled in %.1f s (torch.compile)", time.monotonic() - started)
        return engine

    return load


class ModelWorker:
    def __init__(self, loader: Callable[[], Any], *, queue_limit: int, max_batch: int = 1,
                 nar_thread: str = "auto") -> None:
        """`nar_thread`: "on" | "off" | "auto" (on for a CPU model with 2+ torch threads and
        max_batch > 1): NAR stages and vocoder on a second thread (vallexd.inference.nar_stage)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if nar_thread not in NAR_THREAD_MODES:
            raise ValueError(f"nar_thread must be one of {', '.join(NAR_THREAD_MODES)}, got {nar_thread!r}")
        self._loader = loader
        self.queue_limit = queue_limit
        self.max_batch = max_batch
        self.nar_thread_mode = nar_thread
        #: Whether the NAR runs on its own thread; decided once the model is loaded.
        self.nar_thread: bool | None = None
        self.engine: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vallexd-model")
        self._cv = threading.Condition()  # guards _waiting and _running across the two threads
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()  # jobs in the batch (admitted by the model thread)
        self._rows = 0  # AR rows in the batch now (written by the model thread)
        self._accepting = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        self._serving: Future[None] | None = None
        # Counters for status (and for tests that prove a cache hit never reached the model).
        self.jobs_run = 0
        self.jobs_dropped = 0
        self.jobs_failed = 0
        self.failure_reasons: dict[str, int] = {}  # error reason -> count, for status and tests
        #: Set when the accelerator failed for good; `on_fatal` (set by the lifecycle) is then called.
        self.fatal: VallexError | None = None
        self.on_fatal: Callable[[VallexError], None] | None = None
        #: Seconds the model load took, and seconds the model thread spent stepping (for metrics).
        self.load_s: float | None = None
        self.busy_s = 0.0
        #: Metrics hook (see StepFn), set by the daemon's metrics.
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
        """Jobs in the batch now (each holds one or more AR rows, or is between two pieces)."""
        return len(self._running)

    @property
    def batch_size(self) -> int:
        """AR rows decoding now (<= max_batch)."""
        return self._rows

    async def start(self) -> None:
        """Load the engine in the model thread; a failure is Unavailable(MODEL_LOAD_FAILED)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
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
        self.nar_thread = self._wants_nar_thread()
        log.info("model loaded in %.1f s (device %s, dtype %s, max batch %d, NAR thread %s)", self.load_s,
                 getattr(self.engine, "device", "?"), getattr(self.engine, "dtype", "?"), self.max_batch,
                 "on" if self.nar_thread else "off")
        self._accepting = True
        self._serving = self._executor.submit(self._serve)
        self._serving.add_done_callback(_log_thread_death)

    async def stop(self, grace_s: float) -> None:
        """Refuse new jobs, let queued and running ones finish within `grace_s`, cut off the rest."""
        self._accepting = False
        if self._idle is not None and not self._idle.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=max(grace_s, 0.0))
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
            running = list(self._running)
        for job in waiting + running:
            self._fail(job, Unavailable("the daemon is shutting down", reason="SHUTTING_DOWN"))
        self._update_idle()
        if running and self._idle is not None:
            # Their rows poll should_stop once per AR step: they leave within a step or a NAR stage.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=10.0)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._serving is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(self._serving), timeout=10.0)
            self._serving = None
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
        long_mode: str = "fixed",
    ) -> np.ndarray:
        """Queue one synthesis and wait for its float32 audio (24 kHz mono).

        `on_audio(piece)` is called on the event loop with each piece's vocoded float32 audio, in
        order, as soon as that piece is done; the return value is their concatenation.
        `long_mode`: "fixed" | "sliding" (see vallexd.inference.scheduler).
        """
        if not self._accepting or self._loop is None or self._idle is None:
            raise Unavailable("the daemon is shutting down" if self.engine else "the model is not loaded",
                              reason="SHUTTING_DOWN" if self.engine else "MODEL_NOT_LOADED")
        free_rows = max(self.max_batch - len(self._running), 0)
        if len(self._waiting) >= self.queue_limit + free_rows and (self._running or self._waiting):
            raise Busy(f"the queue is full ({self.queue_limit} waiting); retry later", reason="QUEUE_FULL",
                       details={"queue_limit": self.queue_limit})
        job = Job(list(pieces), prompt, sampling, time.monotonic() + timeout_s, self._loop.create_future(),
                  progress, on_audio, long_mode)
        with self._cv:
            self._waiting.append(job)
            self._cv.notify_all()
        self._idle.clear()

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
            raise cancelled_error()
        raise deadline_error(timeout_s)

    def _abandon(self, job: Job) -> None:
        job.abandon.set()
        with self._cv, contextlib.suppress(ValueError):
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
        if self._idle is not None and not self._running and not self._waiting:
            self._idle.set()

    def _wants_nar_thread(self) -> bool:
        if self.nar_thread_mode != "auto":
            return self.nar_thread_mode == "on"
        # Measured on CPUs, eager models only (bench/bench_two_cores.py, bench_serving.py); on a GPU
        # both stages would share one stream.  With max_batch 1 nothing steps beside a NAR, and
        # halving its threads would only slow it.
        engine = self.engine
        threads = int(getattr(engine, "threads", 1) or 1)
        return (str(getattr(engine, "device", "cpu")) == "cpu" and not getattr(engine, "compiled", False)
                and threads >= 2 and self.max_batch > 1)

    # ------------------------------------------------------------------ the model thread
    def _wake(self) -> None:
        """The NAR thread finished a piece: let a waiting scheduling loop look again."""
        with self._cv:
            self._cv.notify_all()

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under a daemon being killed
            self._loop.call_soon_threadsafe(fn, *args)

    def _take(self) -> Any:
        """Next waiting job as a scheduler Request (None when none waits); runs in the model thread."""
        while True:
            with self._cv:
                if not self._waiting:
                    return None
                job = self._waiting.popleft()
                if job.future.done() or job.should_stop():
                    self.jobs_dropped += 1
                    self._post(self._end, job, Timeout("request ran past its deadline while queued",
                                                       reason="DEADLINE"), None)
                    continue
                self._running.add(job)
            self.jobs_run += 1
            try:
                return self._request(job)
            except Exception as exc:  # invalid input: the job fails, the batch goes on
                self._finish(job, exc, None)

    def _request(self, job: Job) -> Any:
        loop_progress, loop_audio = job.progress, job.on_audio

        def piece_done(i: int, total: int, audio: np.ndarray) -> None:
            if loop_audio is not None:
                self._post(self._deliver, job, loop_audio, audio)
            if loop_progress is not None:
                self._post(self._deliver, job, loop_progress, i + 1, total)

        return self.engine.new_request(job.pieces, job.prompt, job.sampling, long_mode=job.long_mode,
                                       should_stop=job.should_stop, on_piece=piece_done, tag=job)

    def _finish(self, job: Job, error: Exception | None, audio: np.ndarray | None) -> None:
        """A job left the batch: hand its outcome to the loop (model thread)."""
        if error is not None:
            from vallexd.inference.engine import model_error  # the model thread has torch loaded

            err = model_error(error)
            if not isinstance(err, VallexError):
                err = self._classify(err) or err
            self.jobs_failed += 1
            if not isinstance(err, VallexError):
                log.error("synthesis failed", exc_info=err)
                err = Internal("synthesis failed; see the daemon log", reason="ENGINE_ERROR")
            reason = err.reason or err.code.value
            self.failure_reasons[reason] = self.failure_reasons.get(reason, 0) + 1
            self._post(self._end, job, err, None)
        else:
            self._post(self._end, job, None, np.asarray(audio, dtype=np.float32))

    def _serve(self) -> None:
        """The scheduling loop: admit at step boundaries, one batched step, finish what ended."""
        from vallexd.inference.scheduler import Scheduler

        # The engine of this loop: after a fatal accelerator error the loop thread sets
        # self.engine to None while this thread may still be finishing the failed batch.
        engine = self.engine

        def new_scheduler() -> Scheduler:
            return Scheduler(engine, self.max_batch, nar_thread=bool(self.nar_thread), wake=self._wake)

        sched = new_scheduler()
        try:
            while self._wait_for_work(sched):
                started = time.monotonic()
                try:
                    ended = sched.schedule(self._take)
                    self._rows = sched.batch_size
                    if not sched.idle:
                        if self.on_step is not None and sched.batch_size:
                            self.on_step(sched.batch_size)
                        ended += sched.step()
                except Exception as exc:  # a bug outside any one row: fail the batch, start afresh
                    err = self._classify(exc) if not isinstance(exc, VallexError) else None
                    if err is None:
                        log.exception("batch step failed")
                    ended = sched.fail_all(err or exc)
                    sched.close()
                    sched = new_scheduler()
                self.busy_s += time.monotonic() - started
                self._rows = sched.batch_size
                for req in ended:
                    self._finish(req.tag, req.error, None if req.error is not None else req.result())
        finally:
            sched.close()

    def _wait_for_work(self, sched: Any) -> bool:
        """Model thread, between passes: sleep while there is nothing to do; False once stopping
        with nothing left."""
        with self._cv:
            waited = time.monotonic()
            while sched.idle and not self._waiting and not self._stopping:
                self._rows = 0
                self._cv.wait()
            if not (sched.idle or sched.has_work or self._waiting or self._stopping):
                # Only the NAR thread has work: until it hands a piece back (_wake) or a new job
                # comes; at most 0.5 s, so cancelled requests are still polled.
                self._cv.wait(0.5)
            if self._stopping and sched.idle:
                return False
        if not sched.idle:  # waiting for the NAR thread is model time too
            self.busy_s += time.monotonic() - waited
        return True

    # ------------------------------------------------------------------ on the loop
    def _deliver(self, job: Job, fn: Callable[..., None], *args: Any) -> None:
        # Once the job's future is done (result sent, cancelled, timed out) a late piece or
        # progress frame would arrive after the response; drop it.
        if not job.future.done():
            fn(*args)

    def _end(self, job: Job, err: VallexError | None, audio: np.ndarray | None) -> None:
        with self._cv:
            self._running.discard(job)
        if not job.future.done():
            if err is not None:
                job.future.set_exception(err)
            else:
                job.future.set_result(audio)
        self._update_idle()

    # ------------------------------------------------------------------ accelerator failures
    def _classify(self, exc: BaseException) -> VallexError | None:
        """Model thread: OOM -> ResourceExhausted (memory released); a poisoned accelerator -> fatal."""
        from vallexd.inference.failures import classify, is_fatal  # torch is loaded by now

        err = classify(exc, str(getattr(self.engine, "device", "")))
        if err is not None and is_fatal(exc) and self.fatal is None:
            log.critical("fatal accelerator error: the daemon stops and must be restarted", exc_info=exc)
            self._post(self._on_fatal_error, err)
        return err

    def _on_fatal_error(self, err: VallexError) -> None:
        """On the loop: refuse everything from now on, report not-ready, tell the lifecycle (once)."""
        if self.fatal is not None:
            return
        self.fatal = err
        self._accepting = False
        self.engine = None  # model_loaded is False: /health answers 503, status says not loaded
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            self._fail(job, err)
        self._update_idle()
        if self.on_fatal is not None:
            self.on_fatal(err)


def _log_thread_death(serving: Any) -> None:
    """The scheduling loop only returns on stop; if it raised (a bug outside its own try), say so
    now: otherwise queued jobs would wait for their deadlines with nothing in the log."""
    exc = None if serving.cancelled() else serving.exception()
    if exc is not None:
        log.critical("the model thread died; requests will time out until a restart", exc_info=exc)
