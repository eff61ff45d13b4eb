"""Benchmark the full-size model (1024/16/12, random weights) on the CPU.

    .venv/bin/python bench/bench_model.py [--frames-text 10 --enroll 10 --prompt 75 --runs 1]

Fixed input: a 75-frame prompt, 10 enrolled + 10 new text tokens, top_k = 1,
so the AR stage runs to its 16 x S = 320-frame limit (random weights never
draw EOS).  Prints AR ms/step (mean, p50, p90), AR prefill, NAR seconds,
vocoder seconds (full-size Vocos config, random weights), total, real-time
factor and peak RSS.  Reference for scale on the project's 2-core machines:
the reference implementation takes 30.9 s for this input (AR+NAR, no vocoder),
and a float32 AR step cannot beat ~52 ms (it streams ~600 MB of weights).
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import time

import numpy as np
import torch

from vallexd.constants import SAMPLE_RATE
from vallexd.inference.model import ModelConfig, VallEX
from vallexd.inference.vocoder import Vocoder, build_vocos
from vallexd.tools.tiny_weights import random_encodec, random_vocos_state, vocos_config

REFERENCE_AR_NAR_S = 30.9


def build_vocoder() -> Vocoder:
    config = vocos_config()  # the published sizes: dim 384, 8 layers
    vocos = build_vocos(config)
    vocos.load_state_dict(random_vocos_state(random_encodec(), config), strict=False)
    return Vocoder(vocos.eval(), torch.device("cpu"))


def run_once(
    model: VallEX, vocoder: Vocoder, x: torch.Tensor, langs: torch.Tensor, prompt: torch.Tensor
) -> dict:
    stamps: list[float] = []

    def stamp() -> bool:  # polled once per AR step, right before each draw: a free per-step clock
        stamps.append(time.perf_counter())
        return False

    c0, t0 = time.process_time(), time.perf_counter()
    codes0 = model.generate_ar(x, langs, prompt[:, 0], 1, 1.0, None, should_stop=stamp)
    t1, c1 = time.perf_counter(), time.process_time()
    codes = model.generate_nar(x, langs, prompt, codes0)
    t2, c2 = time.perf_counter(), time.process_time()
    audio = vocoder.decode(codes.numpy())
    t3 = time.perf_counter()
    steps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]  # each: sample + one cached decoder step
    return {
        "frames": int(codes.shape[0]),
        "prefill_s": stamps[0] - t0,
        "steps_ms": steps,
        "ar_s": t1 - t0,
        "ar_cpu_s": c1 - c0,  # process CPU time: with 1 thread, a load-independent view of the work
        "nar_cpu_s": c2 - c1,
        "nar_s": t2 - t1,
        "vocoder_s": t3 - t2,
        "audio_s": audio.shape[0] / SAMPLE_RATE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=int, default=10, help="new text tokens")
    parser.add_argument("--enroll", type=int, default=10, help="enrolled (prompt transcript) tokens")
    parser.add_argument("--prompt", type=int, default=75, help="prompt frames")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's own default, as the daemon)"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    t = time.perf_counter()
    model = VallEX(ModelConfig()).eval().requires_grad_(False)
    vocoder = build_vocoder()
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    s = args.enroll + args.text
    x = torch.as_tensor(rng.integers(5, 70, s))
    langs = torch.tensor([0] * s)
    prompt = torch.as_tensor(rng.integers(0, 1024, (args.prompt, 8)))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model + vocoder built in {build_s:.1f} s; {params:.0f} M parameters")
    for run in range(args.runs):
        r = run_once(model, vocoder, x, langs, prompt)
        steps = sorted(r["steps_ms"])
        total = r["ar_s"] + r["nar_s"]
        q = statistics.quantiles(steps, n=10)
        print(f"\nrun {run + 1}: {r['frames']} frames, S = {s}, P = {args.prompt}")
        mean = statistics.fmean(steps)
        print(f"  {'AR step ms (mean / p50 / p90)':32s} {mean:7.1f} / {q[4]:.1f} / {q[8]:.1f}")
        print(f"  {'AR prefill s':32s} {r['prefill_s']:7.3f}")
        print(f"  {'AR total s (process CPU s)':32s} {r['ar_s']:7.2f}   ({r['ar_cpu_s']:.2f})")
        print(f"  {'NAR s (process CPU s)':32s} {r['nar_s']:7.2f}   ({r['nar_cpu_s']:.2f})")
        print(
            f"  {'AR + NAR s':32s} {total:7.2f}   (reference 30.9 s; ratio {total / REFERENCE_AR_NAR_S:.2f})"
        )
        print(f"  {'vocoder s':32s} {r['vocoder_s']:7.2f}")
        print(f"  {'total s':32s} {total + r['vocoder_s']:7.2f}")
        print(f"  {'audio s':32s} {r['audio_s']:7.2f}")
        print(f"  {'real-time factor':32s} {(total + r['vocoder_s']) / r['audio_s']:7.2f}")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss_mb:.0f} MB; load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
