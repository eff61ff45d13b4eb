"""Requests -> AR rows -> NAR -> vocoded pieces: the iteration-level scheduler of the model thread.

A `Request` is one synthesis (its pieces of text, prompt, sampling, long-text mode).  The
`Scheduler` turns its pieces into `ArRow`s of one shared `ArBatch`, at most `max_batch` rows at a
time, and between two AR steps:

- a row that finished its AR stage goes to the `NarStage` (NAR stages and vocoder, per row: on
  the CPU a padded NAR batch is no faster, the NAR being compute-bound), on a second thread when
  `nar_thread` (see nar_stage.py), so the other rows keep stepping meanwhile; finished pieces come
  back at the next step boundary and their audio goes to `on_piece` in piece order;
- free rows go first to running requests that have none (the next piece of a sliding request),
  then to new requests (FIFO), then to further pieces of running `fixed` requests (they are
  independent, so a long text uses the batch even alone, once its first piece is out);
- a request whose row failed (cancelled, non-finite logits) loses its other rows at once.

Every piece has its own generator, seeded from a seed list drawn from the request's generator
when the request is created, so a seeded request gives the same codes however its pieces are
scheduled and whoever shares the batch.  `sliding` mode (the reference's `sliding-window`):
after each piece a coin (p = 1/2, from the request's generator) decides whether the next piece
is prompted by the piece just made (its phonemes and codes) or by the request's own prompt; a
request without a prompt always uses the piece just made (else each piece would get a new random
voice).  Sliding pieces depend on each other, so they run one after another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vallexd.errors import Internal
from vallexd.inference.batch import ArBatch, ArRow
from vallexd.inference.model import Cancelled, language_ids
from vallexd.inference.nar_stage import NarStage, PieceWork

LONG_MODES = ("fixed", "sliding")

#: on_piece(index, total, audio): audio is float32 (samples,) at 24 kHz; called in piece order.
PieceFn = Callable[[int, int, np.ndarray], None]


@dataclass(eq=False)
class Request:
    """One synthesis.  Built by `Engine.new_request` (which validates everything first)."""

    inputs: list[tuple[list[int], Any]]  # per piece: (text ids, language or per-id languages)
    prompt_ids: list[int]  # the request's own prompt: enrolled transcript ids
    prompt_codes: torch.Tensor  # (P, 8) on the model's device (P = 0 without a prompt)
    prompt_language: str
    top_k: int
    temperature: float
    long_mode: str
    generator: torch.Generator  # the request's own: piece seeds and sliding coins
    seeds: list[int]  # one per piece
    should_stop: Callable[[], bool] | None = None
    on_piece: PieceFn | None = None
    tag: Any = None  # the caller's (the worker's job)
    # State.
    started: int = 0  # pieces handed to the batch
    rows: list[ArRow] = field(default_factory=list)
    done: dict[int, np.ndarray] = field(default_factory=dict)  # audio of finished pieces not yet emitted
    audio: list[np.ndarray] = field(default_factory=list)  # emitted pieces, in order
    error: Exception | None = None
    slide: tuple[list[int], torch.Tensor] | None = None  # (ids, codes (T, 8)) prompting the next piece

    @property
    def total(self) -> int:
        return len(self.inputs)

    @property
    def finished(self) -> bool:
        return self.error is not None or len(self.audio) == self.total

    @property
    def sliding(self) -> bool:
        return self.long_mode == "sliding"

    def wants_row(self) -> bool:
        """May this request start its next piece now?"""
        if self.error is not None or self.started == self.total:
            return False
        if not self.sliding:
            # Fixed pieces are independent, but the first runs alone until its audio is out: rows
            # beside it would slow its steps and its NAR, and time to first audio matters most.
            return bool(self.audio) or self.started == 0
        # A sliding piece needs the previous one finished (its codes may be the next prompt).
        return not self.rows and len(self.audio) + len(self.done) == self.started

    def result(self) -> np.ndarray:
        """The whole audio: the concatenation of the pieces (float32, 24 kHz)."""
        return np.concatenate(self.audio) if self.audio else np.zeros(0, dtype=np.float32)


class Scheduler:
    """Continuous batching over requests.  Every request's state lives in the calling (model)
    thread; with `nar_thread` the NAR stage computes on its own thread and only hands results back."""

    def __init__(self, engine: Any, max_batch: int = 1, *, nar_thread: bool = False,
                 wake: Callable[[], None] | None = None) -> None:
        """`wake()` is called from the NAR thread when a piece is done (see `has_work`)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.batch = ArBatch(engine.model)
        self.active: list[Request] = []
        self.stage = NarStage(engine, threaded=nar_thread, ar_rows=lambda: len(self.batch.rows), wake=wake)
        self._threads = self.stage.total_threads  # this thread's torch threads now

    @property
    def batch_size(self) -> int:
        return len(self.batch.rows)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.batch.rows)

    @property
    def idle(self) -> bool:
        return not self.active

    @property
    def has_work(self) -> bool:
        """Is there something to do without waiting: rows to step, pieces to start, or finished
        pieces to hand on?  (False while the only work left is on the NAR thread: wait for `wake`
        or call `wait()`.)"""
        if self.batch.rows or self.stage.has_completed or self.stage.has_queued:
            return True
        return self.free > 0 and any(req.wants_row() for req in self.active)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the NAR stage finishes a piece (or `timeout` s); returns at once if it has none."""
        self.stage.wait(timeout)

    def close(self) -> None:
        """Stop the NAR thread (pieces on it are dropped; their requests are failed or finished) and
        give this thread back all its torch threads (a new Scheduler reads them as its total)."""
        self.stage.close()
        if self._threads != self.stage.total_threads:
            torch.set_num_threads(self.stage.total_threads)
            self._threads = self.stage.total_threads

    def schedule(self, take: Callable[[], Request | None] | None = None) -> list[Request]:
        """Fill free rows at a step boundary: waiting pieces of running requests, new requests from
        `take()` (None when none waits), then more pieces of running fixed-mode requests.
        Returns the requests that ended meanwhile (cancelled while waiting, failed prefill)."""
        for req in self.active:  # requests between pieces or waiting for a row poll here
            if req.should_stop is not None and req.should_stop():
                self._fail(req, Cancelled())
        for req in list(self.active):
            if self.free and not req.rows and req.wants_row():
                self._start(req)
        while take is not None and self.free:
            req = take()
            if req is None:
                break
            self.active.append(req)
            self._start(req)
        for req in list(self.active):
            while self.free and req.wants_row():
                self._start(req)
        return self._collect()

    def add(self, req: Request) -> None:
        """Admit a request now (it gets a row at once if one is free)."""
        self.active.append(req)
        if self.free:
            self._start(req)

    def step(self) -> list[Request]:
        """One AR step for every row; rows that left go to the NAR stage, pieces it finished are
        handed on.  Returns the requests that ended (finished, or failed: `request.error`)."""
        self._finish_pieces(self.stage.completed())
        self._share_cores()
        for row in self.batch.step():
            req: Request = row.owner[0]
            if row in req.rows:
                req.rows.remove(row)
            if req.error is not None:
                continue
            if row.error is not None:
                self._fail(req, row.error)
                continue
            try:
                self._to_nar(req, row)
            except Exception as exc:
                self._fail(req, exc)
        if not self.batch.rows and self.stage.has_queued:
            # No row to step (schedule() admitted none): help the NAR thread with its queue.
            self._share_cores()
            self.stage.run_queued()
        self._finish_pieces(self.stage.completed())  # inline: this step's; threaded: any since
        return self._collect()

    def _share_cores(self) -> None:
        """This thread's torch threads: the rest of the cores while the NAR thread works, else all."""
        threads = self.stage.ar_threads()
        if threads != self._threads:
            torch.set_num_threads(threads)  # this thread's OpenMP team only
            self._threads = threads

    def fail_all(self, exc: Exception) -> list[Request]:
        for req in self.active:
            self._fail(req, exc)
        return self._collect()

    # ------------------------------------------------------------------ internals
    def _collect(self) -> list[Request]:
        ended = [r for r in self.active if r.finished]
        self.active = [r for r in self.active if not r.finished]
        return ended

    def _fail(self, req: Request, exc: Exception) -> None:
        if req.error is None:
            req.error = exc
        for row in req.rows:
            self.batch.remove(row)
        req.rows.clear()

    def _piece_prompt(self, req: Request) -> tuple[list[int], torch.Tensor]:
        if req.slide is not None:
            return req.slide
        return req.prompt_ids, req.prompt_codes

    def _start(self, req: Request) -> None:
        i = req.started
        req.started += 1
        ids, text_language = req.inputs[i]
        enroll, codes = self._piece_prompt(req)
        dev = req.prompt_codes.device
        x = torch.tensor(enroll + ids, dtype=torch.long, device=dev)
        langs = torch.tensor(language_ids(len(enroll), req.prompt_language, text_language, len(ids)),
                             dtype=torch.long, device=dev)
        gen = torch.Generator(device=dev).manual_seed(req.seeds[i])
        row = ArRow(x, langs, codes[:, 0], req.top_k, req.temperature, gen, req.should_stop,
                    owner=(req, i, codes, ids), text_len=len(ids))
        try:
            self.batch.add(row)
        except Exception as exc:
            self._fail(req, exc)
            return
        req.rows.append(row)

    def _to_nar(self, req: Request, row: ArRow) -> None:
        _, i, prompt_codes, ids = row.owner
        if not row.frames:  # EOS at once: a piece that says nothing is a failure, not silence
            raise Internal(f"the model produced no audio for piece {i + 1} of {req.total}",
                           reason="NO_AUDIO", details={"piece": i})

        def should_stop() -> bool:  # the request failed elsewhere, or its caller gave up
            return req.error is not None or (req.should_stop is not None and req.should_stop())

        codes0 = torch.tensor(row.frames, dtype=torch.long, device=row.x.device)
        self.stage.submit(PieceWork(req, i, row.x, row.langs, prompt_codes, codes0, ids, should_stop))

    def _finish_pieces(self, works: list[PieceWork]) -> None:
        """Pieces back from the NAR stage: the sliding coin, then audio out in piece order."""
        for work in works:
            req: Request = work.owner
            if req.error is not None or req not in self.active:
                continue  # failed meanwhile (its error is already reported)
            if work.error is not None:  # Cancelled, NonFiniteLogits, a vocoder failure...
                self._fail(req, work.error)
                continue
            assert work.codes is not None and work.audio is not None
            i = work.index
            req.done[i] = work.audio
            if req.sliding and i + 1 < req.total:
                # Always slide without a prompt of its own; else on a fair coin from the request's
                # RNG.  Sliding pieces run one after another, so the coins are drawn in piece order.
                own_prompt = req.prompt_codes.shape[0] > 0
                gen = req.generator
                coin = bool(torch.rand(1, generator=gen, device=gen.device) < 0.5) if own_prompt else True
                req.slide = (list(work.ids), work.codes) if coin and work.codes.shape[0] else None
            while len(req.audio) in req.done:  # emit in order
                k = len(req.audio)
                piece = req.done.pop(k)
                req.audio.append(piece)
                if req.on_piece is not None:
                    req.on_piece(k, req.total, piece)
