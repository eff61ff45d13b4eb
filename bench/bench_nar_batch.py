"""Is a padded NAR batch faster than one NAR pass per row?  (Why the scheduler runs NAR per row.)

    .venv/bin/python bench/bench_nar_batch.py [--layers 2 --rows 4 --dtype float32 --threads 1]

Full-width NAR decoder layers (d 1024, 16 heads; fewer layers than the real 12: the cost per
layer is what is compared) on `rows` sequences of different lengths (S + P + T of realistic
requests, 350..600 positions): each alone, vs all padded to the longest in one batch with a key
padding mask.  Prints seconds per stage for both and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vallexd.inference.devices import DTYPES
from vallexd.inference.model import Decoder, ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=args.layers)
    dec = Decoder(cfg, adaptive=True).eval().requires_grad_(False)
    if args.dtype != "float32":
        for mod in dec.modules():
            if isinstance(mod, torch.nn.Linear) or hasattr(mod, "in_proj_weight"):
                mod.to(DTYPES[args.dtype])
    stage = torch.randn(1, cfg.d_model)
    lengths = [350 + (250 * i) // max(args.rows - 1, 1) for i in range(args.rows)]
    xs = [torch.randn(1, n, cfg.d_model) for n in lengths]
    longest = max(lengths)
    padded = torch.zeros(args.rows, longest, cfg.d_model)
    keep = torch.zeros(args.rows, 1, longest, longest, dtype=torch.bool)
    for i, x in enumerate(xs):
        padded[i, : x.shape[1]] = x[0]
        keep[i, :, :, : x.shape[1]] = True  # every query sees the row's real positions only

    def timed(fn) -> float:
        out = []
        for _ in range(args.reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    with torch.inference_mode():
        alone_out = [dec(x, stage=stage) for x in xs]
        batch_out = dec(padded, stage=stage, mask=keep)
        diff = max(float((a[0] - batch_out[i, : a.shape[1]]).abs().max()) for i, a in enumerate(alone_out))
        alone = timed(lambda: [dec(x, stage=stage) for x in xs])
        batched = timed(lambda: dec(padded, stage=stage, mask=keep))
    print(f"NAR stage, {args.layers} layers x d {cfg.d_model}, {args.dtype}, {args.threads} thread(s), "
          f"rows of {lengths} positions")
    print(f"per row: {alone:.3f} s   padded batch: {batched:.3f} s   batch/alone: {batched / alone:.2f}   "
          f"max |diff| {diff:.2g}")


if __name__ == "__main__":
    main()
