# ruff: noqa: F811  (the imported fixtures `engine` and `prompt` are test parameters by name)
"""Continuous batching gives every row the numbers it would get alone.

Rows of different text lengths, prompt lengths (including none) and languages share one batch,
join and leave at step boundaries, and one can be cancelled without disturbing the others.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import REFERENCE, require_shared
from shared_fixtures import engine, prompt  # noqa: F401

from vallexd.errors import Timeout
from vallexd.inference.batch import ArBatch, ArRow
from vallexd.inference.checkpoint import load_model
from vallexd.inference.engine import Engine
from vallexd.inference.model import Cancelled, VallEX
from vallexd.inference.scheduler import Scheduler
from vallexd.storage.prompts import Prompt
from vallexd.tools.conformance import read_cases
from vallexd.tools.drift import case_inputs
from vallexd.types import Sampling

TINY = REFERENCE / "model-tiny"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference() -> tuple[VallEX, list[dict[str, Any]]]:
    model = load_model(require_shared(TINY / "checkpoint.pt"), torch.device("cpu"), torch.float32)
    return model, [case for _, case in read_cases(TINY / "cases.jsonl")]


def _row(case: dict[str, Any], **kw: Any) -> ArRow:
    x, langs, prompt = case_inputs(case)
    return ArRow(x, langs, prompt[:, 0], kw.pop("top_k", 1), 1.0, kw.pop("generator", None), owner=case, **kw)


def test_greedy_reference_cases_batched_with_others_join_and_leave(reference: Any) -> None:
    """All four reference cases (no prompt, per-token languages, different lengths) decode in one
    batch with two other requests, joining at different steps; each one's codes stay exact."""
    model, cases = reference
    others = [
        ArRow(torch.tensor([5, 9, 33, 40]), torch.tensor([1, 1, 1, 1]), torch.zeros(0, dtype=torch.long),
              1, 1.0, None, owner="zh-no-prompt"),
        ArRow(torch.tensor([20, 21, 22, 23, 24, 25]), torch.tensor([2] * 6), torch.arange(50) % 1024,
              1, 1.0, None, owner="ja-prompt"),
    ]
    joins = {0: [_row(cases[0]), others[0]], 3: [_row(cases[1])], 10: [_row(cases[2]), others[1]],
             40: [_row(cases[3])]}
    batch = ArBatch(model)
    sizes: list[int] = []
    done: list[ArRow] = []
    step = 0
    while step <= max(joins) or batch.rows:
        for row in joins.get(step, []):
            batch.add(row)
        sizes.append(len(batch.rows))
        done += batch.step()
        step += 1
    assert max(sizes) == 6 and len(set(sizes)) > 3  # rows really joined and left mid-run
    assert len(done) == 6 and all(r.error is None for r in done)
    for row in done:
        if isinstance(row.owner, dict):
            case = row.owner
            x, langs, prompt = case_inputs(case)
            codes0 = torch.tensor(row.frames)
            codes = model.generate_nar(x, langs, prompt, codes0)
            assert codes.tolist() == case["expected_codes"], f"case {case['case']}"
        else:  # the other requests: the same as alone
            alone = model.generate_ar(row.x, row.langs, row.prompt0, 1, 1.0, None)
            assert row.frames == alone.tolist()


def test_seeded_sampled_rows_same_alone_and_batched(reference: Any) -> None:
    model, cases = reference

    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    alone = {}
    for i, case in enumerate(cases):
        x, langs, prompt = case_inputs(case)
        alone[i] = model.generate_ar(x, langs, prompt[:, 0], 0 if i % 2 else 20, 0.8, gen(i)).tolist()
    batch = ArBatch(model)
    for i, case in enumerate(cases):
        row = _row(case, top_k=0 if i % 2 else 20, generator=gen(i))
        row.temperature = 0.8
        row.owner = i
        batch.add(row)
        batch.step()  # each joins one step after the previous
    done = []
    while batch.rows:
        done += batch.step()
    assert sorted(r.owner for r in done) == [0, 1, 2, 3]
    assert all(r.frames == alone[r.owner] for r in done)


def test_cancelling_one_row_leaves_the_others_alone(reference: Any) -> None:
    model, cases = reference
    stop = {"now": False}
    victim = _row(cases[3], should_stop=lambda: stop["now"])
    keep = _row(cases[0])
    batch = ArBatch(model)
    batch.add(victim)
    batch.add(keep)
    for _ in range(20):
        assert batch.step() == []
    stop["now"] = True
    left = batch.step()
    assert left == [victim] and isinstance(victim.error, Cancelled) and victim.cache is None
    while batch.rows:
        left += batch.step()
    x, langs, prompt = case_inputs(cases[0])
    codes = model.generate_nar(x, langs, prompt, torch.tensor(keep.frames))
    assert codes.tolist() == cases[0]["expected_codes"]


