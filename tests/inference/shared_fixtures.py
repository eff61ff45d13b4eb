"""Fixtures shared by the batching and sampling tests (`from shared_fixtures import engine, prompt`):
the tiny engine and a prompt, module-scoped (each module loads the engine once)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vallexd.inference.engine import Engine
from vallexd.storage.prompts import Prompt


@pytest.fixture(scope="module")
def engine(tiny_models: Any) -> Engine:
    return Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu")


@pytest.fixture(scope="module")
def prompt() -> Prompt:
    rng = np.random.default_rng(5)
    return Prompt(rng.integers(0, 1024, (1, 20, 8)), rng.integers(5, 70, (1, 4)), "zh")
