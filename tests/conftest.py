"""Shared test fixtures: where ../shared is, and a skip when it is absent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference"
SHARED_PRESETS = SHARED / "presets"


def require_shared(path: Path) -> Path:
    """Return `path` or skip the test, saying where the shared material is expected."""
    if not path.exists():
        pytest.skip(f"shared reference material not found at {path} (expected ../shared beside the checkout)")
    return path


@pytest.fixture
def reference_dir() -> Path:
    return require_shared(REFERENCE)


@pytest.fixture
def shared_presets_dir() -> Path:
    return require_shared(SHARED_PRESETS)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """Tiny random VALL-E X + Vocos + EnCodec weights in the real file formats (see make_tiny)."""
    from vallexd.devtools import make_tiny  # imports torch: only tests that use the fixture pay for it

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module's in-process torch work single-threaded, then restore the thread count.

    The tiny model's ops are too small to gain from threads; on a shared, loaded 2-core box two
    OpenMP threads make them ~10x slower (barrier waits). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
