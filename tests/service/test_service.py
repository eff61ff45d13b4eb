"""Service + worker on the tiny random model: WAV results, cache hits without the model, queue limits,
cancellation, deadlines, long text, seeds, presets, drain.

The engine is the real one (tiny random weights).  `EngineProbe` wraps its `new_request` method (the
model thread calls it once per job it admits to the batch) on the instance to count jobs and, where a
test needs a job to stay "running", to hold it at a gate before the real method runs; it never replaces
what the engine computes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vallexd.config import Config
from vallexd.constants import HOP
from vallexd.errors import Busy, InvalidArgument, NotFound, Timeout, TooLarge, Unavailable, VallexError
from vallexd.service.service import Service
from vallexd.service.worker import ModelWorker
from vallexd.storage.prompts import Prompt, prompt_to_bytes
from vallexd.storage.wav import read_pcm16, wav_info
from vallexd.text import phonemize, split_text


async def synth(service: Service, params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Service.synthesize's result in its wire form (what the transports send)."""
    return (await service.synthesize(params, **kwargs)).to_wire()



class EngineProbe:
    """Counts jobs the model thread admits (Engine.new_request) and can hold it at a gate first."""

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = engine.new_request
        self.calls = 0
        self.outcomes: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        monkeypatch.setattr(engine, "new_request", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(30), "gate never opened"
        try:
            audio = self.real(*args, **kwargs)
        except VallexError as exc:
            self.outcomes.append(f"{exc.code.value}:{exc.reason}")
            raise
        self.outcomes.append("ok")
        return audio


def make_config(tmp_path: Path, tiny: Any, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "socket_path": tmp_path / "run" / "vallexd.sock",
        "lock_path": tmp_path / "run" / "vallexd.sock.lock",
        "checkpoint": getattr(tiny, "checkpoint", None),  # None: the test hands over a loaded engine
        "vocos_dir": getattr(tiny, "vocos_dir", None),
        "presets_dirs": (tmp_path / "presets",),
        "cache_dir": tmp_path / "cache",
        "device": "cpu",
        "dtype": "float32",
        "queue_limit": 4,
        "request_timeout_s": 60.0,
        "max_text_chars": 200,
    }
    values.update(overrides)
    return Config(**values)


@pytest.fixture(scope="module")
def engine(tiny_models: Any) -> Any:
    from vallexd.inference.engine import Engine

    phonemize("Warm up.", "en")  # load the English front end now, so no test's deadline pays for it
    return Engine.load(tiny_models.checkpoint, tiny_models.vocos_dir, device="cpu", dtype="float32")


async def started(config: Config, engine: Any) -> Service:
    """A Service whose worker's loader hands over the already loaded (module-wide) engine."""
    worker = ModelWorker(lambda: engine, queue_limit=config.queue_limit)
    service = Service(config, worker=worker, warm_up=False)
    await service.start()
    return service


def frames_for(text: str, language: str = "en", enrolled: int = 0) -> int:
    """Random weights never draw EOS: the AR stage runs to 16 x (enrolled + text) tokens."""
    return 16 * (enrolled + len(phonemize(text, language).ids))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


async def test_synthesize_then_cache_hit_without_model(tmp_path: Path, tiny_models: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # This one goes through the default loader (Engine.load from the configured paths).
    service = Service(make_config(tmp_path, tiny_models), warm_up=False)
    await service.start()
    try:
        probe = EngineProbe(service.worker.engine, monkeypatch)
        params = {"text": "Hi.", "language": "en", "seed": 7}
        first = await synth(service, params)
        assert probe.calls == 1 and first["cached"] is False and first["pieces"] == 1
        rate, frames = wav_info(first["audio"])
        assert rate == 24000 == first["sample_rate"]
        assert frames == frames_for("Hi.") * HOP
        assert first["duration_s"] == round(frames / rate, 3)
        assert Path(first["path"]).read_bytes() == first["audio"]
        assert Path(first["path"]).parent.parent == tmp_path / "cache"
        assert first["url"] is None  # no static server yet
        assert set(first["timings"]) == {"total_ms", "text_ms", "model_ms"}

        service.static_base_url = "http://127.0.0.1:8099"
        again = await synth(service, dict(params))
        assert again["cached"] is True and again["audio"] == first["audio"] and probe.calls == 1
        assert again["cache_key"] == first["cache_key"] and again["duration_s"] == first["duration_s"]
        key = first["cache_key"]
        assert again["url"] == f"http://127.0.0.1:8099/{key[:2]}/{key}.wav"

        as_path = await synth(service, {**params, "return": "path"})
        assert "audio" not in as_path and as_path["cached"] and as_path["path"] == first["path"]
        # Different spacing is the same request (normalised text in the key).
        assert (await synth(service, {**params, "text": "  Hi. "}))["cached"] is True
        assert probe.calls == 1

        fresh = await synth(service, {**params, "fresh": True})
        assert fresh["cached"] is False and probe.calls == 2
        assert fresh["audio"] == first["audio"]  # same seed: the same audio, entry replaced

        status = await service.status()
        assert status["model_loaded"] and status["model_identity"] == service.worker.engine.identity
        assert status["counters"]["cache_hits"] == 3 and status["counters"]["engine_runs"] == 2
        assert status["cache"]["files"] == 1 and status["queue_depth"] == 0 and status["in_flight"] == 0
        assert status["max_batch"] == service.config.max_batch == 4 and status["batch_size"] == 0
        assert status["device"] == "cpu" and status["static_url"] == "http://127.0.0.1:8099"
    finally:
        await service.drain(1.0)


async def test_seeds(tmp_path: Path, engine: Any) -> None:
    service = await started(make_config(tmp_path, None), engine)
    try:
        base = {"text": "Yo.", "language": "en", "fresh": True}
        a = await synth(service, {**base, "seed": 1})
        b = await synth(service, {**base, "seed": 1})
        c = await synth(service, {**base, "seed": 2})
        assert a["audio"] == b["audio"] and a["audio"] != c["audio"]
        # Unseeded requests are cached too (documented decision); fresh draws anew.
        u1 = await synth(service, {**base})
        u2 = await synth(service, {**base})
        assert u1["audio"] != u2["audio"]
        hit = await synth(service, {"text": "Yo.", "language": "en"})
        assert hit["cached"] and hit["audio"] == u2["audio"]
    finally:
        await service.drain(1.0)


async def test_voice_preset_prepends_enrolled_tokens(tmp_path: Path, engine: Any) -> None:
    service = await started(make_config(tmp_path, None), engine)
    try:
        import numpy as np

        prompt = Prompt(audio_tokens=np.arange(5 * 8).reshape(1, 5, 8), text_tokens=np.array([[20, 21]]),
                        language="ja")
        installed = await service.presets_install({"name": "Y'shtola-mini", "data": prompt_to_bytes(prompt)})
        assert installed == {"name": "Y'shtola-mini", "language": "ja", "frames": 5}
        listed = await service.presets_list()
        assert [p["name"] for p in listed["presets"]] == ["Y'shtola-mini"]
        with_voice = await synth(service, {"text": "Hi.", "language": "en", "voice": "Y'shtola-mini",
                                               "seed": 3})
        assert wav_info(with_voice["audio"])[1] == frames_for("Hi.", enrolled=2) * HOP
        without = await synth(service, {"text": "Hi.", "language": "en", "seed": 3})
        assert without["cache_key"] != with_voice["cache_key"]
        with pytest.raises(NotFound) as info:
            await synth(service, {"text": "Hi.", "voice": "nobody"})
        assert info.value.reason == "PRESET_NOT_FOUND"
        assert (await service.presets_remove({"name": "Y'shtola-mini"})) == {"name": "Y'shtola-mini",
                                                                              "removed": True}
        assert (await service.presets_list())["presets"] == []
    finally:
        await service.drain(1.0)


async def test_long_text_pieces_and_progress(tmp_path: Path, engine: Any) -> None:
    service = await started(make_config(tmp_path, None, long_budget=16), engine)
    try:
        text = "Go home now. Be very calm."
        pieces = split_text(text, "en", budget=16)
        assert len(pieces) == 2
        events: list[tuple[int, int]] = []
        result = await synth(service, {"text": text, "language": "en", "long": True, "seed": 1,
                                           "top_k": 1, "progress": True},  # greedy: never EOS
                                          progress=lambda done, total: events.append((done, total)))
        assert result["pieces"] == 2 and events == [(1, 2), (2, 2)]
        # No voice: the request slides, so piece 2 is prompted by piece 1 (its phonemes are enrolled).
        first = len(phonemize(pieces[0], "en").ids)
        expected = frames_for(pieces[0]) + frames_for(pieces[1], enrolled=first)
        assert wav_info(result["audio"])[1] == expected * HOP
        whole = await synth(service, {"text": text, "language": "en", "long": False, "seed": 1})
        assert whole["pieces"] == 1 and whole["cache_key"] != result["cache_key"]
    finally:
        await service.drain(1.0)


async def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_busy_when_queue_full_and_cancelled_job_dropped(tmp_path: Path, engine: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None, queue_limit=1), engine)
    probe = EngineProbe(engine, monkeypatch)
    probe.gate.clear()  # the first job will sit "running" in the model thread
    try:
        running = asyncio.ensure_future(synth(service, {"text": "Hi.", "language": "en"}))
        await _wait_for(lambda: service.worker.in_flight == 1)
        gone = asyncio.Event()
        waiting = asyncio.ensure_future(
            service.synthesize({"text": "Yo.", "language": "en"}, cancelled=gone))
        await _wait_for(lambda: service.worker.queue_depth == 1)
        with pytest.raises(Busy) as info:
            await synth(service, {"text": "Ok.", "language": "en"})
        assert info.value.reason == "QUEUE_FULL"

        gone.set()  # client b disconnects while queued
        with pytest.raises(Timeout) as cancelled:
            await asyncio.wait_for(waiting, 5)
        assert cancelled.value.reason == "CANCELLED"
        assert service.worker.queue_depth == 0  # its slot is free at once
        probe.gate.set()
        assert (await asyncio.wait_for(running, 30))["cached"] is False
        assert probe.calls == 1  # the dropped job never reached the engine
        assert service.worker.jobs_dropped == 1
    finally:
        probe.gate.set()
        await service.drain(1.0)


async def test_running_job_stops_when_client_goes(tmp_path: Path, engine: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None), engine)
    probe = EngineProbe(engine, monkeypatch)
    probe.gate.clear()
    try:
        gone = asyncio.Event()
        task = asyncio.ensure_future(
            service.synthesize({"text": "Hello there.", "language": "en"}, cancelled=gone))
        await _wait_for(probe.entered.is_set)  # the job is running in the model thread
        gone.set()
        with pytest.raises(Timeout) as info:
            await asyncio.wait_for(task, 5)
        assert info.value.reason == "CANCELLED"
        probe.gate.set()
        await _wait_for(lambda: service.worker.in_flight == 0)
        # The job reached the batch, saw should_stop() and left it at its first AR step.
        assert probe.outcomes == ["ok"] and service.worker.failure_reasons == {"CANCELLED": 1}
        assert (await service.cache_stats())["files"] == 0
    finally:
        probe.gate.set()
        await service.drain(1.0)


