"""Recordings for the voice tests, generated (never shipped): tones in several formats and rates."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf


def tone_samples(seconds: float, rate: int = 24000, channels: int = 1, amplitude: float = 0.4,
                 seed: int = 0) -> np.ndarray:
    """A 220 Hz tone with a little noise: (frames, channels) float32."""
    t = np.arange(int(seconds * rate)) / rate
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    mono = amplitude * np.sin(2 * np.pi * 220 * t) + noise
    return np.stack([mono * (1.0 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, rate: int = 24000, channels: int = 1, **kwargs: object) -> bytes:
    """A WAV (16-bit PCM) of `tone_samples`."""
    return wav_bytes(tone_samples(seconds, rate, channels, **kwargs), rate)  # type: ignore[arg-type]


def silence(seconds: float, rate: int = 24000) -> bytes:
    return wav_bytes(np.zeros((int(seconds * rate), 1), dtype=np.float32), rate)


def clipped(seconds: float, rate: int = 24000) -> bytes:
    """A tone driven far past full scale: a third of the samples sit at the rails."""
    return wav_bytes(np.clip(tone_samples(seconds, rate, amplitude=2.0), -1.0, 1.0), rate)


def mp3(seconds: float, rate: int = 44100) -> bytes:
    """The tone as MP3, encoded with PyAV (FFmpeg's encoder inside the wheel)."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="mp3") as container:
        stream = container.add_stream("mp3", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(tone_samples(seconds, rate)[:, 0][None, :], format="flt",
                                           layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()
