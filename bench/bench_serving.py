"""Serving benchmark: N concurrent requests through the real model worker, full-size random weights.

    .venv/bin/python bench/bench_serving.py [--quick] [--threads 0] [--n 1,2,4,8] [--device cpu]

For each configuration (float32 / bfloat16 where the device has it / compiled) and each N, N
distinct requests (one to three sentences of text, each with its own 3-10 s prompt) go to one
`ModelWorker` with `max_batch = N` at the same moment.  Printed per row: aggregate audio seconds
per wall second, per-request latency p50/p90, time to first audio (TTFA) of a 10-sentence text
(split as the daemon splits it: first sentence alone, then pieces of <= 120 tokens) run alone,
its ratio to the first sentence alone, and peak RSS; every figure also as a ratio (`_x`) to
serial float32 batch 1 of the same run.  One `RESULT ...` line per row at the end.

Random weights never draw EOS, so a row would run to 16 x S frames; the benchmark gives each
row the length real speech has instead (75 frames/s at 14.3 tokens/s = 5.2 frames per new text
token, the median of the shared presets) through `vallexd.inference.batch.frame_limit`.

`--quick`: N = 1 and 4, float32 and the fastest dtype the machine supports, shorter texts; no
compile.  Each configuration runs in its own process (own peak RSS).  On a CPU with int8
dot products (VNNI) two more configurations run: int8 weight matmuls in the NAR decoder
(`--quantize nar`) and in both decoders (`--quantize all`), the rest in the fastest dtype;
`--no-int8` leaves them out.

With 2+ torch threads the batched rows (N > 1) run the NAR stages on a second thread while the AR
batch steps (`--nar-thread auto`, the daemon's default; vallexd/inference/nar_stage.py); one more
configuration repeats the fastest dtype with `nar_thread off` to show what that thread is worth.
Serial float32 batch 1 (the baseline) uses all the threads for each stage, as the daemon does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FRAMES_PER_TOKEN = 75 / 14.3  # real speech: frames per phoneme token
TOKENS_PER_SECOND = 14.3


def cpu_features() -> str:
    """CPU model, core count and the flags that decide bf16/int8 speed (devices.py reads cpuinfo)."""
    from vallexd.inference.devices import cpu_flags, cpuinfo_field

    model = cpuinfo_field("model name") or platform.processor() or "unknown CPU"
    flags = cpu_flags()
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    return f"{model}, {os.cpu_count()} CPUs, " + " ".join(f for f in wanted if f in flags)


# ------------------------------------------------------------------ the child: one configuration
def build_engine(dtype: str, compiled: bool, device: str, small: bool = False, quantize: str = "none") -> Any:
    import torch

    from vallexd.inference import batch
    from vallexd.inference.devices import DTYPES
    from vallexd.inference.engine import Engine
    from vallexd.inference.model import ModelConfig, VallEX
    from vallexd.inference.quantize import check_int8, quantize_model
    from vallexd.inference.vocoder import Vocoder, build_vocos
    from vallexd.tools.tiny_weights import random_encodec, random_vocos_state, vocos_config

    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = ModelConfig(d_model=128, n_heads=4, n_layers=2) if small else ModelConfig()  # 1024 / 16 / 12
    model = VallEX(cfg).to(dev).eval().requires_grad_(False)
    if dtype != "float32":
        model.set_matmul_dtype(DTYPES[dtype])
    check_int8(quantize, dev)
    quantize_model(model, quantize)
    config = vocos_config(dim=64, intermediate_dim=192, num_layers=1) if small else vocos_config()
    vocos = build_vocos(config)
    vocos.load_state_dict(random_vocos_state(random_encodec(), config), strict=False)
    engine = Engine(model, Vocoder(vocos.eval(), dev), dev, DTYPES[dtype], f"bench-{dtype}")
    batch.frame_limit = lambda row: max(1, round(FRAMES_PER_TOKEN * row.text_len))
    if compiled:
        t = time.perf_counter()
        engine.compile()
        print(f"# compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return engine


def make_requests(n: int, quick: bool, seed: int) -> list[tuple[list[Any], Any]]:
    """n distinct (pieces, prompt) pairs: 1-3 sentences (1 in quick mode), 3-10 s prompts (3-5 s)."""
    from vallexd.storage.prompts import Prompt

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seconds = rng.uniform(3, 5 if quick else 10)
        frames = int(seconds * 75)
        prompt = Prompt(rng.integers(0, 1024, (1, frames, 8)),
                        rng.integers(5, 70, (1, int(seconds * TOKENS_PER_SECOND))), "en")
        sentences = 1 if quick else int(rng.integers(1, 4))
        tokens = int(sum(rng.integers(18, 34) for _ in range(sentences)))
        out.append(([(rng.integers(5, 70, tokens).tolist(), "en")], prompt))
    return out


def ten_sentences(seed: int) -> tuple[list[Any], Any, list[Any]]:
    """A 10-sentence text as the daemon splits it (first sentence alone, then <= 120 tokens)."""
    from vallexd.storage.prompts import Prompt

    rng = np.random.default_rng(seed)
    sent = [rng.integers(5, 70, int(rng.integers(18, 34))).tolist() for _ in range(10)]
    pieces = [sent[0]]
    current: list[int] = []
    for s in sent[1:]:
        if current and len(current) + len(s) + 1 > 120:
            pieces.append(current)
            current = []
        current = current + s
    pieces.append(current)
    prompt = Prompt(rng.integers(0, 1024, (1, 300, 8)), rng.integers(5, 70, (1, 57)), "en")
    return [(p, "en") for p in pieces], prompt, [(sent[0], "en")]


async def concurrent(worker: Any, n: int, quick: bool, *, gap: float = 0.0,
                     seed: int | None = None) -> dict[str, Any]:
    """N distinct requests through `worker`, request k sent at k x `gap` s (all at once by
    default): throughput and latencies (each from its request's sending to its result)."""
    from vallexd.types import Sampling

    reqs = make_requests(n, quick, seed=100 + n if seed is None else seed)
    lat: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()

    async def one(pieces: list[Any], prompt: Any, k: int) -> float:
        await asyncio.sleep(k * gap)
        sent = time.perf_counter()
        audio = await worker.run(pieces, prompt, Sampling(top_k=1, seed=k), timeout_s=7200, long_mode="fixed")
        lat.append(time.perf_counter() - sent)
        return len(audio) / 24000

    audio_s = await asyncio.gather(*(one(p, pr, k) for k, (p, pr) in enumerate(reqs)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n": n, "throughput": sum(audio_s) / wall, "p50": statistics.median(lat),
            "p90": float(np.percentile(lat, 90)), "mean": statistics.mean(lat), "audio_s": sum(audio_s),
            "wall": wall, "cpu_per_audio_s": cpu / sum(audio_s)}


async def time_to_first_audio(worker: Any) -> dict[str, float]:
    """TTFA of a 10-sentence text alone (cancelled after its first piece), and its first sentence alone."""
    from vallexd.types import Sampling

    pieces, prompt, first = ten_sentences(7)
    first_audio: list[float] = []
    gone = asyncio.Event()
    t1 = time.perf_counter()

    def on_audio(_a: np.ndarray) -> None:
        first_audio.append(time.perf_counter() - t1)
        gone.set()  # the rest is not needed: cancel it

    with contextlib.suppress(Exception):  # cancelled after its first piece, as intended
        await worker.run(pieces, prompt, Sampling(top_k=1, seed=1), timeout_s=7200, cancelled=gone,
                         on_audio=on_audio, long_mode="fixed")
    t2 = time.perf_counter()
    await worker.run(first, prompt, Sampling(top_k=1, seed=1), timeout_s=7200)
    return {"ttfa": first_audio[0], "first_alone": time.perf_counter() - t2}


async def run_config(engine: Any, ns: list[int], quick: bool, nar_thread: str) -> list[dict[str, Any]]:
    from vallexd.service.worker import ModelWorker

    rows = []
    for n in ns:
        worker = ModelWorker(lambda: engine, queue_limit=64, max_batch=n, nar_thread=nar_thread)
        await worker.start()
        try:
            row = await concurrent(worker, n, quick)
            if n == ns[0]:
                row.update(await time_to_first_audio(worker))
            row["nar_thread"] = bool(worker.nar_thread)
            rows.append(row)
            print(f"# n={n}: {json.dumps(row)}", file=sys.stderr, flush=True)
        finally:
            await worker.stop(5.0)
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows


def child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.dtype, args.compile, args.device, args.small, args.quantize)
    rows = asyncio.run(run_config(engine, [int(n) for n in args.n.split(",")], args.quick, args.nar_thread))
    print(json.dumps(rows))


# ------------------------------------------------------------------ the parent: table + RESULT lines
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--n", default=None, help="comma-separated N values (default 1,2,4,8; quick: 1,4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="a small model: checks the script itself")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--nar-thread", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--no-int8", action="store_true", help="leave out the int8 (--quantize) rows")
    args = parser.parse_args()
    args.n = args.n or ("1,4" if args.quick else "1,2,4,8")
    if args.child:
        child(args)
        return

    import torch

    from vallexd.errors import VallexError
    from vallexd.inference.devices import cpu_has_native_bf16
    from vallexd.inference.quantize import check_int8

    device = torch.device(args.device)
    half_ok = cpu_has_native_bf16() if device.type == "cpu" else torch.cuda.is_bf16_supported()
    fastest = "bfloat16" if half_ok else "float32"
    configs = [("float32", False, "none", "auto")]
    if half_ok:
        configs.append(("bfloat16", False, "none", "auto"))
    configs.append((fastest, False, "none", "off"))
    if not args.quick:
        configs.append((fastest, True, "none", "auto"))
    try:
        check_int8("all", device)
        int8_ok = not args.no_int8
    except VallexError as exc:
        print(f"# no int8 rows: {exc.message}")
        int8_ok = False
    if int8_ok:
        configs += [(fastest, False, "nar", "auto"), (fastest, False, "all", "auto")]
    print(f"machine: {cpu_features()}; torch {torch.__version__}; threads {args.threads or 'default'}; "
          f"device {args.device}")
    results: dict[tuple[str, bool, str, str], list[dict[str, Any]]] = {}
    for dtype, compiled, quantize, nar_thread in configs:
        cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--n", args.n, "--threads",
               str(args.threads), "--device", args.device, "--quantize", quantize,
               "--nar-thread", nar_thread] + (
               ["--quick"] if args.quick else []) + (["--compile"] if compiled else []) + (
               ["--small"] if args.small else [])
        label = f"{dtype}{' compiled' if compiled else ''} int8={quantize} nar_thread={nar_thread}"
        print(f"# running {label} ...", flush=True)
        # The child's progress lines (stderr) show as it goes; its stdout is the JSON result.
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"configuration {dtype} compile={compiled} quantize={quantize} failed")
        results[(dtype, compiled, quantize, nar_thread)] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = results[("float32", False, "none", "auto")][0]
    assert base["n"] == 1, "the baseline is serial float32 batch 1 (N must start at 1)"
    header = (f"{'dtype':9} {'compile':7} {'int8':4} {'nar':3} {'N':>2} {'audio-s/s':>9} {'thru_x':>6} "
              f"{'p50 s':>7} {'p50_x':>5} {'p90 s':>7} {'ttfa s':>7} {'ttfa_x':>6} {'ttfa/first':>10} "
              f"{'RSS MB':>7} {'CPU s/audio s':>13}")
    print(header)
    lines = []
    for (dtype, compiled, quantize, _), rows in results.items():
        ttfa_row = rows[0]
        for r in rows:
            thru_x = r["throughput"] / base["throughput"]
            p50_x = r["p50"] / base["p50"]
            ttfa_x = ttfa_row["ttfa"] / base["ttfa"]
            ratio_first = ttfa_row["ttfa"] / ttfa_row["first_alone"]
            flag = "yes" if compiled else "no"
            nar = "thr" if r["nar_thread"] else "-"
            print(f"{dtype:9} {flag:7} {quantize:4} {nar:3} {r['n']:>2} {r['throughput']:9.3f} {thru_x:6.2f} "
                  f"{r['p50']:7.1f} {p50_x:5.2f} {r['p90']:7.1f} {ttfa_row['ttfa']:7.1f} {ttfa_x:6.2f} "
                  f"{ratio_first:10.2f} {r['peak_rss_mb']:7.0f} {r.get('cpu_per_audio_s', 0):13.2f}")
            lines.append(f"RESULT n={r['n']} dtype={dtype} compile={'yes' if compiled else 'no'} "
                         f"quantize={quantize} nar_thread={'on' if r['nar_thread'] else 'off'} "
                         f"throughput_x={thru_x:.2f} latency_p50_x={p50_x:.2f} "
                         f"ttfa_x={ttfa_x:.2f} "
                         f"peak_rss_mb={r['peak_rss_mb']:.0f}")
    print("(int8: which decoders run int8 weight matmuls (--quantize); nar: thr = NAR stages on their "
          "own thread beside the AR batch (--nar-thread); ttfa: 10-sentence text alone, "
          "time to its first audio; ttfa/first: that over its first "
          "sentence alone; _x: ratio to serial float32 batch 1 of this run; CPU s/audio s: process CPU "
          "time per second of audio made, a load-independent view of the work on a shared machine)")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
