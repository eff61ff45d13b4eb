"""Service faults of issue 12: no audio is never a success nor cached (1); the cache key is the
model input (3). Real engine on tiny random weights; the NO_AUDIO checkpoint is made from it the
way the issue describes (a model that draws end-of-speech at once)."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import pytest
from test_service import EngineProbe, engine, make_config, started, synth  # noqa: F401 (fixture)

from vallexd.errors import Internal
from vallexd.service.service import NO_AUDIO_ATTEMPTS
from vallexd.service.text_stage import model_input_digest
from vallexd.text import phonemize, token_languages


@pytest.fixture(scope="module")
def eos_engine(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny checkpoint made to draw EOS (code 1024) first: AR norm weight 0, bias 1, and
    the AR output layer zero except row 1024 set to 1 (issue 12, fault 1)."""
    import torch

    from vallexd.inference.engine import Engine

    ckpt = torch.load(tiny_models.checkpoint, map_location="cpu", weights_only=True)
    state = ckpt["model"]
    state["ar_decoder.norm.weight"].zero_()
    state["ar_decoder.norm.bias"].fill_(1.0)
    state["ar_predict_layer.weight"].zero_()
    state["ar_predict_layer.weight"][1024] = 1.0
    path = tmp_path_factory.mktemp("eos") / "eos.pt"
    torch.save(ckpt, path)
    return Engine.load(path, tiny_models.vocos_dir, device="cpu", dtype="float32")


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").rglob("*.wav"))


async def test_no_audio_is_retried_then_a_typed_error_and_never_cached(
        tmp_path: Path, eos_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None), eos_engine)
    try:
        probe = EngineProbe(eos_engine, monkeypatch)
        for params in ({"text": "Hi.", "language": "en"},
                       {"text": "Hi.", "language": "en", "return": "path"}):
            with pytest.raises(Internal) as info:
                await synth(service, params)
            assert info.value.reason == "NO_AUDIO" and info.value.http_status == 500
            assert info.value.details == {"attempts": NO_AUDIO_ATTEMPTS, "piece": 0}
            assert "no audio" in info.value.message
        assert probe.calls == 2 * NO_AUDIO_ATTEMPTS  # unseeded: drawn again, bounded
        # seeded: the same seed draws the same codes, so one attempt only
        with pytest.raises(Internal) as info:
            await synth(service, {"text": "Hi.", "language": "en", "seed": 5})
        assert info.value.details["attempts"] == 1 and probe.calls == 2 * NO_AUDIO_ATTEMPTS + 1
        assert cache_files(tmp_path) == []  # nothing cached: the repeat is not a "hit"
        with pytest.raises(Internal):
            await synth(service, {"text": "Hi.", "language": "en", "seed": 5})
        assert service.counters["cache_hits"] == 0
    finally:
        await service.drain(1.0)


async def test_an_empty_piece_of_a_long_text_fails_the_request(tmp_path: Path, engine: Any,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The real engine and scheduler, with the AR stage of the second piece made to end with no
    frames (what the EOS model does for every piece)."""
    from vallexd.inference.scheduler import Scheduler

    service = await started(make_config(tmp_path, None, long_budget=16), engine)
    real = Scheduler._to_nar
    calls: list[int] = []

    def second_piece_silent(self: Any, req: Any, row: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            row.frames.clear()
        return real(self, req, row)

    monkeypatch.setattr(Scheduler, "_to_nar", second_piece_silent)
    try:
        with pytest.raises(Internal) as info:
            await synth(service, {"text": "Go home now. Be very calm.", "language": "en", "seed": 3})
        assert info.value.reason == "NO_AUDIO" and info.value.details["piece"] == 1
        assert "piece 2" in info.value.message
        assert cache_files(tmp_path) == []
    finally:
        await service.drain(1.0)


async def test_cache_key_is_the_model_input(tmp_path: Path, engine: Any,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    service = await started(make_config(tmp_path, None), engine)
    prepared: list[str] = []
    real_prepare = service.text.pieces

    def counting_prepare(req: Any, *args: Any) -> Any:
        prepared.append(req.text)
        return real_prepare(req, *args)

    monkeypatch.setattr(service.text, "pieces", counting_prepare)
    try:
        nfc = "パンを食べます。"
        nfd = unicodedata.normalize("NFD", nfc)
        first = await synth(service, {"text": nfd, "language": "ja", "seed": 1})
        assert first["cached"] is False and prepared == [nfc]  # the front end read the NFC text
        ph = phonemize(nfc, "ja")
        expected = service._cache_key(
            service.text.normalised(_req(nfc, "ja", 1)), None,
            model_input_digest([(ph.ids, token_languages(ph, "native"))]))
        assert first["cache_key"] == expected
        # The NFC spelling is the same normalised text: served from the cache without running
        # the front end again (its model input is remembered), and rightly so: it reads alike.
        again = await synth(service, {"text": nfc, "language": "ja", "seed": 1})
        assert again["cached"] is True and again["cache_key"] == first["cache_key"]
        assert prepared == [nfc]
        service.text.memo.clear()  # as after a restart: the front end runs, the entry is found
        again = await synth(service, {"text": nfc, "language": "ja", "seed": 1})
        assert again["cached"] is True and again["cache_key"] == first["cache_key"] and len(prepared) == 2
        # Other spellings of the same model input share the entry ("Hello  world" reads alike)...
        a = await synth(service, {"text": "Hello world.", "language": "en", "seed": 2})
        b = await synth(service, {"text": "hello   world.", "language": "en", "seed": 2})
        assert b["cached"] is True and b["cache_key"] == a["cache_key"]
        # ...and different model inputs never do: a line break is a word boundary.
        c = await synth(service, {"text": "red\r\nViolets", "language": "en", "seed": 2})
        d = await synth(service, {"text": "redViolets", "language": "en", "seed": 2})
        assert c["cache_key"] != d["cache_key"] and d["cached"] is False
    finally:
        await service.drain(1.0)


def _req(text: str, language: str, seed: int) -> Any:
    from vallexd.service.requests import validate_synthesize

    return validate_synthesize({"text": text, "language": language, "seed": seed}, max_text_chars=200)
