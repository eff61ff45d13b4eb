"""Check this implementation against the reference vectors in ../shared/reference/.

    python -m vallexd.tools.conformance model CHECKPOINT CASES_JSONL
    python -m vallexd.tools.conformance g2p CASES_JSONL

`model` loads CHECKPOINT strictly on the CPU in float32, runs every case
(format: ../shared/reference/README.md) and prints one line per case, then
`N/M cases match`.  The exit status is 0 only when every case matches.
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

from vallexd.constants import NUM_QUANTIZERS
from vallexd.errors import VallexError
from vallexd.inference.checkpoint import load_model
from vallexd.inference.model import VallEX, language_ids


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


def run_case(model: VallEX, case: dict[str, Any]) -> torch.Tensor:
    """Generate (T, 8) codes for one case, greedy or not as the case says (cases use top_k = 1)."""
    enroll = [int(i) for i in case["enroll_text_ids"]]
    text = [int(i) for i in case["text_ids"]]
    langs = language_ids(len(enroll), case["prompt_language"], case["text_language"], len(text))
    prompt = torch.tensor(case["prompt_codes"], dtype=torch.long).reshape(-1, NUM_QUANTIZERS)
    x = torch.tensor(enroll + text, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)  # only used when top_k != 1
    return model.generate(x, torch.tensor(langs), prompt, top_k=int(case.get("top_k", 1)), generator=gen)


def compare_case(model: VallEX, case: dict[str, Any]) -> CaseResult:
    name = case.get("case", "?")
    expected = torch.tensor(case["expected_codes"], dtype=torch.long).reshape(-1, NUM_QUANTIZERS)
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


def check_model(checkpoint: Path, cases_path: Path, out: Callable[[str], None] = print) -> tuple[int, int]:
    """Run every case; print one line each and the summary; return (matched, total)."""
    model = load_model(checkpoint, torch.device("cpu"), torch.float32)
    matched = total = 0
    for lineno, case in read_cases(cases_path):
        total += 1
        try:
            result = compare_case(model, case)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a malformed case, not a crash
            result = CaseResult(
                case.get("case", f"line {lineno}"), False, f"bad case: {type(exc).__name__}: {exc}"
            )
        matched += result.match
        out(result.line())
    out(f"{matched}/{total} cases match")
    return matched, total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vallexd.reference", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="check the model against model-tiny style cases")
    model.add_argument("checkpoint", type=Path)
    model.add_argument("cases", type=Path)
    g2p = sub.add_parser("g2p", help="check the text front end against g2p.jsonl")
    g2p.add_argument("cases", type=Path)
    args = parser.parse_args(argv)
    if args.command == "g2p":
        from vallexd.text.check import main as g2p_main  # lazy: the text front end is heavy to import

        return int(g2p_main(args.cases))
    try:
        matched, total = check_model(args.checkpoint, args.cases)
    except VallexError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unreadable cases file or a line that is not JSON
        print(f"error: {args.cases}: {exc}", file=sys.stderr)
        return 2
    return 0 if total and matched == total else 1


if __name__ == "__main__":
    sys.exit(main())
