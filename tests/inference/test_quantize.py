"""int8 weight matmuls (`--quantize nar|all`): refused where they cannot run, batch-invariant,
close to float32 on the reference cases, and a quantized engine starts and synthesises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE, require_shared

from vallexd.errors import InvalidArgument
from vallexd.inference.checkpoint import load_model
from vallexd.inference.engine import Engine
from vallexd.inference.quantize import Int8Linear, check_int8, cpu_has_vnni, quantize_model, quantized
from vallexd.inference.scheduler import Scheduler
from vallexd.storage.prompts import Prompt
from vallexd.tools.conformance import read_cases
from vallexd.tools.drift import Drift, compare
from vallexd.types import Sampling

TINY = REFERENCE / "model-tiny"
NO_VNNI = "this CPU has no int8 dot products (avx512_vnni/avx_vnni/amx_int8)"
needs_vnni = pytest.mark.skipif(not cpu_has_vnni(), reason=NO_VNNI)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_check_int8_refuses_what_cannot_run(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: X\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    check_int8("none", torch.device("cpu"), info)  # nothing to check
    for mode, device, why in [("int4", "cpu", "unknown quantize mode"), ("nar", "cpu", "int8 dot-product"),
                              ("all", "meta", "CPU only")]:
        with pytest.raises(InvalidArgument) as err:
            check_int8(mode, torch.device(device), info)
        assert err.value.reason == "BAD_QUANTIZE" and why in err.value.message
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(info)
    if "fbgemm" in torch.backends.quantized.supported_engines:
        check_int8("all", torch.device("cpu"), info)


@needs_vnni
def test_int8_linear_is_per_row_and_close_to_float32() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(96, 64) * 0.1, torch.randn(96)
    q = Int8Linear(w, b)
    x = torch.randn(5, 3, 64)
    got = q(x)
    assert got.shape == (5, 3, 96) and got.dtype == torch.float32
    for i in range(5):  # a row's result does not depend on the rows beside it: bit-identical
        assert torch.equal(got[i], q(x[i : i + 1])[0])
    want = F.linear(x, w, b)
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    assert not torch.equal(got, want)  # it really ran in int8
    # bfloat16 inputs (--dtype bfloat16 with --quantize) come back float32.
    assert q(x.bfloat16()).dtype == torch.float32


@needs_vnni
@pytest.mark.parametrize("mode", ["nar", "all"])
def test_int8_agreement_on_reference_cases(mode: str) -> None:
    """Teacher-forced agreement per codebook with float32 eager, measured and bounded (bfloat16's
    is 0.993-0.999 on these cases; int8 measured 0.991-0.999, max |logit diff| 0.16)."""
    ckpt = require_shared(TINY / "checkpoint.pt")
    ref = load_model(ckpt, torch.device("cpu"), torch.float32)
    variant = load_model(ckpt, torch.device("cpu"), torch.float32)
    quantize_model(variant, mode)
    assert (quantized(variant.ar_decoder.layers[0].linear1.weight) is not None) == (mode == "all")
    assert quantized(variant.nar_decoder.layers[-1].self_attn.in_proj_weight) is not None
    assert set(variant.state_dict()) == set(ref.state_dict())  # the checkpoint's keys, unchanged
    total = Drift()
    for _, case in read_cases(TINY / "cases.jsonl"):
        total.add(compare(ref, variant, case))
    print(total.line(f"int8 {mode}"))
    forced = [total.forced(i) for i in range(8)]
    assert min(forced) >= 0.98, forced
    assert total.forced(0) == 1.0 if mode == "nar" else total.forced(0) < 1.0  # the AR is untouched by nar
    assert 0 < total.max_logit_diff < 0.5


# ---------------------------------------------------------------- a quantized engine
@pytest.fixture(scope="module")
def engine(tiny_models: Any) -> Engine:
    if not cpu_has_vnni():
        pytest.skip(NO_VNNI)
    return Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu", quantize="all")


@pytest.fixture(scope="module")
def prompt() -> Prompt:
    rng = np.random.default_rng(5)
    return Prompt(rng.integers(0, 1024, (1, 20, 8)), rng.integers(5, 70, (1, 4)), "zh")


REQUESTS = [  # (pieces, with prompt?, sampling, long_mode)
    ([([12, 30, 41], "en"), ([7, 55], "en")], True, Sampling(seed=11), "fixed"),
    ([([40, 41, 42, 43, 44], ["zh", "zh", "en", "en", "zh"])], False, Sampling(seed=12, top_k=7), "fixed"),
    ([([30, 31, 32, 33, 34, 35], "en")], True, Sampling(top_k=1), "fixed"),
]


def _run(engine: Engine, requests: list[Any], prompt: Prompt, max_batch: int) -> list[np.ndarray]:
    reqs = [engine.new_request(p, prompt if has else None, s, long_mode=mode) for p, has, s, mode in requests]
    sched = Scheduler(engine, max_batch)
    waiting = list(reqs)
    while waiting or not sched.idle:
        sched.schedule(lambda: waiting.pop(0) if waiting else None)
        for req in sched.step():
            assert req.error is None, req.error
    return [req.result() for req in reqs]


def test_quantized_engine_starts_synthesises_and_batches_like_alone(
        engine: Engine, tiny_models: Any, prompt: Prompt) -> None:
    assert engine.quantize == "all"
    plain = Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu")
    assert plain.quantize == "none" and plain.identity != engine.identity  # the cache key tells them apart
    audio = engine.synthesize([([12, 30, 41], "en")], prompt, Sampling(top_k=1))
    assert audio.dtype == np.float32 and len(audio) > 0 and np.isfinite(audio).all()
    alone = [_run(engine, [r], prompt, max_batch=1)[0] for r in REQUESTS]
    batched = _run(engine, REQUESTS, prompt, max_batch=4)
    for a, b in zip(alone, batched, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidArgument) as err:
        engine.compile()
    assert err.value.reason == "BAD_QUANTIZE"


def test_engine_load_refuses_unknown_mode(tiny_models: Any) -> None:
    with pytest.raises(InvalidArgument) as err:
        Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu", quantize="int4")
    assert err.value.reason == "BAD_QUANTIZE"
