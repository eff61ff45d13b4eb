"""The encoder: every format decodes back (FFmpeg via PyAV), streamed output is a valid stream, speed."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from vallexd.audio.encode import (
    Encoder,
    atempo_factors,
    encode_audio,
    streaming_wav_header,
)
from vallexd.audio.formats import CONTENT_TYPES, FORMATS
from vallexd.errors import InvalidArgument
from vallexd.storage.wav import read_pcm16, wav_bytes

RATE = 24000
#: Codec priming plus last-frame padding, in samples at 24 kHz (lossless formats are exact).
SLACK = {"mp3": 1152 + 576, "aac": 2048, "opus": 960, "flac": 0, "wav": 0, "pcm": 0}


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode(data: bytes, fmt: str) -> tuple[int, np.ndarray]:
    """(rate, float samples) decoded by FFmpeg; pcm is raw s16le at 24 kHz."""
    if fmt == "pcm":
        return RATE, np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]  # mono: 1 plane
        rate = stream.codec_context.sample_rate
    samples = np.concatenate(frames)
    if samples.dtype.kind == "i":  # FFmpeg's integer scale: full scale is 2**(bits-1)
        return rate, samples.astype(np.float32) / (np.iinfo(samples.dtype).max + 1)
    return rate, samples.astype(np.float32)


def at_24k(rate: int, n: int) -> int:
    return n * RATE // rate


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_file_decodes_back(fmt: str) -> None:
    audio = tone(1.0)
    rate, decoded = decode(encode_audio(audio, fmt, RATE), fmt)
    assert rate == (48000 if fmt == "opus" else RATE)  # Opus decodes at 48 kHz by definition
    assert abs(at_24k(rate, decoded.size) - audio.size) <= SLACK[fmt]
    if fmt in ("flac", "wav", "pcm"):  # lossless: the 16-bit samples themselves
        assert np.max(np.abs(decoded[: audio.size] - audio)) < 2e-4
    else:  # lossy: still the same tone (energy within 30 %)
        assert 0.7 < np.sqrt(np.mean(decoded ** 2)) / np.sqrt(np.mean(audio ** 2)) < 1.3


def test_whole_wav_is_the_canonical_wav() -> None:
    audio = tone(0.3)
    assert encode_audio(audio, "wav", RATE) == wav_bytes(audio, RATE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_pieces_make_one_valid_stream(fmt: str) -> None:
    pieces = [tone(0.4, 200), tone(0.25, 300), tone(0.6, 400)]
    enc = Encoder(fmt, RATE)
    assert enc.content_type == CONTENT_TYPES[fmt]
    chunks = [enc.feed(p) for p in pieces] + [enc.finish()]
    # Bytes come out while audio goes in, not only at the end.
    assert sum(len(c) for c in chunks[:-1]) > 0
    assert chunks[0], f"{fmt}: nothing after the first piece"
    total = sum(p.size for p in pieces)
    rate, decoded = decode(b"".join(chunks), fmt)
    assert abs(at_24k(rate, decoded.size) - total) <= SLACK[fmt] + (576 if fmt == "mp3" else 0)
    with pytest.raises(RuntimeError):
        enc.feed(pieces[0])


def test_streaming_wav_header_says_unknown_length() -> None:
    enc = Encoder("wav", RATE)
    data = enc.feed(tone(0.1)) + enc.finish()
    assert data[:44] == streaming_wav_header(RATE)
    assert struct.unpack("<I", data[4:8])[0] == 0xFFFFFFFF
    assert struct.unpack("<I", data[40:44])[0] == 0xFFFFFFFF
    assert np.array_equal(np.frombuffer(data[44:], "<i2"), read_pcm16(wav_bytes(tone(0.1), RATE)))


def test_empty_stream_is_still_valid_wav() -> None:
    enc = Encoder("wav", RATE)
    assert enc.feed(np.zeros(0, np.float32)) == b""
    assert enc.finish() == streaming_wav_header(RATE)


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.5, 2.0, 3.0, 4.0])
def test_speed_changes_duration_not_pitch(speed: float) -> None:
    audio = tone(1.0, 300.0)
    _, decoded = decode(encode_audio(audio, "flac", RATE, speed=speed), "flac")
    assert abs(decoded.size - audio.size / speed) <= 0.03 * audio.size / speed + 512
    # Pitch unchanged: the spectrum's peak is still at 300 Hz.
    spectrum = np.abs(np.fft.rfft(decoded[: RATE // 4 * 1] if decoded.size >= RATE // 4 else decoded))
    peak_hz = np.argmax(spectrum) * RATE / (2 * (spectrum.size - 1))
    assert abs(peak_hz - 300.0) < 15


@pytest.mark.parametrize("speed", [0.25, 0.3, 0.5, 1.0, 2.0, 3.7, 4.0])
def test_atempo_stages_stay_in_range(speed: float) -> None:
    factors = atempo_factors(speed)
    assert all(0.5 <= f <= 2.0 for f in factors)
    assert np.isclose(np.prod(factors), speed)


@pytest.mark.parametrize("fmt", ["pcm", "opus"])
def test_speed_does_not_hold_back_a_piece(fmt: str) -> None:
    """atempo answers a frame when the next arrives: the encoder feeds it small frames, so the
    first piece's audio comes out with that piece, not with the next."""
    enc = Encoder(fmt, RATE, speed=2.0)
    first = enc.feed(tone(1.0))
    if fmt == "pcm":
        assert len(first) // 2 >= RATE // 2 - 2048  # ~0.5 s of output for 1 s in, less one frame
    else:
        assert len(first) > 1000


def test_streamed_speed_matches_whole() -> None:
    audio = tone(1.2)
    enc = Encoder("pcm", RATE, speed=2.0)
    streamed = enc.feed(audio[:10000]) + enc.feed(audio[10000:]) + enc.finish()
    assert abs(len(streamed) // 2 - len(encode_audio(audio, "pcm", RATE, speed=2.0)) // 2) <= 256


@pytest.mark.parametrize("bad", [{"fmt": "ogg"}, {"fmt": None}, {"speed": 0.2}, {"speed": 4.5},
                                 {"speed": True}, {"speed": "2"}])
def test_bad_format_or_speed(bad: dict) -> None:
    with pytest.raises(InvalidArgument) as err:
        Encoder(bad.get("fmt", "mp3"), RATE, speed=bad.get("speed", 1.0))
    assert err.value.details["field"] in ("format", "speed")


def test_nan_and_clipping_do_not_break_a_stream() -> None:
    audio = tone(0.2) * 5
    audio[::7] = np.nan
    _, decoded = decode(encode_audio(audio, "flac", RATE), "flac")
    assert np.all(np.isfinite(decoded)) and np.max(np.abs(decoded)) <= 1.0
