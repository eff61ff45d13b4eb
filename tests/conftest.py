"""Shared test fixtures: where ../shared is (and a skip when it is absent), tiny weights, daemons.

Tests under integration/ start real daemon processes and are marked `slow` here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from daemon_harness import DaemonProcess, start_daemon

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
    from vallexd.tools.tiny_weights import (
        make_tiny,  # imports torch: only tests that use the fixture pay for it
    )

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ runs real daemon processes: mark it `slow`."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def daemon_factory(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: object
) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons on the tiny weights for one test module; each must exit 0 on SIGTERM at the end.

    `start(name, args=(), workdir=None, **start_daemon_kwargs)`: `workdir` defaults to a fresh
    folder; anything put there first (e.g. presets) is what the daemon sees.
    """
    started: list[DaemonProcess] = []

    def start(name: str, args: Sequence[str] = (), *, workdir: Path | None = None,
              **kwargs: object) -> DaemonProcess:
        d = start_daemon(workdir or tmp_path_factory.mktemp(name) / "d", tiny_models, list(args), **kwargs)
        started.append(d)
        return d

    yield start
    codes = [d.stop() for d in started]
    assert codes == [0] * len(codes), f"daemons exited with {codes}"