async def test_request_timeout(tmp_path: Path, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None, request_timeout_s=0.4), engine)
    probe = EngineProbe(engine, monkeypatch)
    probe.gate.clear()
    try:
        t0 = time.monotonic()
        running = asyncio.ensure_future(synth(service, {"text": "Hi.", "language": "en"}))
        queued = asyncio.ensure_future(synth(service, {"text": "Yo.", "language": "en"}))
        for task in (running, queued):
            with pytest.raises(Timeout) as info:
                await asyncio.wait_for(task, 5)
            assert info.value.reason == "DEADLINE"
        assert 0.4 <= time.monotonic() - t0 < 3
        assert service.worker.queue_depth == 0  # the overdue queued job left the queue at once
        probe.gate.set()
        await _wait_for(lambda: service.worker.in_flight == 0)
        assert probe.calls == 1  # the queued one never reached the model
        assert service.worker.failure_reasons == {"CANCELLED": 1}
    finally:
        probe.gate.set()
        await service.drain(1.0)


BAD_PARAMS: list[tuple[dict[str, Any], type[VallexError], str]] = [
    ({"text": "Hi.", "colour": "red"}, InvalidArgument, "UNKNOWN_FIELD"),
    ({}, InvalidArgument, "MISSING_FIELD"),
    ({"text": 5}, InvalidArgument, "BAD_TYPE"),
    ({"text": "   "}, InvalidArgument, "EMPTY_TEXT"),
    ({"text": "a\0b"}, InvalidArgument, "BAD_TEXT"),
    ({"text": "x" * 201}, TooLarge, "TEXT_TOO_LONG"),
    ({"text": "Hi.", "voice": "../../etc/passwd"}, InvalidArgument, "BAD_NAME"),
    ({"text": "Hi.", "voice": "a/b"}, InvalidArgument, "BAD_NAME"),
    ({"text": "Hi.", "voice": ""}, InvalidArgument, "BAD_NAME"),
    ({"text": "Hi.", "language": "xx"}, InvalidArgument, "UNKNOWN_LANGUAGE"),
    ({"text": "Hi.", "accent": "pirate"}, InvalidArgument, "BAD_VALUE"),
    ({"text": "Hi.", "top_k": True}, InvalidArgument, "BAD_TYPE"),  # bool is not int
    ({"text": "Hi.", "top_k": -1}, InvalidArgument, "OUT_OF_RANGE"),
    ({"text": "Hi.", "seed": -1}, InvalidArgument, "OUT_OF_RANGE"),
    ({"text": "Hi.", "seed": 2**63}, InvalidArgument, "OUT_OF_RANGE"),
    ({"text": "Hi.", "seed": 1.5}, InvalidArgument, "BAD_TYPE"),
    ({"text": "Hi.", "temperature": 0}, InvalidArgument, "OUT_OF_RANGE"),
    ({"text": "Hi.", "temperature": float("nan")}, InvalidArgument, "OUT_OF_RANGE"),
    ({"text": "Hi.", "temperature": 0.001}, InvalidArgument, "OUT_OF_RANGE"),  # float32 logits/T overflow
    ({"text": "Hi.", "temperature": 10**400}, InvalidArgument, "OUT_OF_RANGE"),  # float() OverflowError
    ({"text": "Hi.", "long": "yes"}, InvalidArgument, "BAD_TYPE"),
    ({"text": "Hi.", "return": "file"}, InvalidArgument, "BAD_VALUE"),
    ({"text": "Hi.", "fresh": 1}, InvalidArgument, "BAD_TYPE"),
    ({"text": "[EN]Hi.", "language": "mix"}, InvalidArgument, "BAD_MIX_TAGS"),  # from the front end
]


