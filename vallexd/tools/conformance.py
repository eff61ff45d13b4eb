"""Check this implementation against the reference vectors in ../shared/reference/.

    python -m vallexd.tools.conformance model CHECKPOINT CASES_JSONL [--device D] [--dtype T]
                                              [--min-agreement PCT]
    python -m vallexd.tools.conformance g2p CASES_JSONL

`model` loads CHECKPOINT strictly (by default on the CPU in float32), runs every case
(format: ../shared/reference/README.md) and prints one line per case, then
`N/M cases match`.  The exit status is 0 only when every case matches.

Off the CPU or in a half dtype the codes may legitimately drift from the float32 reference, so
the command also reports, per case and over all cases, the agreement per codebook: teacher-forced
on the expected codes (every earlier code is the reference's), the fraction of frames whose argmax
is the expected code, for the AR stage (codebook 0) and each NAR stage (1..7).  With
`--min-agreement PCT` the exit status is 0 when every codebook's overall agreement reaches PCT %.
`g2p` hands over to the text front end's checker (`vallexd.text.check.main`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vallexd.constants import BOS, NUM_QUANTIZERS
from vallexd.errors import VallexError
from vallexd.inference.checkpoint import load_model
from vallexd.inference.devices import open_device
from vallexd.inference.model import VallEX, language_ids, prefill_mask


@dataclass(frozen=True)
class CaseResult:
    case: Any
    match: bool
    detail: str

    def line(self) -> str:
        return f"case {self.case}: {'match' if self.match else 'MISMATCH'} ({self.detail})"


def read_cases(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, case) for each non-blank line; a line that is not a JSON object raises ValueError."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            case = json.loads(line)
            if not isinstance(case, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object")
            yield lineno, case


def model_device(model: VallEX) -> torch.device:
    return next(model.parameters()).device


def case_inputs(
    case: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (S,), langs (S,), prompt codes (P, 8)) of a reference case, int64 on `device`."""
    enroll = [int(i) for i in case["enroll_text_ids"]]
    text = [int(i) for i in case["text_ids"]]
    langs = language_ids(len(enroll), case["prompt_language"], case["text_language"], len(text))
    prompt = torch.tensor(case["prompt_codes"], dtype=torch.long, device=device).reshape(-1, NUM_QUANTIZERS)
    x = torch.tensor(enroll + text, dtype=torch.long, device=device)
    return x, torch.tensor(langs, dtype=torch.long, device=device), prompt


