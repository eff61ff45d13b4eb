"""The prompt-making steps shared by the daemon and the client, on tiny random EnCodec and Whisper
weights in their real file formats (in-process; the daemon's path is tests/integration/test_voices.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from voice_samples import tone

from vallexd.constants import FRAMES_PER_SECOND, LANG_CODES
from vallexd.errors import ErrorCode, InvalidArgument, Unavailable, VallexError
from vallexd.voices import maker
from vallexd.voices.audio import decode_audio

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("whisper", reason="openai-whisper (the asr extra) is not installed")
    from vallexd.tools.tiny_weights import make_tiny_whisper

    root = tmp_path_factory.mktemp("whisper")
    make_tiny_whisper(root / "en.pt")
    make_tiny_whisper(root / "de.pt", language="de", text=" Hallo")
    return root


def test_whisper_transcript_and_language_become_the_prompt(tiny_models: object, whisper_dir: Path) -> None:
    models = maker.VoiceModels(tiny_models.encodec, whisper_dir / "en.pt")  # type: ignore[attr-defined]
    recording = decode_audio(tone(0.4, rate=16000))
    prompt, text = maker.make_prompt(models, recording, None, "auto", "x")
    assert text.transcribed and text.language == "en"
    assert text.transcript == "Hello."  # what the tiny model says, with the final-punctuation rule
    from vallexd.text import phonemize

    assert prompt.text_tokens.tolist() == [list(phonemize("Hello.", "en").ids)]
    assert prompt.language == "en" and int(LANG_CODES["en"]) == 2
    assert prompt.audio_tokens.shape == (1, int(0.4 * FRAMES_PER_SECOND), 8)
    assert models.loaded == {"encodec": True, "whisper": True}


def test_a_given_transcript_never_loads_whisper(tiny_models: object) -> None:
    models = maker.VoiceModels(tiny_models.encodec, Path("/nonexistent/whisper.pt"))  # type: ignore[attr-defined]
    prompt, text = maker.make_prompt(models, decode_audio(tone(0.3)), "你好。", "auto", "x")
    assert text.language == "zh" and not text.transcribed and prompt.language == "zh"
    assert models.loaded == {"encodec": True, "whisper": False}


def test_another_detected_language_is_refused(tiny_models: object, whisper_dir: Path) -> None:
    models = maker.VoiceModels(tiny_models.encodec, whisper_dir / "de.pt")  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument) as info:
        maker.make_prompt(models, decode_audio(tone(0.3)), None, "auto", "x")
    assert info.value.reason == "UNSUPPORTED_LANGUAGE" and info.value.details["detected"] == "de"
    assert "pass the transcript" in info.value.message


def test_a_language_given_without_transcript_skips_detection(tiny_models: object, whisper_dir: Path) -> None:
    models = maker.VoiceModels(tiny_models.encodec, whisper_dir / "de.pt")  # type: ignore[attr-defined]
    heard, language = maker.transcribe(models, decode_audio(tone(0.3)), "en")
    assert language == "en" and heard.endswith(".")


def test_missing_weights_are_typed_and_say_how_to_fetch(tmp_path: Path, tiny_models: object) -> None:
    none = maker.VoiceModels(tmp_path / "encodec.th", tmp_path / "medium.pt")
    with pytest.raises(Unavailable) as info:
        maker.make_prompt(none, decode_audio(tone(0.3)), "Hello.", "en", "x")
    assert info.value.reason == "ENCODEC_MISSING"
    assert "vallexctl models fetch --encodec" in info.value.message and str(tmp_path) in info.value.message
    no_whisper = maker.VoiceModels(tiny_models.encodec, tmp_path / "medium.pt")  # type: ignore[attr-defined]
    with pytest.raises(Unavailable) as info:
        maker.make_prompt(no_whisper, decode_audio(tone(0.3)), None, "auto", "x")
    assert info.value.reason == "WHISPER_MISSING" and "vallexctl models fetch --whisper" in info.value.message
    unconfigured = maker.VoiceModels(None, None)
    with pytest.raises(Unavailable, match="not configured"):
        unconfigured.check_encodec()


def test_a_damaged_whisper_file_is_a_weights_error(tmp_path: Path, tiny_models: object) -> None:
    pytest.importorskip("whisper", reason="openai-whisper (the asr extra) is not installed")
    bad = tmp_path / "medium.pt"
    bad.write_bytes(b"not a checkpoint")
    models = maker.VoiceModels(tiny_models.encodec, bad)  # type: ignore[attr-defined]
    with pytest.raises(VallexError) as info:
        maker.transcribe(models, decode_audio(tone(0.3)), None)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.reason == "BAD_WHISPER"
    assert str(bad) in info.value.message