async def test_bad_input_changes_nothing(tmp_path: Path, engine: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None), engine)
    probe = EngineProbe(engine, monkeypatch)
    try:
        before = tree(tmp_path)
        for params, error, reason in BAD_PARAMS:
            with pytest.raises(error) as info:
                await synth(service, params)
            assert info.value.reason == reason, params
        with pytest.raises(InvalidArgument):
            await service.cache_prune({})
        with pytest.raises(InvalidArgument):
            await service.presets_install({"name": "../x", "data": b"PK"})
        with pytest.raises(InvalidArgument):
            await service.status({"verbose": True})
        assert tree(tmp_path) == before and probe.calls == 0
        assert service.counters["errors"] == len(BAD_PARAMS)
    finally:
        await service.drain(1.0)


async def test_cache_methods_and_drain(tmp_path: Path, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None), engine)
    probe = EngineProbe(engine, monkeypatch)
    result = await synth(service, {"text": "Hi.", "language": "en", "return": "path"})
    assert "audio" not in result and len(read_pcm16(Path(result["path"]).read_bytes())) > 0
    stats = await service.cache_stats()
    assert stats["files"] == 1 and stats["dir"] == str(tmp_path / "cache")
    dry = await service.cache_prune({"max_bytes": 0, "dry_run": True})
    assert dry["removed"] == 1 and Path(result["path"]).exists()
    pruned = await service.cache_prune({"max_bytes": 0})
    assert pruned["removed"] == 1 and not Path(result["path"]).exists()

    # Drain: the running request finishes, new ones are refused.
    probe.gate.clear()
    running = asyncio.ensure_future(synth(service, {"text": "Yo.", "language": "en"}))
    await _wait_for(lambda: service.worker.in_flight == 1)
    drained = asyncio.ensure_future(service.drain(30.0))
    await asyncio.sleep(0)
    with pytest.raises(Unavailable) as info:
        await synth(service, {"text": "Ok.", "language": "en"})
    assert info.value.reason == "SHUTTING_DOWN"
    probe.gate.set()
    assert (await running)["cached"] is False and probe.outcomes == ["ok", "ok"]
    await drained
    assert not service.worker.model_loaded


