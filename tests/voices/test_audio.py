"""Decoding uploads and the checks a voice recording must pass (vallexd/voices/audio.py)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from voice_samples import clipped, mp3, silence, tone, tone_samples, wav_bytes

from vallexd.errors import InvalidArgument, TooLarge
from vallexd.voices.audio import KEPT_AUDIO_SUFFIXES, decode_audio, finish_transcript


def test_wav_decodes_to_mono_float_at_its_own_rate() -> None:
    rec = decode_audio(tone(0.5, rate=24000))
    assert rec.sample_rate == 24000 and rec.channels == 1 and rec.format == "wav"
    assert rec.samples.dtype == np.float32 and rec.samples.shape == (12000,)
    expected = tone_samples(0.5, 24000)[:, 0]
    assert np.abs(rec.samples - expected).max() < 1e-3  # 16-bit quantisation only
    assert rec.suffix == ".wav"


def test_stereo_48k_is_mixed_down_to_the_mean_of_its_channels() -> None:
    samples = tone_samples(0.25, 48000, channels=2)
    rec = decode_audio(wav_bytes(samples, 48000, subtype="FLOAT"))
    assert rec.channels == 2 and rec.sample_rate == 48000
    np.testing.assert_allclose(rec.samples, samples.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("fmt, subtype, name", [("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg")])
def test_other_containers(fmt: str, subtype: str, name: str) -> None:
    rec = decode_audio(wav_bytes(tone_samples(0.5, 22050), 22050, subtype=subtype, fmt=fmt))
    assert rec.format == name and rec.sample_rate == 22050
    assert abs(rec.seconds - 0.5) < 0.02  # Vorbis keeps its encoder delay


def test_mp3_decodes() -> None:
    rec = decode_audio(mp3(0.5))
    assert rec.format == "mp3" and rec.sample_rate == 44100 and rec.suffix == ".mp3"
    assert 0.45 < rec.seconds < 0.6  # the encoder pads a little


def test_over_15_seconds_is_refused_while_decoding() -> None:
    with pytest.raises(TooLarge) as info:
        decode_audio(tone(16.0, rate=8000))
    assert info.value.reason == "PROMPT_TOO_LONG" and "15 s" in info.value.message


def test_a_long_recording_is_refused_with_its_own_length_not_where_decoding_stopped() -> None:
    with pytest.raises(TooLarge) as info:
        decode_audio(mp3(30.0))  # decoding stops past 15 s; the file states 30 s
    assert "30.0 s long" in info.value.message and info.value.details["seconds"] == pytest.approx(30, abs=0.2)


def test_silence_is_refused() -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_audio(silence(1.0))
    assert info.value.reason == "SILENT_AUDIO" and "near-silent" in info.value.message


def test_a_very_quiet_recording_is_refused_but_a_quiet_one_passes() -> None:
    with pytest.raises(InvalidArgument, match="near-silent"):
        decode_audio(wav_bytes(tone_samples(0.5, amplitude=0.002) * 0.05, 24000, subtype="FLOAT"))
    decode_audio(tone(0.5, amplitude=0.02))  # about -37 dBFS: quiet, but someone is there


def test_clipping_is_refused_but_a_few_peaks_pass() -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_audio(clipped(1.0))
    assert info.value.reason == "CLIPPED_AUDIO" and "clipped" in info.value.message
    samples = tone_samples(1.0)
    samples[::5000] = 1.0  # 5 isolated full-scale samples in 24000
    decode_audio(wav_bytes(samples, 24000, subtype="FLOAT"))


def test_float_audio_over_full_scale_is_normalised_not_called_clipped() -> None:
    samples = tone_samples(0.5, amplitude=3.0)[:, 0]
    rec = decode_audio(wav_bytes(samples, 24000, subtype="FLOAT"))
    assert np.abs(rec.samples).max() == pytest.approx(1.0)  # as the reference does before EnCodec
    np.testing.assert_allclose(rec.samples, samples / np.abs(samples).max(), atol=1e-6)


@pytest.mark.parametrize("data", [b"", b"RIFF nonsense", zlib.compress(b"x" * 1000),
                                  b"\x89PNG\r\n\x1a\n" + b"\0" * 200])
def test_not_audio_is_bad_audio(data: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_audio(data)
    assert info.value.reason in ("BAD_AUDIO", "EMPTY_AUDIO")


def test_a_wav_with_no_samples_is_empty() -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_audio(wav_bytes(np.zeros((0, 1), dtype=np.float32), 24000))
    assert info.value.reason in ("EMPTY_AUDIO", "BAD_AUDIO")


def test_truncated_wav_decodes_what_is_there_or_refuses() -> None:
    data = tone(1.0)
    try:
        rec = decode_audio(data[: len(data) // 2])
    except InvalidArgument as exc:
        assert exc.reason == "BAD_AUDIO"
    else:
        assert 0.4 < rec.seconds <= 0.5


def test_finish_transcript_is_the_references_final_punctuation_rule() -> None:
    assert finish_transcript(" Hello") == "Hello."
    assert finish_transcript("Hello?  ") == "Hello?"
    assert finish_transcript("你好。") == "你好。"
    assert finish_transcript("こんにちは、") == "こんにちは、"
    assert finish_transcript("well,") == "well,"
    with pytest.raises(InvalidArgument) as info:
        finish_transcript("   ")
    assert info.value.reason == "NO_SPEECH"


def test_kept_audio_suffixes_are_plain_names() -> None:
    assert all(s.startswith(".") and s[1:].isalnum() and s != ".npz" for s in KEPT_AUDIO_SUFFIXES)
