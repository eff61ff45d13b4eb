"""Engine failures through the real worker and service: out of memory is RESOURCE_EXHAUSTED and the
next request is served; a poisoned accelerator is fatal (not-ready, lifecycle told); a bug is INTERNAL.

The failures are raised inside the real model, at its AR decoding step (`ar_decoder.step`, after the
KV cache is allocated), so the whole path from the model thread to the caller is the real one. One
of them is a genuine CPU allocator failure (a 100 TB request), not a constructed exception.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from service.test_service import make_config, started, synth

from vallexd.errors import HTTP_STATUS, ErrorCode, ResourceExhausted, Unavailable, VallexError
from vallexd.inference.failures import classify, is_fatal, is_out_of_memory

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_models: Any) -> Any:
    from vallexd.inference.engine import Engine

    return Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu", dtype="float32")


class FailingStep:
    """Replaces the AR decoder's step once: records the KV cache(s) weakly, then raises `make()`.

    The step gets one cache tensor, or a list of them (one per batch row) where requests are batched.
    """

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch, make: Any, times: int = 1) -> None:
        self.decoder = engine.model.ar_decoder
        self.real = self.decoder.step
        self.make = make
        self.times = times
        self.caches: list[weakref.ref[torch.Tensor]] = []
        monkeypatch.setattr(self.decoder, "step", self)

    def __call__(self, x: torch.Tensor, cache: Any, *rest: Any) -> torch.Tensor:
        if self.times > 0:
            self.times -= 1
            tensors = cache if isinstance(cache, (list, tuple)) else [cache]
            self.caches = [weakref.ref(t) for t in tensors]
            raise self.make()
        return self.real(x, cache, *rest)


def cpu_allocator_failure() -> BaseException:
    try:
        torch.empty(10**14, dtype=torch.uint8)  # 100 TB: the CPU allocator refuses
    except RuntimeError as exc:
        return exc
    raise AssertionError("a 100 TB allocation succeeded")


@pytest.mark.parametrize(
    "make",
    [lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), cpu_allocator_failure],
    ids=["cuda-oom-type", "real-cpu-allocator"],
)
async def test_out_of_memory_is_resource_exhausted_and_next_request_succeeds(
    tmp_path: Path, engine: Any, monkeypatch: pytest.MonkeyPatch, make: Any
) -> None:
    service = await started(make_config(tmp_path, None), engine)
    try:
        failing = FailingStep(engine, monkeypatch, make)
        params = {"text": "Hi.", "language": "en", "seed": 5}
        with pytest.raises(ResourceExhausted) as info:
            await synth(service, params)
        err = info.value
        assert err.code is ErrorCode.RESOURCE_EXHAUSTED and err.reason == "OUT_OF_MEMORY"
        assert isinstance(err, Unavailable) and err.http_status == 503
        assert "out of memory on cpu" in err.message
        gc.collect()
        assert failing.caches and all(ref() is None for ref in failing.caches), "the KV cache lives on"
        assert service.worker.fatal is None and service.worker.model_loaded
        # The daemon goes on: the same request now succeeds, and nothing was cached for the failure.
        ok = await synth(service, params)
        assert ok["cached"] is False and len(ok["audio"]) > 44
        status = await service.status()
        assert status["model_loaded"] and status["counters"]["engine_failures"] == 1
        assert status["device_info"]["device"] == "cpu" and status["device_info"]["type"] == "cpu"
    finally:
        await service.drain(1.0)


async def test_fatal_accelerator_error_reports_not_ready_and_tells_the_lifecycle(
    tmp_path: Path, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await started(make_config(tmp_path, None), engine)
    told: list[VallexError] = []
    service.worker.on_fatal = told.append
    try:
        FailingStep(engine, monkeypatch, lambda: torch.AcceleratorError(
            "CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"))
        with pytest.raises(Unavailable) as info:
            await synth(service, {"text": "Hi.", "language": "en", "seed": 1})
        assert info.value.code is ErrorCode.UNAVAILABLE and info.value.reason == "ACCELERATOR_FAILED"
        await asyncio.sleep(0)  # the fatal callback is scheduled from the model thread
        assert [e.reason for e in told] == ["ACCELERATOR_FAILED"]
        assert service.worker.fatal is told[0]
        assert service.health()["model_loaded"] is False
        assert (await service.status())["model_loaded"] is False
        with pytest.raises(Unavailable):
            await synth(service, {"text": "Other.", "language": "en", "seed": 1})
    finally:
        await service.drain(1.0)


async def test_unexpected_error_stays_internal(tmp_path: Path, engine: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None), engine)
    try:
        FailingStep(engine, monkeypatch, lambda: RuntimeError("shape '[1, 3]' is invalid"))
        with pytest.raises(VallexError) as info:
            await synth(service, {"text": "Hi.", "language": "en", "seed": 1})
        assert info.value.code is ErrorCode.INTERNAL and info.value.reason == "ENGINE_ERROR"
        assert service.worker.fatal is None
        assert (await synth(service, {"text": "Hi.", "language": "en", "seed": 1}))["cached"] is False
    finally:
        await service.drain(1.0)


def test_classification_table() -> None:
    """Which messages are OOM, which poison the context; OOM raised through CUDA's error channel
    (AcceleratorError "CUDA error: out of memory") is recoverable, not fatal."""
    oom_via_cuda = torch.AcceleratorError("CUDA error: out of memory")
    assert is_out_of_memory(oom_via_cuda) and not is_fatal(oom_via_cuda)
    assert isinstance(classify(oom_via_cuda), ResourceExhausted)
    for text in ("CUDA error: an illegal memory access was encountered",
                 "CUDA error: unspecified launch failure",
                 "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"):
        assert is_fatal(RuntimeError(text)), text
        err = classify(RuntimeError(text), "cuda:0")
        assert isinstance(err, Unavailable) and err.reason == "ACCELERATOR_FAILED" and "cuda:0" in err.message
    for text in ("no kernel image is available", "expected scalar type Float but found Half"):
        assert not is_fatal(RuntimeError(text)) and classify(RuntimeError(text)) is None
    assert not is_fatal(ValueError("device-side assert"))  # only torch's runtime errors
    assert HTTP_STATUS[ErrorCode.RESOURCE_EXHAUSTED] == 503
    assert VallexError.from_wire(ResourceExhausted("x", reason="OUT_OF_MEMORY").to_wire()).__class__ is \
        ResourceExhausted
