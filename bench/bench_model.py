"""Benchmark the full-size model (1024/16/12, random weights) on any device and dtype.

    .venv/bin/python bench/bench_model.py [--device auto|cpu|cuda:N] [--dtype float32|bfloat16|float16]
                                          [--text 10 --enroll 10 --prompt 75 --runs 1 --threads N]

Fixed input: a 75-frame prompt, 10 enrolled + 10 new text tokens, top_k = 1,
so the AR stage runs to its 16 x S = 320-frame limit (random weights never
draw EOS).  Prints AR ms/step (mean, p50, p90), AR prefill, NAR seconds,
vocoder seconds (full-size Vocos config, random weights), total, real-time
factor, peak RSS and, on CUDA, peak GPU memory.  The random weights go through a
temporary checkpoint and `load_model`, so the model is placed exactly as the daemon
places it (device, dtype policy).  Reference for scale on the project's 2-core machines:
the reference implementation takes 30.9 s for this input (AR+NAR, no vocoder),
and a float32 AR step cannot beat ~52 ms (it streams ~600 MB of weights).

Timing on CUDA: kernels run asynchronously, so every clock reading is taken after
`torch.cuda.synchronize()`; the per-step stamps also synchronise (the AR loop reads one
token back per step anyway, so this adds no extra wait to the loop).
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vallexd.constants import SAMPLE_RATE
from vallexd.inference.checkpoint import load_model
from vallexd.inference.devices import describe, dtype_name, open_device
from vallexd.inference.model import ModelConfig, VallEX
from vallexd.inference.vocoder import Vocoder, build_vocos, place_for_decoding, vocoder_device
from vallexd.tools.tiny_weights import random_encodec, random_vocos_state, vocos_config

REFERENCE_AR_NAR_S = 30.9


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def build_model(device: torch.device, dtype: torch.dtype, cfg: ModelConfig | None = None,
                seed: int = 0) -> VallEX:
    """Random weights of `cfg` (default: full size), placed by the daemon's own loader."""
    cfg = cfg or ModelConfig()
    torch.manual_seed(seed)
    model = VallEX(cfg, device="cpu")
    state = model.state_dict()  # tied tensors appear under both names, as in the published file
    config = {"d_model": cfg.d_model, "nhead": cfg.n_heads, "num_layers": cfg.n_layers}
    del model
    with tempfile.TemporaryDirectory(prefix="vallexd-bench-") as tmp:
        path = Path(tmp) / "random.pt"
        torch.save({"model": state, "config": config}, path)
        del state
        return load_model(path, device, dtype)


def build_vocoder(device: torch.device, config: dict | None = None) -> Vocoder:
    """Random Vocos (default: the published sizes), placed as the daemon places it."""
    config = config or vocos_config()
    vocos = build_vocos(config)
    vocos.load_state_dict(random_vocos_state(random_encodec(), config), strict=False)
    vocos.requires_grad_(False)
    target = vocoder_device(device)
    place_for_decoding(vocos.eval(), target)
    return Vocoder(vocos, target)


def run_once(
    model: VallEX, vocoder: Vocoder, x: torch.Tensor, langs: torch.Tensor, prompt: torch.Tensor
) -> dict:
    sync = synchronizer(x.device)
    stamps: list[float] = []

    def stamp() -> bool:  # polled once per AR step, right before each draw: a free per-step clock
        sync()
        stamps.append(time.perf_counter())
        return False

    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    codes0 = model.generate_ar(x, langs, prompt[:, 0], 1, 1.0, None, should_stop=stamp)
    sync()
    t1, c1 = time.perf_counter(), time.process_time()
    codes = model.generate_nar(x, langs, prompt, codes0)
    sync()
    t2, c2 = time.perf_counter(), time.process_time()
    audio = vocoder.decode(codes.cpu().numpy())  # returns host float32: its own device work is done
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


def fixed_inputs(device: torch.device, enroll: int, text: int, prompt_frames: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    s = enroll + text
    x = torch.as_tensor(rng.integers(5, 70, s), device=device)
    langs = torch.zeros(s, dtype=torch.long, device=device)
    prompt = torch.as_tensor(rng.integers(0, 1024, (prompt_frames, 8)), device=device)
    return x, langs, prompt


def print_run(run: int, r: dict, s: int, prompt_frames: int) -> None:
    steps = sorted(r["steps_ms"])
    total = r["ar_s"] + r["nar_s"]
    q = statistics.quantiles(steps, n=10)
    print(f"\nrun {run}: {r['frames']} frames, S = {s}, P = {prompt_frames}")
    mean = statistics.fmean(steps)
    print(f"  {'AR step ms (mean / p50 / p90)':32s} {mean:7.1f} / {q[4]:.1f} / {q[8]:.1f}")
    print(f"  {'AR prefill s':32s} {r['prefill_s']:7.3f}")
    print(f"  {'AR total s (process CPU s)':32s} {r['ar_s']:7.2f}   ({r['ar_cpu_s']:.2f})")
    print(f"  {'NAR s (process CPU s)':32s} {r['nar_s']:7.2f}   ({r['nar_cpu_s']:.2f})")
    print(f"  {'AR + NAR s':32s} {total:7.2f}   (reference 30.9 s; ratio {total / REFERENCE_AR_NAR_S:.2f})")
    print(f"  {'vocoder s':32s} {r['vocoder_s']:7.2f}")
    print(f"  {'total s':32s} {total + r['vocoder_s']:7.2f}")
    print(f"  {'audio s':32s} {r['audio_s']:7.2f}")
    print(f"  {'real-time factor':32s} {(total + r['vocoder_s']) / r['audio_s']:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
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

    dev, dt = open_device(args.device, args.dtype)
    info = describe(dev)
    t = time.perf_counter()
    model = build_model(dev, dt)
    vocoder = build_vocoder(dev)
    synchronizer(dev)()
    build_s = time.perf_counter() - t
    x, langs, prompt = fixed_inputs(dev, args.enroll, args.text, args.prompt)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    print(f"device {dev} ({info.get('name')}, capability {info.get('capability')}), dtype {dtype_name(dt)}, "
          f"vocoder on {vocoder.device}")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model + vocoder built and placed in {build_s:.1f} s; {params:.0f} M parameters")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for run in range(args.runs):
        print_run(run + 1, run_once(model, vocoder, x, langs, prompt), x.shape[0], args.prompt)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss_mb:.0f} MB; load after {os.getloadavg()}")
    if dev.type == "cuda":
        print(f"peak CUDA memory: allocated {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB, "
              f"reserved {torch.cuda.max_memory_reserved(dev) / 2**20:.0f} MiB (during the runs)")


if __name__ == "__main__":
    main()
