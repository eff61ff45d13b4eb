"""Voices from recordings: what one costs on this CPU, and whether it holds up synthesis.

    PYTHONPATH=. .venv/bin/python bench/bench_voices.py [--whisper-size base --seconds 10 --runs 3]

Part 1 (in-process, 1 torch thread): decode + checks, Whisper of the chosen size (real dimensions,
random weights wired to say a 20-token sentence, so the decoder runs a realistic number of steps)
and EnCodec 24 kHz (the real architecture, random weights) on a `--seconds` tone.

Part 2 (a real daemon on the tiny VALL-E X, --threads 1): latency of a short synthesis and of
`ping`, first alone, then while another client makes voices without a transcript (Whisper +
EnCodec in the daemon's voice thread) back to back.  Had Whisper run in the model worker, a
synthesis arriving during a transcription would wait for all of it (the Whisper row of part 1).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from daemon_harness import running_daemon
from voice_samples import tone

from vallexd.tools.tiny_weights import make_tiny, make_tiny_whisper
from vallexd.voices import maker
from vallexd.voices.audio import decode_audio

SENTENCE = " The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = text.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]
    return f"{model}; {' '.join(wanted)}"


def timed(fn, runs: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def part1(root: Path, whisper: Path, seconds: float, runs: int) -> float:
    data = tone(seconds, rate=48000, channels=2)
    models = maker.VoiceModels(root / "encodec_24khz-d7cc33bc.th", whisper)
    t_decode, rec = timed(lambda: decode_audio(data), runs)
    start = time.perf_counter()
    models.transcriber()
    t_load = time.perf_counter() - start
    t_asr, heard = timed(lambda: maker.transcribe(models, rec, None), runs)  # type: ignore[arg-type]
    models.tokenizer()
    t_enc, _ = timed(lambda: maker.encode(models, rec), runs)  # type: ignore[arg-type]
    print(f"\n{seconds:g} s stereo 48 kHz WAV, 1 torch thread, median of {runs}")
    print(f"{'step':28} {'seconds':>8}")
    for label, value in (("decode + checks", t_decode), ("Whisper load (once)", t_load),
                         ("Whisper transcribe", t_asr), ("EnCodec encode", t_enc)):
        print(f"{label:28} {value:8.3f}")
    print(f"transcript: {heard[0][:60]!r}... ({heard[1]})")  # type: ignore[index]
    return t_asr


def part2(root: Path, whisper: Path, seconds: float, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, running_daemon(
            Path(tmp) / "d", make_tiny(root),
            ["--encodec", str(root / "encodec_24khz-d7cc33bc.th"), "--whisper", str(whisper),
             "--threads", "1", "--no-static"]) as daemon:
        params = {"text": "Hello there.", "language": "en", "seed": 1, "fresh": True}
        daemon.call("synthesize", params, timeout=300)  # warm-up (text front end, first run)

        def measure() -> tuple[float, float]:
            synth, ping = [], []
            for _ in range(runs):
                start = time.perf_counter()
                daemon.call("ping")
                ping.append(time.perf_counter() - start)
                start = time.perf_counter()
                daemon.call("synthesize", params, timeout=300)
                synth.append(time.perf_counter() - start)
            return statistics.median(synth), max(ping)

        alone = measure()
        stop = threading.Event()
        made = [0]

        def make_voices() -> None:
            data = tone(seconds, rate=48000, channels=2)
            while not stop.is_set():
                daemon.call("presets.create", {"name": "bench", "audio": data, "overwrite": True},
                            timeout=600)
                made[0] += 1

        worker = threading.Thread(target=make_voices, daemon=True)
        worker.start()
        time.sleep(0.5)
        busy = measure()
        stop.set()
        worker.join(600)
        print(f"\ndaemon (tiny VALL-E X, --threads 1); voices made during the busy run: {made[0]}")
        print(f"{'':28} {'synth p50 s':>11} {'ping max ms':>11}")
        print(f"{'alone':28} {alone[0]:11.3f} {alone[1] * 1000:11.1f}")
        print(f"{'while voices are made':28} {busy[0]:11.3f} {busy[1] * 1000:11.1f}")
        print(f"{'ratio':28} {busy[0] / alone[0]:11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--whisper-size", default="base", choices=("tiny-random", "tiny", "base", "small",
                                                                   "medium"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-daemon", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}; Whisper size {args.whisper_size} (random weights)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tiny(root)
        text = SENTENCE if args.whisper_size != "tiny-random" else " Hello"
        whisper = make_tiny_whisper(root / "whisper" / "medium.pt", size=args.whisper_size, text=text)
        part1(root, whisper, args.seconds, args.runs)
        if not args.skip_daemon:
            part2(root, whisper, args.seconds, args.runs)


if __name__ == "__main__":
    main()
