"""`python -m vallexd.reference model --device/--dtype`: the per-codebook agreement report.

Teacher-forced on the reference's own codes, float32 on the CPU must agree on every frame of every
codebook (which proves the teacher-forced pass is the generation's computation); bfloat16 on this
CPU (native AVX512_BF16) agrees on most but not all, and `--min-agreement` turns that into a verdict.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REFERENCE, ROOT, require_shared

from vallexd.inference.devices import cpu_has_native_bf16
from vallexd.tools.conformance import check_model

TINY = REFERENCE / "model-tiny"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_float32_teacher_forced_agreement_is_total() -> None:
    require_shared(TINY / "cases.jsonl")
    lines: list[str] = []
    report = check_model(TINY / "checkpoint.pt", TINY / "cases.jsonl", lines.append, agreement=True)
    assert (report.matched, report.total) == (4, 4)
    assert report.agreement == [100.0] * 8
    assert lines[-1].startswith("all cases (cpu, float32): teacher-forced agreement per codebook over")
    assert sum("cb7 100.00%" in line for line in lines) == 5  # each case, and all of them


def test_bfloat16_cli_reports_agreement_and_applies_the_threshold() -> None:
    require_shared(TINY / "cases.jsonl")
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bfloat16 (avx512_bf16/amx_bf16)")

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vallexd.reference", "model", str(TINY / "checkpoint.pt"),
             str(TINY / "cases.jsonl"), "--device", "cpu", "--dtype", "bfloat16", *extra],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=ROOT,
            timeout=300)

    loose = run("--min-agreement", "90")
    assert loose.returncode == 0, loose.stdout + loose.stderr
    last = loose.stdout.strip().splitlines()[-1]
    assert last.startswith("all cases (cpu, bfloat16): teacher-forced agreement per codebook over")
    values = [float(cell.rstrip("%")) for cell in last.split()[-8 * 2 + 1 :: 2]]
    assert len(values) == 8 and all(90 <= v < 100 for v in values), last
    strict = run("--min-agreement", "99.99")
    assert strict.returncode == 1 and strict.stdout.strip().splitlines()[-1] == last  # deterministic
