"""int8 (fbgemm, VNNI) against float32 and bfloat16: one matmul, the NAR of one request, AR steps.

    .venv/bin/python bench/bench_int8.py [--threads 1] [--skip-nar] [--skip-ar]

Full-size model (1024 / 16 / 12) with random weights, through the real code (`VallEX.generate_nar`,
`VallEX.ar_step` with `quantize_model` applied, see vallexd/inference/quantize.py).  Every time is
also given as a ratio to float32 measured in the same run.  Tables:

1. one layer-sized matmul x (M, 1024) @ W (1024, 4096): M = 700 (a NAR sequence), 1, 4, 8 (AR);
   int8 as the model runs it (per batch row: `Int8Linear`);
2. the NAR stages 1..7 of one request: S = 100 text, P = 300 prompt, T = 130 frames (L = 530);
3. one AR step per row at B = 1, 4, 8 rows with ~430 cached positions each.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_serving import cpu_features  # noqa: E402

from vallexd.inference.model import ModelConfig, VallEX  # noqa: E402
from vallexd.inference.quantize import Int8Linear, check_int8, quantize_model  # noqa: E402


def timed(fn: Callable[[], object], seconds: float = 1.0) -> float:
    """Mean seconds per call after two warm-up calls, at least 3 calls and `seconds` in all."""
    fn()
    fn()
    start, n = time.perf_counter(), 0
    while n < 3 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def matmuls() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(4096, 1024) * 0.02, torch.zeros(4096)
    wb, bb = w.bfloat16(), b.bfloat16()
    q = Int8Linear(w, b)
    print("\n1. x (M, 1024) @ W (1024, 4096), ms (ratio to float32)")
    print(f"{'M':>5} {'float32':>9} {'bfloat16':>15} {'int8':>15}")
    for m in (700, 1, 4, 8):
        x = torch.randn(m, 1, 1024) if m <= 16 else torch.randn(1, m, 1024)  # AR: B rows; NAR: 1 request
        xb = x.bfloat16()
        f32 = timed(lambda x=x: F.linear(x, w, b))
        b16 = timed(lambda xb=xb: F.linear(xb, wb, bb).float())
        i8 = timed(lambda x=x: q(x))
        print(f"{m:>5} {f32 * 1e3:9.3f} {b16 * 1e3:9.3f} ({b16 / f32:4.2f}) "
              f"{i8 * 1e3:9.3f} ({i8 / f32:4.2f})")


def variants() -> list[tuple[str, torch.dtype, str]]:
    return [("float32", torch.float32, "none"), ("bfloat16", torch.bfloat16, "none"),
            ("float32 + int8", torch.float32, "all"), ("bfloat16 + int8", torch.bfloat16, "all")]


def build(dtype: torch.dtype, quantize: str) -> VallEX:
    torch.manual_seed(0)
    model = VallEX(ModelConfig()).eval().requires_grad_(False)
    if dtype != torch.float32:
        model.set_matmul_dtype(dtype)
    quantize_model(model, quantize)
    return model


def nar() -> None:
    s, p, t = 100, 300, 130
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, 70, (s,), generator=g)
    langs = torch.zeros(s, dtype=torch.long)
    prompt = torch.randint(0, 1024, (p, 8), generator=g)
    codes0 = torch.randint(0, 1024, (t,), generator=g)
    print(f"\n2. NAR stages 1..7 of one request (L = {s + p + t}), s (ratio to float32)")
    base = None
    for name, dtype, mode in variants():
        model = build(dtype, mode)
        start = time.perf_counter()
        model.generate_nar(x, langs, prompt, codes0)
        took = time.perf_counter() - start
        base = base or took
        print(f"{name:16} {took:7.2f} ({took / base:4.2f})", flush=True)
        del model


def ar() -> None:
    print("\n3. one AR step, ms per row (ratio to float32 at the same B); 430 cached positions per row")
    print(f"{'variant':16} " + " ".join(f"{'B=' + str(b):>14}" for b in (1, 4, 8)))
    base: dict[int, float] = {}
    for name, dtype, mode in variants():
        model = build(dtype, mode)
        cells = []
        for b in (1, 4, 8):
            per_row = ar_step_time(model, b) / b
            base.setdefault(b, per_row)
            cells.append(f"{per_row * 1e3:7.2f} ({per_row / base[b]:4.2f})")
        print(f"{name:16} " + " ".join(cells), flush=True)
        del model


def ar_step_time(model: VallEX, b: int) -> float:
    caches = [model.new_cache(512).normal_() for _ in range(b)]
    toks = torch.randint(0, 1024, (b,))
    return timed(lambda: model.ar_step(toks, [300] * b, caches, [430] * b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-nar", action="store_true")
    parser.add_argument("--skip-ar", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_int8("all", torch.device("cpu"))
    print(f"machine: {cpu_features()}; torch {torch.__version__}; threads {args.threads}")
    matmuls()
    if not args.skip_nar:
        nar()
    if not args.skip_ar:
        ar()


if __name__ == "__main__":
    main()
