"""Numeric drift of a model variant (bfloat16 / float16 mixed precision, torch.compile) vs float32 eager.

    python -m vallexd.tools.drift CHECKPOINT CASES_JSONL [--dtype bfloat16] [--compile] [--quantize nar]

On the reference cases (../shared/reference/model-tiny) it prints, per case and in total:

- teacher-forced agreement: the float32 greedy codes are fed to both models; the fraction of
  positions where the variant's argmax is the same, for the AR stage and each NAR stage;
- max |logit difference| between the two over those teacher-forced positions;
- free-running greedy agreement: both decode on their own; the fraction of identical codes per
  codebook (frames past the shorter run count as different).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vallexd.constants import NUM_QUANTIZERS
from vallexd.inference.checkpoint import load_model
from vallexd.inference.devices import DTYPES
from vallexd.inference.model import VallEX
from vallexd.inference.quantize import QUANTIZE_MODES, check_int8, quantize_model
from vallexd.tools.conformance import case_inputs, read_cases, run_case, teacher_forced_logits


@dataclass
class Drift:
    forced_same: list[int] = field(default_factory=lambda: [0] * NUM_QUANTIZERS)
    free_same: list[int] = field(default_factory=lambda: [0] * NUM_QUANTIZERS)
    frames: int = 0
    max_logit_diff: float = 0.0

    def add(self, other: Drift) -> None:
        for i in range(NUM_QUANTIZERS):
            self.forced_same[i] += other.forced_same[i]
            self.free_same[i] += other.free_same[i]
        self.frames += other.frames
        self.max_logit_diff = max(self.max_logit_diff, other.max_logit_diff)

    def forced(self, codebook: int) -> float:
        return self.forced_same[codebook] / max(self.frames, 1)

    def free(self, codebook: int) -> float:
        return self.free_same[codebook] / max(self.frames, 1)

    def line(self, name: str) -> str:
        forced = " ".join(f"{self.forced(i):.4f}" for i in range(NUM_QUANTIZERS))
        free = " ".join(f"{self.free(i):.4f}" for i in range(NUM_QUANTIZERS))
        return (f"{name}: frames {self.frames}; teacher-forced agreement per codebook [{forced}]; "
                f"free-running identical per codebook [{free}]; max |logit diff| {self.max_logit_diff:.3g}")


def compare(reference: VallEX, variant: VallEX, case: dict[str, Any]) -> Drift:
    """Drift of `variant` against `reference` (float32 eager) on one case."""
    x, langs, prompt = case_inputs(case)
    want = run_case(reference, case)  # (T, 8) float32 greedy codes
    ref_logits = teacher_forced_logits(reference, x, langs, prompt, want)
    var_logits = teacher_forced_logits(variant, x, langs, prompt, want)
    d = Drift(frames=int(want.shape[0]))
    for i, (a, b) in enumerate(zip(ref_logits, var_logits, strict=True)):
        d.forced_same[i] = int((a.argmax(-1) == b.argmax(-1)).sum())
        d.max_logit_diff = max(d.max_logit_diff, float((a - b).abs().max()))
    got = run_case(variant, case)
    n = min(len(got), len(want))
    for i in range(NUM_QUANTIZERS):
        d.free_same[i] = int((got[:n, i] == want[:n, i]).sum())
    return d


def variant_model(checkpoint: Path, dtype: str, compiled: bool, quantize: str = "none") -> VallEX:
    check_int8(quantize, torch.device("cpu"))
    model = load_model(checkpoint, torch.device("cpu"), DTYPES[dtype])
    quantize_model(model, quantize)
    if compiled:
        from vallexd.inference.compiled import compile_model

        compile_model(model)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vallexd.tools.drift",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("cases", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_MODES)
    args = parser.parse_args(argv)
    reference = load_model(args.checkpoint, torch.device("cpu"), torch.float32)
    variant = variant_model(args.checkpoint, args.dtype, args.compile, args.quantize)
    total = Drift()
    for _, case in read_cases(args.cases):
        d = compare(reference, variant, case)
        print(d.line(f"case {case.get('case', '?')}"))
        total.add(d)
    int8 = f", int8 {args.quantize}" if args.quantize != "none" else ""
    print(total.line(f"all ({args.dtype}{', compiled' if args.compile else ''}{int8})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
