# ruff: noqa: F811  (the imported fixtures `engine` and `prompt` are test parameters by name)
"""Sampling: per-request generators, top-k, temperature, the EOS/length rule and cancellation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from shared_fixtures import engine, prompt  # noqa: F401

from vallexd.errors import InvalidArgument, Timeout
from vallexd.inference.engine import Engine
from vallexd.inference.model import sample_token
from vallexd.storage.prompts import Prompt
from vallexd.types import Sampling

TEXT = [12, 30, 41, 7, 55, 23]  # S = 6 -> at most 96 frames


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _codes(engine: Engine, prompt: Prompt | None, **kw: Any) -> np.ndarray:
    return engine.generate_codes(TEXT, "en", prompt, Sampling(**kw))


def test_same_seed_same_codes(engine: Engine, prompt: Prompt) -> None:
    a = _codes(engine, prompt, seed=42)
    b = _codes(engine, prompt, seed=42)
    assert a.shape[1] == 8 and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)


def test_different_seeds_differ_with_top_k_off(engine: Engine, prompt: Prompt) -> None:
    a = _codes(engine, prompt, seed=1, top_k=0)
    b = _codes(engine, prompt, seed=2, top_k=0)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_unseeded_requests_neither_touch_nor_follow_global_rng(engine: Engine, prompt: Prompt) -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = _codes(engine, prompt)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG was not drawn from
    torch.manual_seed(1234)
    b = _codes(engine, prompt)
    # Same global seed, yet different output: unseeded requests draw their seed from `secrets`.
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_top_k_1_is_greedy(engine: Engine, prompt: Prompt) -> None:
    a = _codes(engine, prompt, seed=1, top_k=1)
    b = _codes(engine, prompt, seed=99, top_k=1, temperature=0.3)
    np.testing.assert_array_equal(a, b)
    logits = torch.randn(1, 1025, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(0)
    assert int(sample_token(logits, 1, 1.0, gen)) == int(logits.argmax())
    # The tiny random model never draws EOS greedily, so the stop rule gives exactly 16 x S frames.
    assert a.shape == (16 * (len(TEXT) + prompt.text_tokens.shape[1]), 8)


def test_top_k_keeps_only_the_k_best() -> None:
    logits = torch.randn(1, 1025, generator=torch.Generator().manual_seed(7))
    best = set(torch.topk(logits, 3).indices[0].tolist())
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_token(logits, 3, 5.0, gen)) for _ in range(300)}
    assert draws <= best and len(draws) == 3  # a hot temperature still stays inside the top 3
    wide = {int(sample_token(logits, 0, 5.0, gen)) for _ in range(300)}
    assert len(wide) > 50  # k <= 0 disables filtering


def test_low_temperature_concentrates_draws() -> None:
    logits = torch.randn(1, 1025, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(0)
    draws = [int(sample_token(logits, 0, 0.01, gen)) for _ in range(50)]
    assert draws.count(int(logits.argmax())) >= 45


def test_should_stop_cancels_within_a_step(engine: Engine, prompt: Prompt) -> None:
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 5

    with pytest.raises(Timeout) as info:
        engine.generate_codes(TEXT, "en", prompt, Sampling(seed=3), should_stop=stop)
    assert info.value.reason == "CANCELLED"
    assert calls == 5  # polled once per AR step, and the 5th poll stopped it


def test_should_stop_is_polled_per_ar_step_and_nar_stage(engine: Engine, prompt: Prompt) -> None:
    calls = 0

    def count() -> bool:
        nonlocal calls
        calls += 1
        return False

    codes = engine.generate_codes(TEXT, "en", prompt, Sampling(top_k=1), should_stop=count)
    assert calls == codes.shape[0] + 7  # one poll before each AR draw, one before each NAR stage


def test_synthesize_shares_one_generator(engine: Engine, prompt: Prompt) -> None:
    pieces = [(TEXT[:3], "en"), (TEXT[3:], ["en", "zh", "ja"])]
    seen: list[tuple[int, int]] = []
    a = engine.synthesize(pieces, prompt, Sampling(seed=8), progress=lambda d, t: seen.append((d, t)))
    b = engine.synthesize(pieces, prompt, Sampling(seed=8))
    assert seen == [(1, 2), (2, 2)]
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape[0] % 320 == 0 and np.isfinite(a).all()


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (([], "en"), "EMPTY_TEXT"),
        (([5, 2048], "en"), "BAD_TEXT_IDS"),
        (([5, -1], "en"), "BAD_TEXT_IDS"),
        (([5, 6], "fr"), "UNKNOWN_LANGUAGE"),
        (([5, 6], ["en"]), "BAD_TEXT_LANGUAGE"),
        (([5, 6], ["en", "xx"]), "UNKNOWN_LANGUAGE"),
        (([5, 6], [["en"], "en"]), "UNKNOWN_LANGUAGE"),
    ],
)
def test_bad_inputs_are_refused(engine: Engine, args: tuple[Any, Any], reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        engine.generate_codes(*args, None, Sampling())
    assert info.value.reason == reason


def test_bad_in_memory_prompt_is_refused(engine: Engine, prompt: Prompt) -> None:
    bad = Prompt(np.full((1, 4, 8), 1024), prompt.text_tokens, "en")
    with pytest.raises(InvalidArgument) as info:
        engine.generate_codes([5, 6], "en", bad, Sampling())
    assert info.value.reason == "BAD_PROMPT"


@pytest.mark.parametrize(
    "sampling",
    [Sampling(temperature=0), Sampling(temperature=float("nan")), Sampling(top_k=1.5)],
)  # type: ignore[arg-type]
def test_bad_sampling_is_refused(engine: Engine, sampling: Sampling) -> None:
    with pytest.raises(InvalidArgument) as info:
        engine.generate_codes([5, 6], "en", None, sampling)
    assert info.value.reason == "BAD_SAMPLING"


def test_tiny_temperature_is_refused_not_a_crash() -> None:
    """float32 logits / 1e-300 overflow to inf -> NaN softmax: refuse below MIN_TEMPERATURE instead."""
    from vallexd.constants import MIN_TEMPERATURE
    from vallexd.errors import InvalidArgument
    from vallexd.inference.engine import _check_sampling
    from vallexd.types import Sampling

    _check_sampling(Sampling(temperature=MIN_TEMPERATURE))
    with pytest.raises(InvalidArgument) as info:
        _check_sampling(Sampling(temperature=1e-300))
    assert info.value.reason == "BAD_SAMPLING"
