"""The requests answered from the presets folders and the result cache alone, without the model:
presets.list / install / remove, cache.stats / prune.

`Service` (the daemon's core) is one of these plus the model; the Ray ingress
(vallexd.serve.ingress) is one of these plus handles to model replicas, so listing voices or
pruning the cache never waits behind a synthesis on a replica.  Torch-free.

`shared=True` when other processes use the same folders (Ray replicas): the stores then spare
young temp files when sweeping, and every read first picks up presets that another process
installed or removed (one stat per presets folder: `PresetStore.refresh`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from vallexd.config import Config
from vallexd.service.requests import validate_empty, validate_install, validate_prune, validate_remove
from vallexd.storage.cache import ResultCache
from vallexd.storage.presets import PresetStore


class StorageApi:
    """Presets and cache requests (docs/protocol.md). Blocking file I/O runs off the event loop."""

    def __init__(self, config: Config, *, shared: bool = False) -> None:
        self.config = config
        self.shared = shared
        self.cache = ResultCache(config.cache_dir, shared=shared)
        self.presets = PresetStore(config.presets_dirs, max_bytes=config.max_upload_bytes, shared=shared)

    async def refresh_presets(self) -> None:
        """With shared folders, see what other processes installed or removed meanwhile."""
        if self.shared:
            await asyncio.to_thread(self.presets.refresh)

    async def presets_list(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """{"presets": [{"name", "language", "frames", "seconds", ...}]}, sorted by name."""
        validate_empty(params)
        await self.refresh_presets()
        return {"presets": self.presets.listing()}

    async def presets_install(self, params: dict[str, Any]) -> dict[str, Any]:
        """Install `data` (.npz bytes) as preset `name`: InvalidArgument(BAD_PROMPT, BAD_NAME),
        TooLarge (over max_upload_bytes), AlreadyExists unless `overwrite`."""
        req = validate_install(params, max_bytes=self.config.max_upload_bytes)
        # No refresh first: install_prompt checks the file itself, so another process's install counts.
        preset = await asyncio.to_thread(self.presets.install, req.name, req.data, overwrite=req.overwrite)
        return {"name": preset.name, "language": preset.prompt.language, "frames": preset.prompt.num_frames}

    async def presets_remove(self, params: dict[str, Any]) -> dict[str, Any]:
        """Remove an installed preset: NotFound if it is not in the install folder."""
        name = validate_remove(params)
        await self.refresh_presets()
        await asyncio.to_thread(self.presets.remove, name)
        return {"name": name, "removed": True}

    async def rescan_presets(self) -> None:
        """SIGHUP: re-read the presets folders (files added or removed by hand)."""
        await asyncio.to_thread(self.presets.rescan)

    async def cache_stats(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """{"files", "bytes"} of the cached WAVs."""
        validate_empty(params)
        return await asyncio.to_thread(self.cache.stats)

    async def cache_prune(self, params: dict[str, Any]) -> dict[str, Any]:
        """Remove entries older than `max_age_s` (seconds), then the oldest until the cache is at
        most `max_bytes`; `dry_run` only counts. Returns removed/freed/remaining counts."""
        req = validate_prune(params)
        return await asyncio.to_thread(self.cache.prune, req.max_age_s, req.max_bytes, req.dry_run)
