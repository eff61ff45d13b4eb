"""The model worker's batching: concurrent jobs share AR steps, leave independently, stream pieces.

Real engine (tiny random weights), real model thread.  Where a test needs the batch to stay
busy, `StepGate` holds the model thread before each batched AR step (it wraps the real step).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import numpy as np
import pytest
import torch

from vallexd.constants import HOP
from vallexd.errors import Busy, ResourceExhausted, Timeout
from vallexd.inference.devices import cpu_has_native_bf16
from vallexd.service.worker import ModelWorker
from vallexd.storage.prompts import Prompt
from vallexd.types import Sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = Prompt(np.random.default_rng(5).integers(0, 1024, (1, 20, 8)),
                np.random.default_rng(6).integers(5, 70, (1, 4)), "en")
JOBS = [  # (pieces, prompt, sampling)
    ([([12, 30, 41], "en"), ([7, 55], "en")], PROMPT, Sampling(seed=1)),
    ([([40, 41, 42, 43, 44, 45, 46], "zh")], None, Sampling(seed=2, top_k=5)),
    ([([9, 8, 7, 6], ["ja", "ja", "en", "en"])], PROMPT, Sampling(top_k=1)),
]


@pytest.fixture(scope="module")
def engine(tiny_models: Any) -> Any:
    from vallexd.inference.engine import Engine

    return Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu")


class StepGate:
    """Holds the model thread before each batched AR step while closed; counts steps and batch sizes."""

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = engine.model.ar_step
        self.open = threading.Event()
        self.open.set()
        self.sizes: list[int] = []
        monkeypatch.setattr(engine.model, "ar_step", self)

    def __call__(self, tokens: Any, *args: Any) -> Any:
        assert self.open.wait(30), "gate never opened"
        self.sizes.append(int(tokens.shape[0]))
        return self.real(tokens, *args)


async def _worker(engine: Any, **kw: Any) -> ModelWorker:
    worker = ModelWorker(lambda: engine, **{"queue_limit": 4, **kw})
    await worker.start()
    return worker


async def _alone(engine: Any) -> list[np.ndarray]:
    worker = await _worker(engine, max_batch=1)
    try:
        return [await worker.run(p, pr, s, timeout_s=60) for p, pr, s in JOBS]
    finally:
        await worker.stop(1.0)


@pytest.mark.parametrize("nar_thread", ["off", "on"])
async def test_concurrent_jobs_share_steps_and_get_their_own_audio(
        engine: Any, monkeypatch: pytest.MonkeyPatch, nar_thread: str) -> None:
    alone = await _alone(engine)
    gate = StepGate(engine, monkeypatch)
    worker = await _worker(engine, max_batch=4, nar_thread=nar_thread)
    assert worker.nar_thread is (nar_thread == "on")
    try:
        pieces: list[list[np.ndarray]] = [[] for _ in JOBS]
        tasks = [asyncio.ensure_future(worker.run(p, pr, s, timeout_s=60, on_audio=pieces[k].append,
                                                  long_mode="fixed"))
                 for k, (p, pr, s) in enumerate(JOBS)]
        results = await asyncio.gather(*tasks)
        assert max(gate.sizes) >= 3  # the jobs (and job 0's two fixed pieces) really shared steps
        for k, audio in enumerate(results):
            np.testing.assert_array_equal(audio, alone[k])  # the same as alone, to the last sample
            assert len(pieces[k]) == len(JOBS[k][0])  # one callback per piece, on the loop
            np.testing.assert_array_equal(np.concatenate(pieces[k]), audio)
            assert audio.dtype == np.float32 and all(p.dtype == np.float32 for p in pieces[k])
        assert worker.in_flight == 0 and worker.batch_size == 0 and worker.jobs_run == 3
    finally:
        await worker.stop(1.0)


async def test_full_batch_and_queue_give_busy_then_all_finish(engine: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    gate = StepGate(engine, monkeypatch)
    gate.open.clear()
    worker = await _worker(engine, max_batch=2, queue_limit=1)
    try:
        a = asyncio.ensure_future(worker.run(*JOBS[1][:3], timeout_s=60))
        b = asyncio.ensure_future(worker.run(*JOBS[2][:3], timeout_s=60))
        await _wait_for(lambda: worker.in_flight == 2 and worker.batch_size == 2)
        c = asyncio.ensure_future(worker.run(*JOBS[2][:3], timeout_s=60))
        await _wait_for(lambda: worker.queue_depth == 1)
        with pytest.raises(Busy) as info:
            await worker.run(*JOBS[1][:3], timeout_s=60)
        assert info.value.reason == "QUEUE_FULL"
        gate.open.set()
        out = await asyncio.gather(a, b, c)
        np.testing.assert_array_equal(out[1], out[2])  # greedy job, alone in its row or not
    finally:
        gate.open.set()
        await worker.stop(1.0)


@pytest.mark.parametrize("nar_thread", ["off", "on"])
async def test_cancelling_one_job_leaves_the_other_rows_alone(engine: Any, monkeypatch: pytest.MonkeyPatch,
                                                              nar_thread: str) -> None:
    alone = await _alone(engine)
    gate = StepGate(engine, monkeypatch)
    gate.open.clear()
    worker = await _worker(engine, max_batch=4, nar_thread=nar_thread)
    try:
        gone = asyncio.Event()
        victim = asyncio.ensure_future(worker.run(*JOBS[0][:3], timeout_s=60, cancelled=gone))
        keep = asyncio.ensure_future(worker.run(*JOBS[2][:3], timeout_s=60))
        await _wait_for(lambda: worker.batch_size == 2)  # job 0's first piece + job 2
        gone.set()
        with pytest.raises(Timeout) as info:
            await asyncio.wait_for(victim, 10)
        assert info.value.reason == "CANCELLED"
        gate.open.set()
        np.testing.assert_array_equal(await keep, alone[2])
        await _wait_for(lambda: worker.in_flight == 0)
        assert worker.failure_reasons == {"CANCELLED": 1}
        assert gate.sizes[-1] == 1  # the victim's rows left; the survivor went on alone
    finally:
        gate.open.set()
        await worker.stop(1.0)


@pytest.mark.parametrize("nar_thread", ["off", "on"])
async def test_sliding_and_fixed_long_modes(engine: Any, nar_thread: str) -> None:
    """Greedy, so lengths are 16 x S: fixed pieces enrol the prompt's transcript; sliding pieces
    after the first enrol either it or the previous piece (a coin per piece; always without voice)."""
    worker = await _worker(engine, max_batch=4, nar_thread=nar_thread)
    texts = [[12, 30, 41], [7, 55], [23, 24, 25, 26], [5, 6]]
    pieces = [(t, "en") for t in texts]
    e = PROMPT.text_tokens.shape[1]

    async def frames(prompt: Prompt | None, mode: str, seed: int) -> list[int]:
        got: list[int] = []
        await worker.run(pieces, prompt, Sampling(top_k=1, seed=seed), timeout_s=60,
                         on_audio=lambda a: got.append(len(a) // HOP), long_mode=mode)
        return got

    try:
        assert await frames(PROMPT, "fixed", 0) == [16 * (e + len(t)) for t in texts]
        no_voice = [16 * len(texts[0])] + [16 * (len(p) + len(t)) for p, t in itertools.pairwise(texts)]
        assert await frames(None, "fixed", 0) == no_voice  # without a voice a request always slides
        assert await frames(None, "sliding", 0) == no_voice
        seen = set()
        for seed in range(6):
            got = await frames(PROMPT, "sliding", seed)
            assert got[0] == 16 * (e + len(texts[0]))
            for k in range(1, len(texts)):
                slid = got[k] == 16 * (len(texts[k - 1]) + len(texts[k]))
                assert slid or got[k] == 16 * (e + len(texts[k]))
                seen.add(slid)
        assert seen == {True, False}  # both outcomes of the coin happen
    finally:
        await worker.stop(1.0)


class NarGate:
    """Holds `generate_nar` (wherever it runs) while closed; records the threads it ran on."""

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch, fail: Any = None,
                 first_only: bool = False) -> None:
        self.real = engine.model.generate_nar
        self.open = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []
        self.fail = fail  # fail(x) -> an exception to raise for that piece's text, or None
        self.first_only = first_only  # hold only the first call
        monkeypatch.setattr(engine.model, "generate_nar", self)

    def __call__(self, x: Any, *args: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        if len(self.threads) == 1 or not self.first_only:
            assert self.open.wait(30), "gate never opened"
        err = self.fail(x) if self.fail is not None else None
        if err is not None:
            raise err
        return self.real(x, *args)


LONG = ([(list(range(20, 32)), "en")], PROMPT, Sampling(top_k=1))  # greedy: 16 x (4 + 12) frames
SHORT = ([([5, 6], "en")], PROMPT, Sampling(top_k=1))  # 16 x (4 + 2) frames


async def test_nar_thread_runs_a_finished_piece_while_the_other_rows_step(
        engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The short job's NAR is held on the NAR thread; the long job's AR steps go on meanwhile (the
    point of the thread), and both give what they give alone."""
    alone = await _alone_jobs(engine, [LONG, SHORT])
    steps = StepGate(engine, monkeypatch)
    nar = NarGate(engine, monkeypatch)
    worker = await _worker(engine, max_batch=4, nar_thread="on")
    try:
        long = asyncio.ensure_future(worker.run(*LONG, timeout_s=60))
        short = asyncio.ensure_future(worker.run(*SHORT, timeout_s=60))
        await _wait_for(nar.entered.is_set)  # the short piece reached its NAR (held)
        held_at = len(steps.sizes)
        await _wait_for(lambda: len(steps.sizes) >= held_at + 40)  # ... while the long row steps
        assert not short.done() and set(steps.sizes[held_at:]) == {1}
        nar.open.set()
        got = await asyncio.gather(long, short)
        for a, b in zip(got, alone, strict=True):
            np.testing.assert_array_equal(a, b)
        assert nar.threads[0] == "vallexd-nar"  # (the long piece's NAR may run on either thread)
        assert worker.in_flight == 0 and worker.batch_size == 0
    finally:
        nar.open.set()
        await worker.stop(1.0)


