"""Float audio -> 16-bit PCM mono WAV bytes, and small duration helpers (torch-free).

The stdlib `wave` module is enough: the daemon only ever writes one format
(what the old server produced and what browsers and players all accept).
"""

from __future__ import annotations

import io
import wave

import numpy as np

SAMPLE_WIDTH = 2  # bytes: 16-bit PCM
WAV_HEADER_BYTES = 44  # the canonical RIFF header `wave` writes for PCM


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] and scale to int16; NaN/inf (a diverged vocoder) become silence/clipped."""
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """A complete mono 16-bit WAV file holding `audio` (float, nominally in [-1, 1])."""
    if sample_rate <= 0:
        raise ValueError(f"sample rate must be positive, got {sample_rate}")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(SAMPLE_WIDTH)
        wav.setframerate(sample_rate)
        wav.writeframes(to_pcm16(audio).tobytes())
    return buf.getvalue()


def wav_info(data: bytes) -> tuple[int, int]:
    """(sample_rate, frames) of a WAV file held in memory; ValueError if it is not one."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            return wav.getframerate(), wav.getnframes()
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a readable WAV file: {exc}") from None


def read_pcm16(data: bytes) -> np.ndarray:
    """The int16 samples of a mono 16-bit WAV (tests and tools)."""
    with wave.open(io.BytesIO(data), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != SAMPLE_WIDTH:
            raise ValueError("expected a mono 16-bit WAV")
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def duration_s(samples: int, sample_rate: int) -> float:
    return samples / sample_rate if sample_rate > 0 else 0.0


def wav_duration_s(data: bytes) -> float:
    rate, frames = wav_info(data)
    return duration_s(frames, rate)
