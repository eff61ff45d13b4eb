"""One model run per identical request: concurrent cache misses with the same key share one run.

    result = await coalescer.run(key, produce, cancelled=ev, on_audio=cb, progress=report)

The first caller for a key starts `produce(run)` as its own task; callers arriving while it
is still running join it and get the same result (the same bytes) or the same error.  The
run is never tied to one caller: a caller that goes away (its `cancelled` event is set, or
its task is cancelled) only leaves; the run is cancelled (its `run.cancelled` event, which
`produce` hands to the worker) when the LAST caller has left, and from that moment a new
caller with the same key starts a fresh run instead of joining a dying one.

Audio pieces and progress that `produce` reports through `run.emit_audio` / `run.emit_progress`
reach every caller that is still waiting; one who joins late first gets the pieces made so far,
in order, then the rest as they come.

A joiner shares the first caller's deadline (the run was queued with it); all callers of
one daemon have the same request timeout, so a joiner can at most lose the seconds by
which it came later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from vallexd.errors import Timeout, cancelled_error

log = logging.getLogger(__name__)

T = TypeVar("T")
AudioFn = Callable[[np.ndarray], None]
ProgressFn = Callable[[int, int], None]


@dataclass(eq=False)
class _Waiter:
    on_audio: AudioFn | None
    progress: ProgressFn | None
    cancelled: asyncio.Event | None


class _RunCancelled(asyncio.Event):
    """Set when the last caller has left; `is_set()` also says True as soon as every caller's own
    `cancelled` is set, before the waiters wake up: the text stage and the step before the queue
    check it synchronously, so a request abandoned meanwhile never reaches the worker."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self._run = run

    def is_set(self) -> bool:
        waiters = self._run.waiters
        return super().is_set() or (
            bool(waiters) and all(w.cancelled is not None and w.cancelled.is_set() for w in waiters))


@dataclass(eq=False)
class Run:
    """One shared run. `produce` reads `cancelled` and reports through `emit_audio`/`emit_progress`."""

    key: str
    cancelled: asyncio.Event = field(init=False)
    task: asyncio.Task[Any] | None = None
    waiters: list[_Waiter] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    last_progress: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.cancelled = _RunCancelled(self)

    def emit_audio(self, chunk: np.ndarray) -> None:
        """A piece of the run's audio, in order (on the event loop)."""
        self.audio.append(chunk)
        for waiter in list(self.waiters):
            if waiter.on_audio is not None:
                _call(waiter.on_audio, chunk)

    def emit_progress(self, done: int, total: int) -> None:
        self.last_progress = (done, total)
        for waiter in list(self.waiters):
            if waiter.progress is not None:
                _call(waiter.progress, done, total)


def _call(fn: Callable[..., Any], *args: Any) -> None:
    # One caller's broken callback (e.g. its connection is gone) must not stop the others'.
    try:
        fn(*args)
    except Exception:
        log.exception("coalesced request: a callback failed")


class Coalescer(Generic[T]):
    """Runs keyed by cache key; see the module docstring."""

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        #: Requests that joined a run another request had started (for status and metrics).
        self.joined = 0

    @property
    def running(self) -> int:
        return len(self._runs)

    async def run(self, key: str, produce: Callable[[Run], Awaitable[T]], *,
                  cancelled: asyncio.Event | None = None, on_audio: AudioFn | None = None,
                  progress: ProgressFn | None = None) -> T:
        """The result of the (possibly shared) run for `key`, or its exception.

        Raises Timeout(CANCELLED) when `cancelled` is set before the run ends (the run itself
        goes on while other callers wait); re-raises CancelledError if this task is cancelled.
        """
        run = self._runs.get(key)
        if run is None:
            run = Run(key)
            self._runs[key] = run
            run.task = asyncio.get_running_loop().create_task(self._drive(run, produce))
        else:
            self.joined += 1
        waiter = _Waiter(on_audio, progress, cancelled)
        run.waiters.append(waiter)
        # Catch up on what the run already made before this caller came.
        for chunk in list(run.audio):
            if on_audio is not None:
                _call(on_audio, chunk)
        if progress is not None and run.last_progress is not None:
            _call(progress, *run.last_progress)
        try:
            return await self._wait(run, cancelled)
        except Timeout:
            if self._leave(run, waiter):
                # The last caller gave up: let the stop reach the worker (a queued job leaves the
                # queue, a running one is abandoned) before answering, as a lone request would.
                await asyncio.wait({run.task})
            raise
        finally:
            self._leave(run, waiter)

    async def _drive(self, run: Run, produce: Callable[[Run], Awaitable[T]]) -> T:
        try:
            return await produce(run)
        finally:
            if self._runs.get(run.key) is run:
                del self._runs[run.key]

    @staticmethod
    async def _wait(run: Run, cancelled: asyncio.Event | None) -> T:
        assert run.task is not None
        watch: set[asyncio.Future[Any]] = {run.task}
        gone = asyncio.ensure_future(cancelled.wait()) if cancelled is not None else None
        if gone is not None:
            watch.add(gone)
        try:
            # asyncio.wait never cancels what it watches: cancelling this caller leaves the run alone.
            await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if gone is not None:
                gone.cancel()
        if run.task.done():
            return run.task.result()
        raise cancelled_error()

    def _leave(self, run: Run, waiter: _Waiter) -> bool:
        """Forget `waiter`; True if it was the last one and the run is now being stopped."""
        try:
            run.waiters.remove(waiter)
        except ValueError:
            return False  # already left
        if run.waiters or run.task is None or run.task.done():
            return False
        # Nobody waits any more: stop the model, and let a newcomer start afresh.
        run.cancelled.set()
        if self._runs.get(run.key) is run:
            del self._runs[run.key]
        run.task.add_done_callback(_retrieve)
        return True


def _retrieve(task: asyncio.Task[Any]) -> None:
    # A run nobody waits for ends in CANCELLED; read it so asyncio does not warn.
    if not task.cancelled():
        task.exception()