def expected_codes(case: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(case["expected_codes"], dtype=torch.long, device="cpu").reshape(-1, NUM_QUANTIZERS)


def run_case(model: VallEX, case: dict[str, Any]) -> torch.Tensor:
    """Generate (T, 8) codes (on the CPU) for one case on the model's device, greedy or not as the
    case says (cases use top_k = 1)."""
    dev = model_device(model)
    x, langs, prompt = case_inputs(case, dev)
    gen = torch.Generator(device=dev).manual_seed(0)  # only used when top_k != 1
    return model.generate(x, langs, prompt, top_k=int(case.get("top_k", 1)), generator=gen).cpu()


@torch.inference_mode()
def teacher_forced_logits(
    model: VallEX, x: torch.Tensor, langs: torch.Tensor, prompt: torch.Tensor, codes: torch.Tensor
) -> list[torch.Tensor]:
    """Logits for `codes` (T, 8) given every earlier code: [AR (T, 1025), NAR 1..7 (T, 1024) each].

    All inputs on the model's device; one full AR pass (no KV cache) and the seven NAR stages, each
    fed the given codes instead of its own predictions.
    """
    s, p, t = x.shape[0], prompt.shape[0], codes.shape[0]
    dev = x.device
    xe = model._text(model.ar_text_embedding, model.ar_language_embedding, model.ar_text_position, x, langs)
    y = torch.cat([torch.tensor([BOS], dtype=torch.long, device=dev), prompt[:, 0], codes[:-1, 0]])
    ye = model.ar_audio_position(model.ar_audio_embedding(y).unsqueeze(0))
    h = model.ar_decoder(torch.cat([xe, ye], dim=1), mask=prefill_mask(s, y.shape[0], dev))
    out = [model.ar_predict_layer(h[0, s + p : s + p + t])]
    xt = model._text(
        model.nar_text_embedding, model.nar_language_embedding, model.nar_text_position, x, langs
    )
    ye = model.nar_audio_embeddings[0](torch.cat([prompt[:, 0], codes[:, 0]])).unsqueeze(0)
    for j in range(1, NUM_QUANTIZERS):
        ye[:, :p] += model.nar_audio_embeddings[j](prompt[:, j])
    for stage in range(1, NUM_QUANTIZERS):
        vec = model.nar_stage_embeddings[stage - 1].word_embeddings.weight
        h = model.nar_decoder(torch.cat([xt, model.nar_audio_position(ye)], dim=1), stage=vec)
        out.append(model.nar_predict_layers[stage - 1](h[0, s + p :]))
        ye[0, p:] += model.nar_audio_embeddings[stage](codes[:, stage])
    return out


def case_agreement(model: VallEX, case: dict[str, Any]) -> tuple[list[int], int]:
    """(frames whose teacher-forced argmax is the expected code, per codebook; frames) for one case."""
    dev = model_device(model)
    want = expected_codes(case)
    if want.shape[0] == 0:
        return [0] * NUM_QUANTIZERS, 0
    x, langs, prompt = case_inputs(case, dev)
    logits = teacher_forced_logits(model, x, langs, prompt, want.to(dev))
    same = [int((lg.argmax(-1).cpu() == want[:, i]).sum()) for i, lg in enumerate(logits)]
    return same, int(want.shape[0])


def agreement_line(same: Sequence[int], frames: int) -> str:
    cells = " ".join(f"cb{i} {100 * n / max(frames, 1):.2f}%" for i, n in enumerate(same))
    return f"teacher-forced agreement per codebook over {frames} frames: {cells}"


def compare_case(model: VallEX, case: dict[str, Any]) -> CaseResult:
    name = case.get("case", "?")
    expected = expected_codes(case)
    got = run_case(model, case)
    n = min(len(expected), len(got))
    diff = (expected[:n] != got[:n]).any(dim=1).nonzero()
    if len(diff):
        f = int(diff[0])
        return CaseResult(
            name, False, f"first differing frame {f}: expected {expected[f].tolist()}, got {got[f].tolist()}"
        )
    if len(expected) != len(got):
        return CaseResult(name, False, f"expected {len(expected)} frames, got {len(got)} (equal up to {n})")
    return CaseResult(name, True, f"{len(got)} frames")


@dataclass
class ModelReport:
    matched: int = 0
    total: int = 0
    #: Teacher-forced agreement per codebook over all cases (percent), when it was measured.
    agreement: list[float] | None = None


def check_model(
    checkpoint: Path,
    cases_path: Path,
    out: Callable[[str], None] = print,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    agreement: bool | None = None,
) -> ModelReport:
    """Run every case on `device` in `dtype`; print one line each and the summary.

    `agreement` (default: when not float32 on the CPU) adds the per-codebook agreement lines.
    Raises VallexError for a device, dtype or checkpoint that cannot be used.
    """
    dev, dt = open_device(device, dtype)
    model = load_model(checkpoint, dev, dt)
    if agreement is None:
        agreement = not (dev.type == "cpu" and dt == torch.float32)
    report = ModelReport()
    same_all, frames_all = [0] * NUM_QUANTIZERS, 0
    for lineno, case in read_cases(cases_path):
        report.total += 1
        try:
            result = compare_case(model, case)
            same, frames = case_agreement(model, case) if agreement else ([], 0)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a malformed case, not a crash
            result = CaseResult(
                case.get("case", f"line {lineno}"), False, f"bad case: {type(exc).__name__}: {exc}"
            )
            same, frames = [], 0
        report.matched += result.match
        out(result.line())
        if agreement and frames:
            out("  " + agreement_line(same, frames))
            same_all = [a + b for a, b in zip(same_all, same, strict=True)]
            frames_all += frames
    out(f"{report.matched}/{report.total} cases match")
    if agreement:
        out(f"all cases ({dev}, {dtype}): " + agreement_line(same_all, frames_all))
        report.agreement = [100 * n / max(frames_all, 1) for n in same_all]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vallexd.reference", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="check the model against model-tiny style cases")
    model.add_argument("checkpoint", type=Path)
    model.add_argument("cases", type=Path)
    model.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    model.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    model.add_argument("--min-agreement", type=float, default=None, metavar="PCT",
                       help="exit 0 when every codebook's teacher-forced agreement reaches PCT %%")
    g2p = sub.add_parser("g2p", help="check the text front end against g2p.jsonl")
    g2p.add_argument("cases", type=Path)
    args = parser.parse_args(argv)
    if args.command == "g2p":
        from vallexd.text.check import main as g2p_main  # lazy: the text front end is heavy to import

        return int(g2p_main(args.cases))
    try:
        report = check_model(args.checkpoint, args.cases, device=args.device, dtype=args.dtype,
                             agreement=True if args.min_agreement is not None else None)
    except VallexError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable cases file or a line that is not JSON
        print(f"error: {args.cases}: {exc}", file=sys.stderr)
        return 2
    if args.min_agreement is not None and report.agreement is not None and report.total:
        return 0 if min(report.agreement) >= args.min_agreement else 1
    return 0 if report.total and report.matched == report.total else 1


if __name__ == "__main__":
    sys.exit(main())
