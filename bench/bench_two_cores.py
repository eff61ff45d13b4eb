"""What a second CPU core is worth: the NAR of one request run on another thread while the AR
batch steps (the design issue 9's closing note proposes), against what the float32 batch-1
baseline gains from a second torch thread.  Full-size model, random weights, one run.

    .venv/bin/python bench/bench_two_cores.py [--steps 60] [--rows 4]

Rows printed (seconds, and ratios within this run):
- pipelined: bf16 + int8 NAR (`--quantize nar`), 1 torch thread; NAR alone, `--rows` AR rows for
  `--steps` steps alone, both one after the other, and both at once on two Python threads (torch
  releases the GIL inside its kernels, so the two run on two cores).
- baseline: float32, batch 1; the NAR and `--steps` AR steps with 1 and with 2 torch threads.
Needs a CPU with VNNI for the int8 NAR (else it runs bf16 only and says so).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_int8 import build  # noqa: E402
from bench_serving import cpu_features  # noqa: E402

from vallexd.inference.batch import ArBatch, ArRow  # noqa: E402
from vallexd.inference.model import VallEX  # noqa: E402
from vallexd.inference.quantize import cpu_has_vnni  # noqa: E402

S, P, T = 60, 225, 300  # text tokens, prompt frames (3 s), generated frames (4 s)


def once(call: Callable[[], object]) -> float:
    """Seconds of one call (whole NAR runs: bench_int8.timed's repeated means would take minutes)."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="AR steps per measurement")
    parser.add_argument("--rows", type=int, default=4, help="AR rows decoded together (pipelined case)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randint(0, 300, (S,))
    langs = torch.zeros(S, dtype=torch.long)
    prompt = torch.randint(0, 1024, (P, 8))
    codes0 = torch.randint(0, 1024, (T,))

    def ar(m: VallEX, rows: int) -> None:
        batch = ArBatch(m)
        for _ in range(rows):
            batch.add(ArRow(x, langs, prompt[:, 0], 1, 1.0, None))
        for _ in range(args.steps):
            if batch.rows:
                batch.step()

    def nar(m: VallEX) -> None:
        m.generate_nar(x, langs, prompt, codes0)

    print(f"# {cpu_features()}; S={S} P={P} T={T}; {args.steps} AR steps")
    int8 = cpu_has_vnni()
    fast = build(torch.bfloat16, "nar" if int8 else "none")
    torch.set_num_threads(1)
    nar(fast), ar(fast, 1)  # warm-up
    nar_s = once(lambda: nar(fast))
    ar_s = once(lambda: ar(fast, args.rows))
    serial_s = once(lambda: (nar(fast), ar(fast, args.rows)))
    side = threading.Thread(target=nar, args=(fast,))
    started = time.perf_counter()
    side.start()
    ar(fast, args.rows)
    side.join()
    both_s = time.perf_counter() - started
    label = "bf16+int8 NAR" if int8 else "bf16 (no VNNI: no int8)"
    print(f"{label:24} 1 thread: NAR {nar_s:.2f} s, AR {args.rows} rows {ar_s:.2f} s, "
          f"serial {serial_s:.2f} s, concurrent {both_s:.2f} s -> second core x{serial_s / both_s:.2f}")

    base = build(torch.float32, "none")
    rows = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ar(base, 1)
        rows[threads] = (once(lambda: nar(base)), once(lambda: ar(base, 1)))
        print(f"{'float32 batch 1':24} {threads} thread(s): NAR {rows[threads][0]:.2f} s, "
              f"AR {rows[threads][1]:.2f} s")
    one, two = rows[1], rows[2]
    print(f"RESULT pipelined_second_core_x={serial_s / both_s:.2f} "
          f"baseline_second_thread_nar_x={one[0] / two[0]:.2f} "
          f"baseline_second_thread_ar_x={one[1] / two[1]:.2f}")


if __name__ == "__main__":
    main()
