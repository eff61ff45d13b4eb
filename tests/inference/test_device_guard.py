"""Every tensor of the synthesis path is created on an explicit device, and the vocoder puts only
what decoding uses on the model's device.

`torch.set_default_device("meta")` turns any tensor created without a device into a meta tensor
(no data): on a GPU that same tensor would silently land on the CPU and either fail with a
device mismatch or cost a copy per step.  Mixed with the real CPU tensors it fails at once, and a
meta result cannot be read back, so a synthesis that completes under the guard proves it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from vallexd.inference.engine import Engine
from vallexd.inference.vocoder import Vocoder, vocoder_device
from vallexd.storage.prompts import Prompt
from vallexd.types import Sampling

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_models: Any) -> Engine:
    return Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu", dtype="float32")


@pytest.fixture
def meta_default() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_the_guard_catches_a_tensor_without_a_device(meta_default: None) -> None:
    assert torch.zeros(2).device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):  # mixing devices, or reading meta data
        (torch.ones(2, device="cpu") + torch.zeros(2)).tolist()


def test_synthesis_creates_no_tensor_without_a_device(engine: Engine, meta_default: None) -> None:
    prompt = Prompt(audio_tokens=np.arange(6 * 8).reshape(1, 6, 8) % 1024,
                    text_tokens=np.array([[30, 31]]), language="en")
    for sampling in (Sampling(top_k=1), Sampling(top_k=5, temperature=0.8, seed=3)):
        audio = engine.synthesize([([20, 21, 22], "en"), ([23, 24], ["en", "zh"])], prompt, sampling)
        assert isinstance(audio, np.ndarray) and audio.dtype == np.float32
        assert audio.size > 0 and np.isfinite(audio).all()
    codes = engine.generate_codes([25, 26], "ja", None, Sampling(top_k=1))
    assert codes.dtype == np.int64 and codes.shape[1] == 8


def test_vocoder_moves_only_what_decoding_uses(tiny_models: Any) -> None:
    """Placed on another device (meta stands in for cuda), the backbone, head and codebooks move;
    EnCodec's model, which decoding never runs (~89 MB at the published size), stays on the CPU."""
    vocoder = Vocoder.load(tiny_models.vocos_dir, torch.device("meta"))
    vocos = vocoder.vocos
    moved = [*vocos.backbone.parameters(), *vocos.head.parameters(), *vocos.head.buffers(),
             vocos.feature_extractor.codebook_weights]
    assert moved and {t.device.type for t in moved} == {"meta"}
    kept = list(vocos.feature_extractor.encodec.parameters())
    assert kept and {t.device.type for t in kept} == {"cpu"}
    assert not vocos.feature_extractor.codebook_weights.requires_grad
    # MPS keeps the vocoder on the CPU (complex FFT and fold are unverified there); CUDA keeps its index.
    assert vocoder_device(torch.device("mps")) == torch.device("cpu")
    assert vocoder_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
