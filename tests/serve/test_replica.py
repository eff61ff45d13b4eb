"""The replica's side of vallexd-ray without Ray: a ReplicaServer on a real Service (tiny weights)
answers in plain data that survives any process boundary (`{"ok"}` / `{"error": wire}`, stream
items), and two replicas on one cache and presets folder share entries and voices."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vallexd.config import Config
from vallexd.errors import VallexError
from vallexd.serve.replica import ReplicaServer
from vallexd.service.service import Service
from vallexd.service.stream import EncodedChunk
from vallexd.service.worker import ModelWorker
from vallexd.storage.prompts import Prompt, prompt_to_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_models: Any) -> Any:
    from vallexd.inference.engine import Engine

    return Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu", dtype="float32")


async def replica(tmp_path: Path, engine: Any, name: str) -> ReplicaServer:
    """A replica whose worker hands over the module's engine; every replica of a test shares the
    cache and presets folders under `tmp_path`."""
    config = Config(socket_path=tmp_path / "unused.sock", lock_path=tmp_path / "unused.lock",
                    checkpoint=None, vocos_dir=None, presets_dirs=(tmp_path / "presets",),
                    cache_dir=tmp_path / "cache", device="cpu", dtype="float32")
    worker = ModelWorker(lambda: engine, queue_limit=4)
    server = ReplicaServer(config, Service(config, worker=worker, warm_up=False, shared=True), name=name)
    await server.start()
    return server


async def test_replies_are_plain_data_and_errors_keep_their_codes(tmp_path: Path, engine: Any) -> None:
    server = await replica(tmp_path, engine, "r1")
    try:
        reply = await server.call("synthesize", {"text": "Hello.", "language": "en", "seed": 1})
        result = pickle.loads(pickle.dumps(reply))["ok"]  # what Ray does to it
        assert result.replica == "r1" and result.audio[:4] == b"RIFF" and result.cached is False
        error = (await server.call("synthesize", {"text": "", "language": "en"}))["error"]
        assert error["code"] == "INVALID_ARGUMENT" and error["reason"] == "EMPTY_TEXT"
        assert (await server.call("cache_prune", {}))["error"]["reason"] == "BAD_METHOD"
        status = (await server.call("status"))["ok"]
        assert status["replica"]["id"] == "r1" and status["state"] == "ready"

        items = [item async for item in server.stream({"text": "One. Two.", "language": "en", "seed": 2})]
        kinds = [kind for kind, _value in items]
        assert kinds[0] == "replica" and kinds[-1] == "result" and set(kinds[1:-1]) == {"chunk"}
        assert all(isinstance(value, EncodedChunk) for kind, value in items if kind == "chunk")
        assert pickle.loads(pickle.dumps(items))[-1][1].replica == "r1"
        failed = [item async for item in server.stream({"text": "Hi.", "voice": "nobody"})]
        assert failed[-1][0] == "error"
        assert VallexError.from_wire(failed[-1][1]).reason == "PRESET_NOT_FOUND"
    finally:
        await server.stop(5)


async def test_two_replicas_share_cache_entries_and_voices(tmp_path: Path, engine: Any) -> None:
    one, two = await replica(tmp_path, engine, "one"), await replica(tmp_path, engine, "two")
    try:
        params = {"text": "Shared words.", "language": "en", "seed": 3}
        made = (await one.call("synthesize", params))["ok"]
        again = (await two.call("synthesize", params))["ok"]
        assert not made.cached and again.cached and again.audio == made.audio
        rng = np.random.default_rng(0)
        data = prompt_to_bytes(Prompt(rng.integers(0, 1024, (1, 5, 8)), np.array([[5, 6, 7]]), "en"))
        await one.service.presets_install({"name": "Mika", "data": data})  # installed beside replica one
        spoken = (await two.call("synthesize", {"text": "Hi.", "language": "en", "voice": "Mika"}))
        assert "ok" in spoken, spoken
    finally:
        await one.stop(5)
        await two.stop(5)
