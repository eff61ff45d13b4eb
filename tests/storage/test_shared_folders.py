"""Folders that several processes share (Ray replicas on one cache and presets folder): a sweep
spares another process's write in progress, and one store sees what another installed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from vallexd.storage.cache import ResultCache
from vallexd.storage.fsutil import SHARED_LEFTOVER_AGE_S
from vallexd.storage.presets import PresetStore
from vallexd.storage.prompts import Prompt, prompt_to_bytes


def _aged(path: Path, seconds: float) -> Path:
    path.write_bytes(b"partial")
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_a_shared_cache_sweeps_only_old_leftovers(tmp_path: Path) -> None:
    shard = tmp_path / "ab"
    shard.mkdir()
    young = _aged(shard / ".tmp-young.part", 5)  # another replica writing right now
    old = _aged(shard / ".tmp-old.part", SHARED_LEFTOVER_AGE_S + 60)  # a crash long ago
    ResultCache(tmp_path, shared=True)
    assert young.exists() and not old.exists()
    ResultCache(tmp_path)  # the sole owner (a daemon holding the lock) sweeps everything
    assert not young.exists()


def test_a_shared_preset_store_spares_young_temp_files(tmp_path: Path) -> None:
    young = _aged(tmp_path / ".Mika.npz.abc.tmp", 5)
    old = _aged(tmp_path / ".Old.npz.abc.tmp", SHARED_LEFTOVER_AGE_S + 60)
    PresetStore([tmp_path], max_bytes=1 << 20, shared=True).rescan()
    assert young.exists() and not old.exists()


def test_refresh_sees_what_another_store_installed_and_removed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = prompt_to_bytes(Prompt(rng.integers(0, 1024, (1, 5, 8)), np.array([[1, 2, 3]]), "en"))
    ingress = PresetStore([tmp_path], max_bytes=1 << 20, shared=True)
    replica = PresetStore([tmp_path], max_bytes=1 << 20, shared=True)
    ingress.rescan()
    replica.rescan()
    assert replica.refresh() is False  # nothing changed: no rescan, one stat
    ingress.install("Mika", data)
    assert replica.refresh() is True and replica.get("Mika").prompt.num_frames == 5
    ingress.remove("Mika")
    assert replica.refresh() is True and len(replica) == 0