async def test_drain_waits_for_request_still_in_text_stage(tmp_path: Path, engine: Any) -> None:
    service = await started(make_config(tmp_path, None), engine)
    hold = threading.Event()
    # Occupy the (single) text thread so the request is accepted but not yet at the model.
    blocker = asyncio.get_running_loop().run_in_executor(service.text.executor, hold.wait, 30)
    request = asyncio.ensure_future(synth(service, {"text": "Hi.", "language": "en"}))
    await asyncio.sleep(0.05)
    assert service.worker.in_flight == 0 and service.worker.queue_depth == 0
    drained = asyncio.ensure_future(service.drain(30.0))
    await asyncio.sleep(0.05)
    assert not drained.done()
    hold.set()
    await blocker
    assert (await asyncio.wait_for(request, 30))["cached"] is False
    await asyncio.wait_for(drained, 30)


async def test_cache_write_failure_still_returns_audio(tmp_path: Path, engine: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None), engine)
    try:
        def disk_full(key: str, data: bytes) -> Path:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(service.cache, "put", disk_full)
        result = await synth(service, {"text": "Hi.", "language": "en"})
        assert result["path"] is None and result["url"] is None and wav_info(result["audio"])[1] > 0
        with pytest.raises(Unavailable) as info:
            await synth(service, {"text": "Hi.", "language": "en", "return": "path"})
        assert info.value.reason == "CACHE_WRITE_FAILED"
    finally:
        await service.drain(1.0)


