"""Requests that arrive one after another (an open stream, as a server sees them), with the NAR on
its own thread (`--nar-thread on`) and in the model thread (`off`), full-size random weights.

    .venv/bin/python bench/bench_arrivals.py [--n 12] [--gaps 2,3] [--max-batch 4] [--dtype bfloat16]
                                             [--quantize nar] [--threads 0]

bench_serving.py sends N requests at one instant: their AR stages run together and their NARs all
come after, so a second thread has little to overlap.  Here request k arrives at k x gap seconds
(one-sentence texts, 3-5 s prompts, greedy, as bench_serving --quick makes them), so finished rows
go to the NAR while other rows still decode.  Printed per gap and mode: wall time until the last
request ends, audio seconds per wall second, mean and p90 latency (arrival to result); then
`RESULT` lines with on/off ratios measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_serving import build_engine, concurrent, cpu_features  # noqa: E402


async def stream(engine: Any, *, n: int, gap: float, max_batch: int, nar_thread: str) -> dict[str, Any]:
    """n requests, request k sent at k x gap s; returns wall, throughput and latencies."""
    from vallexd.service.worker import ModelWorker

    worker = ModelWorker(lambda: engine, queue_limit=4 * n, max_batch=max_batch, nar_thread=nar_thread)
    await worker.start()
    try:
        row = await concurrent(worker, n, True, gap=gap, seed=77)
    finally:
        await worker.stop(5.0)
    return {**row, "nar_thread": bool(worker.nar_thread)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="requests per stream")
    parser.add_argument("--gaps", default="2,3", help="comma-separated seconds between arrivals")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default="nar", help="none | nar | all (int8 needs VNNI)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--small", action="store_true", help="a small model: checks the script itself")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.dtype, False, "cpu", args.small, args.quantize)
    print(f"machine: {cpu_features()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{args.dtype}, int8 {args.quantize}, max_batch {args.max_batch}, {args.n} requests")
    print(f"{'gap s':>5} {'NAR':6} {'wall s':>7} {'audio-s/s':>9} {'mean s':>7} {'p90 s':>7}")
    results = []
    for gap in (float(g) for g in args.gaps.split(",")):
        row = {}
        for mode in ("on", "off"):
            r = asyncio.run(stream(engine, n=args.n, gap=gap, max_batch=args.max_batch, nar_thread=mode))
            row[mode] = r
            where = "thread" if r["nar_thread"] else "inline"
            print(f"{gap:5.1f} {where:6} {r['wall']:7.1f} {r['throughput']:9.3f} {r['mean']:7.1f} "
                  f"{r['p90']:7.1f}", flush=True)
        results.append((gap, row))
    for gap, row in results:
        on, off = row["on"], row["off"]
        print(f"RESULT gap={gap:g} throughput_on_over_off={on['throughput'] / off['throughput']:.2f} "
              f"mean_latency_on_over_off={on['mean'] / off['mean']:.2f} "
              f"p90_latency_on_over_off={on['p90'] / off['p90']:.2f}")


if __name__ == "__main__":
    main()