async def test_model_thread_without_rows_takes_a_waiting_piece(engine: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rows end at the same step: one piece's NAR is held on the NAR thread, and the model
    thread, with no row left to step, runs the other itself instead of waiting behind it."""
    alone = await _alone_jobs(engine, [SHORT])
    nar = NarGate(engine, monkeypatch, first_only=True)
    worker = await _worker(engine, max_batch=2, nar_thread="on")
    try:
        first = asyncio.ensure_future(worker.run(*SHORT, timeout_s=60))
        second = asyncio.ensure_future(worker.run(*SHORT, timeout_s=60))
        done, _ = await asyncio.wait({first, second}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and nar.threads[0] == "vallexd-nar"  # one ended while the other is held
        assert nar.threads[1].startswith("vallexd-model")
        np.testing.assert_array_equal(done.pop().result(), alone[0])
        nar.open.set()
        for audio in await asyncio.gather(first, second):
            np.testing.assert_array_equal(audio, alone[0])
    finally:
        nar.open.set()
        await worker.stop(1.0)


async def test_cancel_and_failure_on_the_nar_thread_leave_the_others_alone(
        engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job cancelled while its piece waits on the NAR thread ends CANCELLED; a NAR that runs out
    of memory there fails only its own job (RESOURCE_EXHAUSTED); the long job is unaffected."""
    alone = await _alone_jobs(engine, [LONG])
    failing = ([([7, 8, 9], "en")], PROMPT, Sampling(top_k=1))

    def fail(x: Any) -> BaseException | None:
        if x.tolist()[-3:] == [7, 8, 9]:
            try:
                torch.empty(10**14, dtype=torch.uint8)  # the real CPU allocator refuses 100 TB
            except RuntimeError as exc:
                return exc
        return None

    nar = NarGate(engine, monkeypatch, fail=fail)
    worker = await _worker(engine, max_batch=4, nar_thread="on")
    try:
        gone = asyncio.Event()
        long = asyncio.ensure_future(worker.run(*LONG, timeout_s=60))
        victim = asyncio.ensure_future(worker.run(*SHORT, timeout_s=60, cancelled=gone))
        oom = asyncio.ensure_future(worker.run(*failing, timeout_s=60))
        await _wait_for(nar.entered.is_set)  # SHORT is the first to finish its AR: held in its NAR
        gone.set()
        with pytest.raises(Timeout) as info:
            await asyncio.wait_for(victim, 10)
        assert info.value.reason == "CANCELLED"
        nar.open.set()
        with pytest.raises(ResourceExhausted) as oom_info:
            await oom
        assert oom_info.value.reason == "OUT_OF_MEMORY"
        np.testing.assert_array_equal(await long, alone[0])
        await _wait_for(lambda: worker.in_flight == 0)
        assert worker.failure_reasons == {"CANCELLED": 1, "OUT_OF_MEMORY": 1}
        assert worker.fatal is None and worker.model_loaded
    finally:
        nar.open.set()
        await worker.stop(1.0)


async def _alone_jobs(engine: Any, jobs: list[Any]) -> list[np.ndarray]:
    worker = await _worker(engine, max_batch=1)
    try:
        return [await worker.run(*job, timeout_s=60) for job in jobs]
    finally:
        await worker.stop(1.0)


async def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _drift(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")


@pytest.mark.skipif(not cpu_has_native_bf16(),
                    reason="this CPU has no native bfloat16 (avx512_bf16/amx_bf16): bfloat16 is refused")
async def test_bfloat16_worker_starts_and_synthesises(tiny_models: Any) -> None:
    from vallexd.service.worker import default_loader

    worker = ModelWorker(default_loader(tiny_models.checkpoint, tiny_models.vocos_dir, "cpu", "bfloat16", 1),
                         queue_limit=2, max_batch=2)
    await worker.start()
    try:
        assert worker.engine.dtype == "bfloat16"
        audio = await worker.run(*JOBS[2][:3], timeout_s=60)  # greedy: never EOS on random weights
        assert audio.dtype == np.float32 and np.isfinite(audio).all() and len(audio) == 16 * (4 + 4) * HOP
        both = await asyncio.gather(*(worker.run(p, pr, s, timeout_s=60) for p, pr, s in JOBS[:2]))
        assert all(len(a) and np.isfinite(a).all() for a in both)
    finally:
        await worker.stop(1.0)


@pytest.mark.slow  # torch.compile's C++ build takes ~100 s on the shared 2-core box
async def test_compile_starts_and_synthesises_the_same(tiny_models: Any, engine: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from vallexd.service.worker import default_loader

    want = await _alone(engine)
    worker = ModelWorker(default_loader(tiny_models.checkpoint, tiny_models.vocos_dir, "cpu", "float32", 1,
                                        compile=True), queue_limit=2, max_batch=4)
    with caplog.at_level("INFO", logger="vallexd.service.worker"):
        await worker.start()  # compiled and warmed up before it accepts anything
    try:
        assert worker.engine.compiled and any("compiled in" in r.message for r in caplog.records)
        got = await asyncio.gather(*(worker.run(p, pr, s, timeout_s=120) for p, pr, s in JOBS))
        for a, b in zip(got, want, strict=True):
            assert _drift(a, b) < 1e-3  # greedy/seeded codes the same; the vocoder is not compiled
    finally:
        await worker.stop(1.0)
