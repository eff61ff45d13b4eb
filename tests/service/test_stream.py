"""Piece-by-piece audio from the service (SynthesisStream) on the real tiny engine.

The order of events is proven with a gate, not timing: the model thread is held after piece 0's
audio until the test has received that audio from the stream; a stream that only delivered at the
end would never open the gate (the test would fail on the gate's timeout).
"""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from test_service import make_config, started

from vallexd.constants import HOP
from vallexd.errors import NotFound, Timeout
from vallexd.storage.wav import read_pcm16

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "Go home now. Be very calm. Sit down here."


@pytest.fixture(scope="module")
def engine(tiny_models: Any) -> Any:
    """The real engine on tiny weights, loaded once for the module (as in test_service)."""
    from vallexd.inference.engine import Engine

    return Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu", dtype="float32")


class PieceGate:
    """Wraps the real Engine.new_request: after piece `hold_after`'s audio is handed over, the model
    thread waits until `release` is set. Counts the pieces the engine vocoded."""

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch, hold_after: int = 0) -> None:
        self.real = engine.new_request
        self.release = threading.Event()
        self.pieces_done = 0
        self.hold_after = hold_after
        monkeypatch.setattr(engine, "new_request", self)

    def __call__(self, *args: Any, on_piece: Any = None, **kwargs: Any) -> Any:
        def relay(index: int, total: int, samples: np.ndarray) -> None:
            self.pieces_done += 1
            on_piece(index, total, samples)
            if self.pieces_done == self.hold_after + 1:
                assert self.release.wait(30), "the stream never delivered the held piece"

        return self.real(*args, on_piece=relay if on_piece is not None else None, **kwargs)


async def test_first_piece_arrives_before_the_rest_is_made(tmp_path: Path, engine: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None, long_budget=16), engine)
    gate = PieceGate(engine, monkeypatch)
    try:
        pieces = []
        async with service.synthesize_stream({"text": TEXT, "language": "en", "seed": 4}) as stream:
            async for samples in stream.audio():
                pieces.append(samples)
                if len(pieces) == 1:
                    assert gate.pieces_done == 1  # the model is held right after piece 0
                    gate.release.set()
        result = stream.result
        assert result is not None and result.pieces == len(pieces) == 3 and result.audio is None
        # The concatenation is what the cache keeps.
        cached = await service.synthesize({"text": TEXT, "language": "en", "seed": 4})
        assert cached.cached
        pcm = read_pcm16(cached.audio or b"")
        assert pcm.size == sum(p.size for p in pieces)
        assert all(p.size % HOP == 0 and p.dtype == np.float32 for p in pieces)  # whole frames
    finally:
        await service.drain(1.0)


async def test_leaving_the_stream_cancels_the_rest(tmp_path: Path, engine: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None, long_budget=16), engine)
    gate = PieceGate(engine, monkeypatch)
    try:
        async with service.synthesize_stream({"text": TEXT, "language": "en", "seed": 5}) as stream:
            async for _ in stream.audio():
                break  # the client went away after the first piece
        gate.release.set()
        for _ in range(200):
            if service.worker.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        assert service.worker.in_flight == 0 and service.worker.queue_depth == 0
        assert gate.pieces_done == 1  # pieces 1 and 2 were never made
        assert service.worker.jobs_failed == 1  # ended as cancelled
        assert service.cache.lookup(stream.result.cache_key if stream.result else "0" * 64) is None
    finally:
        await service.drain(1.0)


async def test_cache_hit_streams_whole_audio_at_once(tmp_path: Path, engine: Any) -> None:
    service = await started(make_config(tmp_path, None), engine)
    try:
        first = await service.synthesize({"text": "Be calm.", "language": "en", "seed": 6})
        runs = service.worker.jobs_run
        async with service.synthesize_stream({"text": "Be calm.", "language": "en", "seed": 6,
                                              "format": "flac"}) as stream:
            chunks = [c async for c in stream.chunks()]
        assert service.worker.jobs_run == runs and stream.result is not None and stream.result.cached
        assert len(chunks) == 2 and chunks[1].last
        assert chunks[0].samples == read_pcm16(first.audio or b"").size
        with av.open(io.BytesIO(b"".join(c.data for c in chunks))) as c:
            assert sum(f.samples for f in c.decode(c.streams.audio[0])) == chunks[0].samples
    finally:
        await service.drain(1.0)


async def test_stream_errors_before_audio(tmp_path: Path, engine: Any) -> None:
    service = await started(make_config(tmp_path, None), engine)
    try:
        with pytest.raises(NotFound):
            async with service.synthesize_stream({"text": "Hi.", "voice": "nobody"}) as stream:
                async for _ in stream.audio():
                    pytest.fail("audio came before the error")
        cancelled = asyncio.Event()
        cancelled.set()
        with pytest.raises(Timeout):
            async with service.synthesize_stream({"text": "Hi."}, cancelled=cancelled) as stream:
                async for _ in stream.audio():
                    pytest.fail("audio came before the error")
    finally:
        await service.drain(1.0)


async def test_formats_on_synthesize(tmp_path: Path, engine: Any) -> None:
    service = await started(make_config(tmp_path, None), engine)
    try:
        wav = await service.synthesize({"text": "Be calm.", "language": "en", "seed": 7})
        mp3 = await service.synthesize({"text": "Be calm.", "language": "en", "seed": 7, "format": "mp3"})
        assert mp3.cached and mp3.format == "mp3"
        assert (mp3.audio or b"")[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")  # ID3 tag or MPEG frame sync
        fast = await service.synthesize({"text": "Be calm.", "language": "en", "seed": 7, "speed": 2.0,
                                         "format": "pcm"})
        samples = read_pcm16(wav.audio or b"").size
        assert abs(len(fast.audio or b"") // 2 - samples / 2) < 0.05 * samples
        assert fast.duration_s == pytest.approx(wav.duration_s / 2, abs=0.002)
    finally:
        await service.drain(1.0)


@pytest.mark.parametrize("params, field, reason", [
    ({"format": "ogg"}, "format", "BAD_VALUE"),
    ({"speed": 5}, "speed", "OUT_OF_RANGE"),
    ({"speed": True}, "speed", "BAD_TYPE"),
    ({"stream": 1}, "stream", "BAD_TYPE"),
    ({"return": "path", "format": "mp3"}, "format", "BAD_VALUE"),  # the path is the cached WAV
])
def test_format_speed_stream_validation(params: dict[str, Any], field: str, reason: str) -> None:
    from vallexd.errors import InvalidArgument
    from vallexd.service.requests import validate_synthesize

    with pytest.raises(InvalidArgument) as err:
        validate_synthesize({"text": "Hi.", **params}, max_text_chars=100)
    assert err.value.details["field"] == field and err.value.reason == reason
