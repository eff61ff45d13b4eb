"""One command that exercises every accelerator path of vallexd and prints PASS/FAIL lines.

    bench/gpu_check.sh [--device cuda|cuda:N|cpu|mps|auto] [--full | --no-full] [--cases DIR]

Run it on a machine with a GPU (default `--device cuda`) and paste its output into the issue.
`--device cpu` runs the same checks on the CPU (the test suite does, in its slow set).  Checks:

  device      resolution, capability vs the torch build, the probe kernel; name, memory, driver
  dtypes      each dtype accepted or refused per the policy (README "GPUs and torch builds")
  load        the model loaded in each accepted dtype: on the device, matmul weights in that dtype
  reference   the shared reference cases (../shared/reference/model-tiny) in each dtype: exact in
              float32 on the CPU, else per-codebook teacher-forced agreement over a threshold
  sampling    seeded sampling on the device: same seed -> same codes, other seed -> other codes
  non-finite  NaN weights in a subprocess: greedy AR, sampled AR and a NAR stage each fail with
              INTERNAL/NON_FINITE, then a clean request succeeds and the device is still healthy
  engine      Engine synthesis: three requests, CUDA memory back to its baseline after each
  oom         (CUDA) a request over a capped memory budget is RESOURCE_EXHAUSTED, memory is
              released, and the next request succeeds
  vocoder     Vocos on the device against the CPU, the same codes; EnCodec likewise
  timing      (--full; default on CUDA) the full-size model (random weights) in each dtype

Exit status 0 when nothing failed (SKIP lines say what could not run here and why).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # run as a script: the repo's packages and bench_model

from vallexd.errors import InvalidArgument, ResourceExhausted, VallexError  # noqa: E402
from vallexd.inference.checkpoint import load_model  # noqa: E402
from vallexd.inference.devices import (  # noqa: E402
    DTYPES,
    describe,
    dtype_name,
    open_device,
)
from vallexd.types import Sampling  # noqa: E402

#: Minimum teacher-forced agreement per codebook (percent) with the float32 reference, by dtype.
#: Measured on the CPU (AVX512_BF16): bfloat16 fully cast 97.8-98.5 %.
AGREEMENT = {"float32": 99.9, "float16": 98.5, "bfloat16": 97.0}
#: The shared reference folder beside the checkout (or inside it, where a copy was put there).
DEFAULT_CASES = next((p for p in (ROOT.parent / "shared" / "reference" / "model-tiny",
                                  ROOT / "shared" / "reference" / "model-tiny") if p.is_dir()),
                     ROOT.parent / "shared" / "reference" / "model-tiny")


class Skip(Exception):
    """The check cannot run here; the message says why."""


class Checks:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def run(self, name: str, fn: Callable[[], str]) -> bool:
        started = time.perf_counter()
        try:
            detail = fn()
            verdict = "PASS"
        except Skip as exc:
            verdict, detail = "SKIP", str(exc)
        except Exception as exc:  # a failed check must not stop the others
            verdict = "FAIL"
            detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if self.verbose:
                traceback.print_exc()
        self.counts[verdict] += 1
        print(f"{verdict} {name}: {detail} [{time.perf_counter() - started:.1f} s]", flush=True)
        return verdict == "PASS"


def expected_policy(device: torch.device) -> dict[str, bool]:
    """Which dtypes the README promises on this device (the policy devices.resolve_dtype enforces)."""
    from vallexd.inference.devices import BF16_MIN_CAPABILITY, cpu_has_native_bf16

    if device.type == "cuda":
        bf16 = tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY
        return {"float32": True, "float16": True, "bfloat16": bf16}
    if device.type == "cpu":
        return {"float32": True, "float16": False, "bfloat16": cpu_has_native_bf16()}
    return {"float32": True, "float16": False, "bfloat16": False}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_allocated(device: torch.device) -> int:
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0


@contextlib.contextmanager
def tiny_weights() -> Iterator[Any]:
    from vallexd.tools.tiny_weights import make_tiny

    with tempfile.TemporaryDirectory(prefix="vallexd-gpu-check-") as tmp:
        yield make_tiny(Path(tmp))


# ------------------------------------------------------------------------------------------ checks
def check_device(requested: str) -> tuple[str, torch.device]:
    dev, _ = open_device(requested, "float32")
    info = describe(dev)
    parts = [f"{requested} -> {dev}", str(info.get("name"))]
    if dev.type == "cuda":
        parts += [f"capability {info['capability']} in {' '.join(info['arch_list'])}",
                  f"{info['memory_total_bytes'] / 2**30:.1f} GiB",
                  f"driver {info.get('driver')} (CUDA {info.get('driver_cuda')})",
                  f"torch {torch.__version__} CUDA {info.get('cuda_runtime')}"]
    else:
        parts.append(f"capability {info.get('capability')}, torch {torch.__version__}")
    return ", ".join(parts), dev


def check_dtypes(requested: str, dev: torch.device) -> tuple[str, list[str]]:
    policy = expected_policy(dev)
    accepted, words = [], []
    for name in DTYPES:
        try:
            open_device(requested, name)  # resolution and the probe kernel in that dtype
            ok = True
        except InvalidArgument as exc:
            ok, why = False, exc.message
        if ok != policy[name]:
            raise AssertionError(f"{name} {'accepted' if ok else 'refused'} on {dev}, the policy says "
                                 f"{'accept' if policy[name] else 'refuse'}" + ("" if ok else f": {why}"))
        words.append(f"{name} {'accepted (probe ok)' if ok else 'refused'}")
        if ok:
            accepted.append(name)
    return "; ".join(words), accepted


def check_load(checkpoint: Path, dev: torch.device, dtype: str) -> str:
    model = load_model(checkpoint, dev, DTYPES[dtype])
    devices = {p.device for p in model.parameters()}
    assert devices == {dev}, f"parameters on {devices}"
    w = model.ar_decoder.layers[0].linear1.weight
    assert w.dtype == DTYPES[dtype], f"matmul weight in {w.dtype}"
    kinds = sorted({dtype_name(p.dtype) for p in model.parameters()})
    return f"{sum(1 for _ in model.parameters())} tensors on {dev}; dtypes {', '.join(kinds)}"


def check_reference(cases_dir: Path, requested: str, dev: torch.device, dtype: str) -> str:
    from vallexd.tools.conformance import check_model

    cases = cases_dir / "cases.jsonl"
    if not cases.is_file():
        raise Skip(f"no reference cases at {cases_dir} (the shared folder beside the checkout)")
    lines: list[str] = []
    report = check_model(cases_dir / "checkpoint.pt", cases, lines.append, device=requested, dtype=dtype,
                         agreement=True)
    assert report.agreement is not None
    low = min(report.agreement)
    summary = (f"{report.matched}/{report.total} cases identical; agreement per codebook "
               + " ".join(f"{a:.2f}" for a in report.agreement))
    if dev.type == "cpu" and dtype == "float32":
        assert report.matched == report.total, summary  # the contract: the same codes
    else:
        assert low >= AGREEMENT[dtype], f"{summary}; below {AGREEMENT[dtype]} %"
    return summary


def check_sampling(checkpoint: Path, dev: torch.device) -> str:
    model = load_model(checkpoint, dev, torch.float32)
    x = torch.tensor([20, 21, 22, 23], dtype=torch.long, device=dev)
    langs = torch.zeros(4, dtype=torch.long, device=dev)
    prompt = (torch.arange(5 * 8, device=dev) % 1024).view(5, 8)

    def draw(seed: int) -> torch.Tensor:
        gen = torch.Generator(device=dev).manual_seed(seed)
        return model.generate(x, langs, prompt, top_k=5, temperature=0.8, generator=gen).cpu()

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a, b), "the same seed drew different codes"
    assert not torch.equal(a, c), "two seeds drew the same codes"
    assert a.shape[1] == 8 and (a.shape[0] == 0 or (int(a.min()) >= 0 and int(a.max()) < 1024))
    return f"seed 7 twice: identical {tuple(a.shape)}; seed 8 differs (generator on {dev})"


def check_non_finite(requested: str, tiny: Any) -> str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", requested,
           "--child-non-finite", str(tiny.root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 0, " | ".join(out[-4:]) or f"exit {proc.returncode}"
    return " | ".join(line for line in out if line.startswith("ok"))


def child_non_finite(requested: str, root: Path) -> int:
    """In a subprocess: a poisoned CUDA context must not leak into the checking process."""
    from vallexd.inference.engine import Engine
    from vallexd.tools.tiny_weights import CHECKPOINT_NAME, VOCOS_DIR_NAME

    engine = Engine.load(root / CHECKPOINT_NAME, root / VOCOS_DIR_NAME, device=requested)
    dev = torch.device(engine.device)
    model = engine.model
    piece = [([20, 21, 22], "en")]
    cases = [("greedy AR", model.ar_predict_layer.weight, Sampling(top_k=1)),
             ("sampled AR", model.ar_predict_layer.weight, Sampling(top_k=5, temperature=1.0, seed=1)),
             ("NAR stage 7", model.nar_predict_layers[-1].weight, Sampling(top_k=1))]
    for what, weight, sampling in cases:
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.fill_(float("nan"))
        try:
            engine.synthesize(piece, None, sampling)
        except VallexError as exc:
            if exc.reason != "NON_FINITE":
                print(f"FAIL {what}: {exc}")
                return 1
        else:
            print(f"FAIL {what}: NaN logits produced audio instead of INTERNAL/NON_FINITE")
            return 1
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        audio = engine.synthesize(piece, None, Sampling(top_k=1))
        sync(dev)  # a sticky device error would surface here
        assert audio.size > 0 and np.isfinite(audio).all()
        print(f"ok {what} -> NON_FINITE, next request fine")
    return 0


def check_engine(tiny: Any, requested: str, dtype: str) -> str:
    from vallexd.inference.engine import Engine

    engine = Engine.load(tiny.checkpoint, tiny.vocos_dir, device=requested, dtype=dtype)
    dev = torch.device(engine.device)
    pieces = [([20, 21, 22], "en"), ([23, 24], ["en", "zh"])]
    engine.synthesize(pieces, None, Sampling(top_k=1))  # warm-up: lazily built tables, kernels
    sync(dev)
    base = cuda_allocated(dev)
    after = []
    for i, sampling in enumerate([Sampling(top_k=1), Sampling(top_k=5, temperature=0.8, seed=3),
                                  Sampling(top_k=1)]):
        audio = engine.synthesize(pieces[: 1 + i % 2], None, sampling)
        assert audio.dtype == np.float32 and audio.size > 0 and np.isfinite(audio).all()
        sync(dev)
        after.append(cuda_allocated(dev))
    if dev.type != "cuda":
        return f"3 requests on {dev} in {dtype} (memory baseline: CUDA only)"
    assert all(a == base for a in after), f"allocated {after} after requests, baseline {base}"
    return f"3 requests; CUDA allocated back to {base / 2**20:.1f} MiB after each"


def check_oom(tiny: Any, requested: str, dev: torch.device) -> str:
    if dev.type != "cuda":
        raise Skip("CUDA only (CPU out-of-memory handling: tests/service/test_failures.py)")
    from vallexd.inference.engine import Engine
    from vallexd.inference.failures import classify

    engine = Engine.load(tiny.checkpoint, tiny.vocos_dir, device=requested)
    short = [([20, 21], "en")]
    big = [([20 + i % 40 for i in range(200)], "en")]  # a 3200-frame KV cache (3.5 MB): over the cap
    engine.synthesize(short, None, Sampling(top_k=1))
    sync(dev)
    base = cuda_allocated(dev)
    torch.cuda.empty_cache()  # the cap below counts reserved memory: no cached slack to hide in
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = torch.cuda.memory_reserved(dev) + 2**20
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), dev)
    try:
        try:
            engine.synthesize(big, None, Sampling(top_k=1))
            raise AssertionError("a request over a 1 MiB budget succeeded")
        except AssertionError:
            raise
        except Exception as exc:  # what the worker does with it: vallexd.inference.failures
            err = classify(exc, str(dev))
            assert isinstance(err, ResourceExhausted), f"{type(exc).__name__}: {exc}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    released = cuda_allocated(dev)
    assert released == base, f"allocated {released} after the failure, baseline {base}"
    audio = engine.synthesize(short, None, Sampling(top_k=1))
    assert audio.size > 0
    return (f"RESOURCE_EXHAUSTED over a {cap / 2**20:.0f} MiB cap; allocated back to {base / 2**20:.1f} MiB; "
            f"next request fine")


def check_vocoder(tiny: Any, dev: torch.device) -> str:
    from vallexd.inference.encodec import AudioTokenizer
    from vallexd.inference.vocoder import Vocoder, vocoder_device

    codes = np.random.default_rng(0).integers(0, 1024, (150, 8))
    here = Vocoder.load(tiny.vocos_dir, vocoder_device(dev)).decode(codes)
    cpu = Vocoder.load(tiny.vocos_dir, torch.device("cpu")).decode(codes)
    peak = float(np.abs(cpu).max())
    diff = float(np.abs(here - cpu).max())
    assert here.shape == cpu.shape and diff <= 1e-2 * peak + 1e-6, f"max |diff| {diff:.3g} of peak {peak:.3g}"
    t = np.arange(24000) / 24000
    tone = (0.4 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    a = AudioTokenizer.load(tiny.encodec, dev).encode(tone, 24000)
    b = AudioTokenizer.load(tiny.encodec, "cpu").encode(tone, 24000)
    same = float((a == b).mean()) if a.shape == b.shape else 0.0
    assert same >= 0.95, f"EnCodec codes on {dev} agree with the CPU on {100 * same:.1f} %"
    return (f"Vocos on {vocoder_device(dev)}: max |diff| {diff:.2g} (peak {peak:.2g}); "
            f"EnCodec on {dev}: {100 * same:.1f} % of {a.size} codes identical")


def skip_timing() -> str:
    raise Skip("full-size timing is off: pass --full")


def check_timing(requested: str, dtype: str) -> str:
    import bench_model

    dev, dt = open_device(requested, dtype)
    model = bench_model.build_model(dev, dt)
    vocoder = bench_model.build_vocoder(dev)
    x, langs, prompt = bench_model.fixed_inputs(dev, 10, 10, 75)
    bench_model.run_once(model, vocoder, x, langs, prompt)  # warm-up (kernel selection, allocator)
    r = bench_model.run_once(model, vocoder, x, langs, prompt)
    steps = sorted(r["steps_ms"])
    total = r["ar_s"] + r["nar_s"] + r["vocoder_s"]
    peak = f", peak CUDA {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB" if dev.type == "cuda" else ""
    return (f"full size, {r['frames']} frames: AR step p50 {steps[len(steps) // 2]:.1f} ms, prefill "
            f"{r['prefill_s'] * 1000:.0f} ms, NAR {r['nar_s']:.2f} s, vocoder {r['vocoder_s']:.2f} s, total "
            f"{total:.2f} s for {r['audio_s']:.1f} s of audio (RTF {total / r['audio_s']:.3f}){peak}")


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu, mps or auto")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                        help="full-size timing (default: on CUDA only)")
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="reference cases folder")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks of failed checks")
    parser.add_argument("--child-non-finite", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_non_finite is not None:
        return child_non_finite(args.device, args.child_non_finite)

    checks = Checks(args.verbose)
    print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    state: dict[str, Any] = {}

    def device() -> str:
        detail, state["dev"] = check_device(args.device)
        return detail

    if not checks.run("device", device):
        print("gpu_check: the device is unusable; nothing else can run")
        return 1
    dev: torch.device = state["dev"]

    def dtypes() -> str:
        detail, state["dtypes"] = check_dtypes(args.device, dev)
        return detail

    checks.run("dtypes", dtypes)
    accepted: list[str] = state.get("dtypes", ["float32"])
    with tiny_weights() as tiny:
        for dt in accepted:
            checks.run(f"load {dt}", lambda dt=dt: check_load(tiny.checkpoint, dev, dt))
        for dt in accepted:
            checks.run(f"reference {dt}", lambda dt=dt: check_reference(args.cases, args.device, dev, dt))
        checks.run("sampling", lambda: check_sampling(tiny.checkpoint, dev))
        checks.run("non-finite", lambda: check_non_finite(args.device, tiny))
        for dt in accepted:
            checks.run(f"engine {dt}", lambda dt=dt: check_engine(tiny, args.device, dt))
        checks.run("oom", lambda: check_oom(tiny, args.device, dev))
        checks.run("vocoder", lambda: check_vocoder(tiny, dev))
    full = args.full if args.full is not None else dev.type == "cuda"
    for dt in accepted:
        checks.run(f"timing {dt}", lambda dt=dt: check_timing(args.device, dt) if full else skip_timing())
    c = checks.counts
    print(f"gpu_check: {c['PASS']} passed, {c['FAIL']} failed, {c['SKIP']} skipped on {dev}")
    return 1 if c["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