async def test_model_load_failure(tmp_path: Path, tiny_models: Any) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    service = Service(make_config(tmp_path, tiny_models, checkpoint=broken), warm_up=False)
    with pytest.raises(Unavailable) as info:
        await service.start()
    assert info.value.reason == "MODEL_LOAD_FAILED"
    with pytest.raises(Unavailable):
        await synth(service, {"text": "Hi."})
    await service.drain(0)



async def test_long_budget_is_part_of_the_cache_key(tmp_path: Path, engine: Any) -> None:
    text = "Go home now. Be very calm."
    keys = []
    for budget in (16, 200):
        service = await started(make_config(tmp_path, None, long_budget=budget), engine)
        try:
            result = await synth(service, {"text": text, "language": "en", "seed": 1})
            assert result["cached"] is False  # a stale entry from the other budget must not be served
            keys.append((result["cache_key"], result["pieces"]))
        finally:
            await service.drain(1.0)
    assert keys[0][0] != keys[1][0] and keys[0][1] == 2 and keys[1][1] == 1


async def test_damaged_cache_entry_is_regenerated(tmp_path: Path, engine: Any) -> None:
    service = await started(make_config(tmp_path, None), engine)
    try:
        params = {"text": "Hi.", "language": "en", "seed": 3}
        first = await synth(service, params)
        path = Path(first["path"])
        path.write_bytes(b"RIFF" + b"\xff" * 60)  # a RIFF header, then junk: not a readable WAV
        again = await synth(service, params)
        assert again["cached"] is False and again["audio"] == first["audio"]
        assert path.read_bytes() == first["audio"]  # the damaged entry was replaced
    finally:
        await service.drain(1.0)


async def test_text_stage_counts_against_queue_limit(tmp_path: Path, engine: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None, queue_limit=1), engine)
    probe = EngineProbe(engine, monkeypatch)
    hold = threading.Event()
    blocker = asyncio.get_running_loop().run_in_executor(service.text.executor, hold.wait, 30)
    try:
        gone = asyncio.Event()
        first = asyncio.ensure_future(synth(service, {"text": "Hi.", "language": "en"},
                                                         cancelled=gone))
        second = asyncio.ensure_future(synth(service, {"text": "Yo.", "language": "en"}))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy) as info:  # 1 waiting + 1 running allowed, counted before the text stage
            await synth(service, {"text": "Ok.", "language": "en"})
        assert info.value.reason == "QUEUE_FULL"
        gone.set()  # client a leaves while its request waits for the text thread
        hold.set()
        await blocker
        with pytest.raises(Timeout) as cancelled:
            await asyncio.wait_for(first, 30)
        assert cancelled.value.reason == "CANCELLED"
        assert (await asyncio.wait_for(second, 30))["cached"] is False
        assert probe.calls == 1  # the cancelled one never reached the model
    finally:
        hold.set()
        await service.drain(1.0)


