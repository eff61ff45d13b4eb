"""Cost of encoding the daemon's audio per response (the cache keeps WAV; other formats are made
per request): milliseconds to encode N seconds of 24 kHz speech-like audio whole, and streamed in
pieces of one sentence (3 s), with the output size and bitrate, per format and at speed 1 and 2.

    .venv/bin/python bench/bench_encode.py [--seconds 30 --runs 3]

The question it answers: is encoding per response cheap next to synthesis (several seconds per
sentence on a CPU), or should encoded results be cached beside the WAV?
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from vallexd.audio.encode import Encoder, encode_audio
from vallexd.audio.formats import FORMATS
from vallexd.constants import SAMPLE_RATE


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonics with a wandering pitch and syllable-rate envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.15 * voice * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def timed(fn, runs: int) -> tuple[float, bytes]:
    times, out = [], b""
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--piece", type=float, default=3.0, help="seconds per streamed piece")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    audio = speechlike(args.seconds)
    step = int(args.piece * SAMPLE_RATE)
    pieces = [audio[i:i + step] for i in range(0, audio.size, step)]
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    feats = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f" {f}" in flags]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores; {', '.join(feats) or '-'}), "
          f"{args.seconds:g} s of audio at {SAMPLE_RATE} Hz, {len(pieces)} pieces, median of {args.runs}")
    print(f"{'format':7} {'speed':>5} {'whole ms':>9} {'stream ms':>10} {'x realtime':>10} "
          f"{'bytes':>9} {'kbit/s':>7} {'1st chunk':>9}")
    for speed in (1.0, 2.0):
        for fmt in FORMATS:
            whole_s, data = timed(lambda fmt=fmt, speed=speed: encode_audio(audio, fmt, speed=speed),
                                  args.runs)

            def streamed(fmt: str = fmt, speed: float = speed) -> bytes:
                enc = Encoder(fmt, speed=speed)
                first = enc.feed(pieces[0])
                streamed.first = len(first)  # type: ignore[attr-defined]
                return first + b"".join(enc.feed(p) for p in pieces[1:]) + enc.finish()

            stream_s, _ = timed(streamed, args.runs)
            kbps = len(data) * 8 / (args.seconds / speed) / 1000
            print(f"{fmt:7} {speed:5.1f} {whole_s * 1000:9.1f} {stream_s * 1000:10.1f} "
                  f"{args.seconds / max(stream_s, 1e-9):10.0f} {len(data):9d} {kbps:7.0f} "
                  f"{streamed.first:9d}")  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