# ---------------------------------------------------------------- whole requests (Engine + Scheduler)

REQUESTS = [  # (pieces, with prompt?, sampling, long_mode)
    ([([12, 30, 41], "en"), ([7, 55], "en"), ([23, 24, 25, 26], "en")], True, Sampling(seed=11), "fixed"),
    ([([40, 41, 42, 43, 44], ["zh", "zh", "en", "en", "zh"])], False, Sampling(seed=12, top_k=7), "fixed"),
    ([([9, 8], "ja"), ([10, 11, 12], "ja")], True, Sampling(seed=13, temperature=0.7), "sliding"),
    ([([30, 31, 32, 33, 34, 35], "en")], True, Sampling(top_k=1), "fixed"),
]


def _run(engine: Engine, requests: list[tuple[Any, ...]], prompt: Prompt, max_batch: int,
         stagger: int = 0, nar_thread: bool = False) -> list[list[np.ndarray]]:
    pieces: list[list[np.ndarray]] = [[] for _ in requests]
    reqs = [engine.new_request(p, prompt if has else None, s, long_mode=mode,
                               on_piece=lambda i, n, a, k=k: pieces[k].append(a))
            for k, (p, has, s, mode) in enumerate(requests)]
    sched = Scheduler(engine, max_batch, nar_thread=nar_thread)
    waiting = list(reqs)
    steps = 0
    try:
        while waiting or not sched.idle:
            take = (lambda: waiting.pop(0) if waiting else None) if steps % (stagger + 1) == 0 else None
            sched.schedule(take)
            for req in sched.step():
                assert req.error is None, req.error
                np.testing.assert_array_equal(req.result(), np.concatenate(pieces[reqs.index(req)]))
            if not sched.has_work and not waiting:
                sched.wait(10)  # only the NAR thread has work
            steps += 1
    finally:
        sched.close()
    return pieces


@pytest.mark.parametrize("nar_thread", [False, True], ids=["inline-nar", "nar-thread"])
def test_requests_same_audio_alone_and_batched(engine: Engine, prompt: Prompt, nar_thread: bool) -> None:
    """Alone (batch 1, NAR inline) = batched with others = fixed pieces as parallel rows, with the
    NAR inline or on its own thread (sliding coins and piece order included)."""
    alone = [_run(engine, [r], prompt, max_batch=1)[0] for r in REQUESTS]
    batched = _run(engine, REQUESTS, prompt, max_batch=4, stagger=5, nar_thread=nar_thread)
    wide = _run(engine, REQUESTS, prompt, max_batch=8, nar_thread=nar_thread)  # fixed pieces as rows
    for a, b, c in zip(alone, batched, wide, strict=True):
        assert len(a) == len(b) == len(c)
        for x, y, z in zip(a, b, c, strict=True):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)


def test_engine_synthesize_pieces_concatenate_and_cancel(engine: Engine, prompt: Prompt) -> None:
    got: list[tuple[int, int, int]] = []
    audio = engine.synthesize(REQUESTS[0][0], prompt, Sampling(seed=3), max_batch=3,
                              on_piece=lambda i, n, a: got.append((i, n, len(a))))
    assert [g[:2] for g in got] == [(0, 3), (1, 3), (2, 3)]  # in order, although run in parallel
    assert len(audio) == sum(g[2] for g in got) and audio.dtype == np.float32
    with pytest.raises(Timeout) as info:
        engine.synthesize(REQUESTS[0][0], prompt, Sampling(seed=3), should_stop=lambda: True)
    assert info.value.reason == "CANCELLED"


@pytest.mark.parametrize("nar_thread", [False, True], ids=["inline-nar", "nar-thread"])
def test_fixed_pieces_run_in_parallel_after_the_first(engine: Engine, prompt: Prompt,
                                                      nar_thread: bool) -> None:
    req = engine.new_request(REQUESTS[0][0], prompt, Sampling(top_k=1), long_mode="fixed")
    sched = Scheduler(engine, max_batch=4, nar_thread=nar_thread)
    sched.add(req)
    sizes = []
    try:
        while not sched.idle:
            sched.schedule()
            sizes.append(sched.batch_size)
            sched.step()
            if not sched.has_work:
                sched.wait(10)
    finally:
        sched.close()
    steps = [n for n in sizes if n]  # (with a NAR thread, passes while only its NAR runs step nothing)
    first = 16 * (4 + 3)  # piece 0: enrolled 4 + 3 tokens, greedy -> never EOS
    assert set(steps[:first]) == {1}  # the first piece alone: its audio comes as early as it can
    assert max(steps) == 2  # then the other two pieces side by side
    assert req.error is None and len(req.audio) == 3