def test_unknown_field_echo_is_truncated() -> None:
    from vallexd.service.requests import validate_synthesize

    with pytest.raises(InvalidArgument) as info:
        validate_synthesize({"text": "Hi.", "k" * 10_000: 1}, max_text_chars=200)
    assert info.value.reason == "UNKNOWN_FIELD"
    assert info.value.details["field"] == "k" * 64 and len(info.value.message) < 400


async def test_health_is_cheap_and_reports_draining(tmp_path: Path, engine: Any) -> None:
    service = await started(make_config(tmp_path, None), engine)
    health = service.health()
    assert health["model_loaded"] is True and health["draining"] is False
    assert "cache" not in health  # no cache scan
    await service.drain(1.0)
    assert service.health() == {**health, "model_loaded": False, "model_identity": None, "draining": True}


async def test_no_progress_after_the_request_ended(tmp_path: Path, engine: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None, long_budget=16), engine)
    real = engine.new_request
    reached, release = threading.Event(), threading.Event()

    def held_progress(*args: Any, on_piece: Any = None, **kwargs: Any) -> Any:
        def late(i: int, total: int, audio: Any) -> None:  # the model thread stalls right before reporting
            reached.set()
            release.wait(30)
            on_piece(i, total, audio)

        return real(*args, on_piece=late, **kwargs)

    monkeypatch.setattr(engine, "new_request", held_progress)
    try:
        events: list[tuple[int, int]] = []
        gone = asyncio.Event()
        task = asyncio.ensure_future(synth(service,
            {"text": "Go home now. Be very calm.", "language": "en", "progress": True},
            progress=lambda done, total: events.append((done, total)), cancelled=gone))
        await asyncio.to_thread(reached.wait, 30)
        gone.set()
        with pytest.raises(Timeout):
            await asyncio.wait_for(task, 10)
        release.set()  # the report now reaches the loop after the request has ended
        await _wait_for(lambda: service.worker.in_flight == 0)
        await asyncio.sleep(0.05)
        assert events == []
    finally:
        release.set()
        await service.drain(1.0)


async def test_long_mode_field_cache_key_and_old_api_mapping(tmp_path: Path, engine: Any) -> None:
    from vallexd.server.http_api import map_old_request

    service = await started(make_config(tmp_path, None, long_budget=16), engine)
    try:
        import numpy as np

        prompt = Prompt(audio_tokens=np.arange(5 * 8).reshape(1, 5, 8), text_tokens=np.array([[20, 21]]),
                        language="en")
        await service.presets_install({"name": "v", "data": prompt_to_bytes(prompt)})
        text = "Go home now. Be very calm. Sit down."
        base = {"text": text, "language": "en", "voice": "v", "seed": 4, "top_k": 1}
        fixed = await synth(service, base)  # with a voice the default is fixed
        assert (await synth(service, {**base, "long_mode": "fixed"}))["cached"] is True
        sliding = await synth(service, {**base, "long_mode": "sliding"})
        assert sliding["cached"] is False and sliding["cache_key"] != fixed["cache_key"]
        pieces = split_text(text, "en", budget=16, short_first=True)
        assert fixed["pieces"] == len(pieces) == 3
        assert wav_info(fixed["audio"])[1] == sum(frames_for(p, enrolled=2) for p in pieces) * HOP
        # Without a voice the request slides whatever it asks: both spellings are one cache entry.
        a = await synth(service, {"text": text, "language": "en", "seed": 4, "long_mode": "fixed"})
        b = await synth(service, {"text": text, "language": "en", "seed": 4, "long_mode": "sliding"})
        assert b["cached"] is True and a["cache_key"] == b["cache_key"]
        with pytest.raises(InvalidArgument) as info:
            await synth(service, {**base, "long_mode": "window"})
        assert info.value.details["field"] == "long_mode"
    finally:
        await service.drain(1.0)
    assert map_old_request({"textPrompt": "Hi.", "longprompt": True})["long_mode"] == "sliding"
    assert "long_mode" not in map_old_request({"textPrompt": "Hi.", "longprompt": False})
