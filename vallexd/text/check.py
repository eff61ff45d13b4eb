"""Compare this front end with the reference cases (`python -m vallexd.tools.conformance g2p CASES_JSONL`).

Each line of the cases file is a JSON object with `text`, `language`, `phonemes`,
`ids` and `langs` (see the reference README). A case matches when all three
outputs are identical. Mismatches are printed as text / expected / got; the
last line is `N/M cases match`. Exit status 0 when at least 99% match.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

from vallexd.errors import VallexError
from vallexd.text.frontend import phonemize

PASS_FRACTION = 0.99


def load_cases(path: Path) -> list[dict[str, Any]]:
    cases = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                case = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON: {err}") from err
            missing = {"text", "language", "phonemes", "ids", "langs"} - set(case)
            if missing:
                raise ValueError(f"{path}:{number}: missing keys {sorted(missing)}")
            cases.append(case)
    return cases


def compare(case: dict[str, Any]) -> str | None:
    """None when the case matches, else a short description of what we produced."""
    try:
        got = phonemize(case["text"], case["language"])
    except VallexError as err:
        return f"error {err}"
    diffs = []
    if got.phonemes != case["phonemes"]:
        diffs.append(f"phonemes {got.phonemes}")
    if list(got.ids) != list(case["ids"]):
        diffs.append(f"ids {list(got.ids)}")
    if list(got.langs) != list(case["langs"]):
        diffs.append(f"langs {''.join(lang[0] for lang in got.langs)}")
    return "; ".join(diffs) or None


def main(cases_path: str | Path, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        cases = load_cases(Path(cases_path))
    except (OSError, ValueError) as err:
        print(f"cannot read cases: {err}", file=sys.stderr)
        return 2
    matched = 0
    for case in cases:
        problem = compare(case)
        if problem is None:
            matched += 1
            continue
        print(f"text:     {case['text']!r} ({case['language']})", file=out)
        print(f"expected: {case['phonemes']}", file=out)
        print(f"got:      {problem}", file=out)
    print(f"{matched}/{len(cases)} cases match", file=out)
    return 0 if cases and matched >= PASS_FRACTION * len(cases) else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m vallexd.text.check CASES_JSONL", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
