"""Finished AR rows -> NAR stages 1..7 -> vocoder, on a second thread while the AR batch steps.

Why a second thread: on a CPU the NAR is ~70 % of a request's work and compute-bound, while the AR
step of a small batch is bound by reading weights; run one after the other in one thread, each
leaves the other's resources idle.  Measured on the project's 2-core machine
(bench/bench_two_cores.py, one run, AVX-512 BF16/VNNI): one request's NAR on a second thread while
4 AR rows step finished both ×1.86 sooner than one after the other, against ×1.85 (NAR) and ×1.20
(AR) that the float32 batch-1 path gains from a second torch thread.

`NarStage.submit(work)` takes a `PieceWork` (a finished row's codebook-0 codes and its inputs);
`completed()` hands finished work back (codes (T, 8) and audio, or the error).  The scheduler keeps
every request's state in its own thread and applies completions at step boundaries; this thread
only computes.

Two modes:
- inline (`threaded=False`): `submit` computes at once in the caller's thread (batch 1, CUDA);
- threaded: one daemon thread works through the submitted pieces in order.  torch's intra-op
  thread count is per calling thread (OpenMP), so the two threads share the cores: while the AR
  batch has rows this thread uses `side_threads` and the AR thread the rest (`ar_threads()`);
  a piece started while it is empty gets them all.  An AR thread with no rows takes waiting
  pieces itself (`run_queued`), so no core idles behind a queue.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(eq=False)
class PieceWork:
    """One piece after its AR stage.  `codes`/`audio` or `error` are filled in by the stage."""

    owner: Any  # the scheduler's Request
    index: int  # piece index within the request
    x: torch.Tensor  # (S,) text ids, enrolled + new
    langs: torch.Tensor  # (S,) model language rows
    prompt_codes: torch.Tensor  # (P, 8) the prompt this piece was made with
    codes0: torch.Tensor  # (T,) codebook-0 codes from the AR stage
    ids: list[int]  # the piece's new text ids (a sliding request's next prompt transcript)
    should_stop: Callable[[], bool] | None = None  # polled before each NAR stage (Cancelled)
    codes: torch.Tensor | None = None  # (T, 8)
    audio: np.ndarray | None = None  # (T * 320,) float32 at 24 kHz
    error: Exception | None = None


class NarStage:
    def __init__(
        self,
        engine: Any,
        *,
        threaded: bool = False,
        ar_rows: Callable[[], int] = lambda: 0,
        wake: Callable[[], None] | None = None,
    ) -> None:
        """`engine`: has `.model.generate_nar` and `.decode`.  `ar_rows()`: rows in the AR batch now
        (read from this thread to size its torch threads).  `wake()`: called from this thread after
        each completion and when it starts a piece while others wait, so a scheduler waiting for
        work looks again."""
        self.engine = engine
        self.threaded = threaded
        self._ar_rows = ar_rows
        self._wake = wake
        self.total_threads = torch.get_num_threads()  # the creating (AR) thread's count
        self.side_threads = max(1, self.total_threads // 2)
        self._cv = threading.Condition()
        self._queue: deque[PieceWork] = deque()
        self._done: deque[PieceWork] = deque()
        self._working = False
        self._closed = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._loop, name="vallexd-nar", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ the scheduler's side
    def submit(self, work: PieceWork) -> None:
        if not self.threaded:
            self._run(work)
            return
        with self._cv:
            self._queue.append(work)
            self._cv.notify_all()

    def completed(self) -> list[PieceWork]:
        """Finished work, in the order it finished (which is the order submitted)."""
        with self._cv:
            out = list(self._done)
            self._done.clear()
        return out

    @property
    def has_completed(self) -> bool:
        return bool(self._done)

    @property
    def has_queued(self) -> bool:
        """Pieces waiting while the NAR thread is on another one (see `run_queued`)."""
        return self._working and bool(self._queue)

    def run_queued(self) -> bool:
        """Run the next waiting piece in the calling thread, if the NAR thread is busy with another;
        False when there is none.

        The scheduler calls this when its AR batch is empty: its cores would otherwise idle while
        the NAR thread works through a queue (after a burst, every row ends at about the same time).
        A piece the NAR thread is free to take is left to it: started there with no AR row
        stepping, it gets all the cores.
        """
        with self._cv:
            if not (self._working and self._queue):
                return False
            work = self._queue.popleft()
        self._run(work)
        return True

    @property
    def busy(self) -> bool:
        """Work queued or running on the stage's thread."""
        return self._working or bool(self._queue)

    def ar_threads(self) -> int:
        """torch threads the AR thread should use now: the rest of the cores while this stage works."""
        if self.threaded and self.busy:
            return max(1, self.total_threads - self.side_threads)
        return self.total_threads

    def wait(self, timeout: float | None = None) -> None:
        """Block until some work completed (or `timeout` seconds)."""
        with self._cv:
            if not self._done and (self._queue or self._working):
                self._cv.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread after the piece it is on (queued pieces are dropped) and wait for it:
        a daemon thread still inside torch when the interpreter exits aborts the process
        ("terminate called without an active exception", seen once at a benchmark's exit)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the work
    def _run(self, work: PieceWork) -> None:
        """Compute one piece (in whichever thread calls) and put it with the completed ones."""
        try:
            work.codes = self.engine.model.generate_nar(work.x, work.langs, work.prompt_codes, work.codes0,
                                                        work.should_stop)
            audio = self.engine.decode(work.codes.cpu().numpy().astype(np.int64, copy=False))
            work.audio = np.asarray(audio, dtype=np.float32)
        except Exception as exc:  # Cancelled, NonFiniteLogits, out of memory, a vocoder failure...
            work.error = exc
        with self._cv:
            self._done.append(work)
            self._cv.notify_all()

    def _loop(self) -> None:
        current = 0
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                work = self._queue.popleft()
                self._working = True
                more = bool(self._queue)
            if more and self._wake is not None:
                self._wake()  # a scheduler with no rows may take the next piece (run_queued)
            # All the cores while no AR row steps (nothing to share them with), else our share.
            want = self.side_threads if self._ar_rows() else self.total_threads
            if want != current:
                torch.set_num_threads(want)  # this thread's OpenMP team only
                current = want
            self._run(work)
            with self._cv:
                self._working = False
            if self._wake is not None:
                self._wake()
