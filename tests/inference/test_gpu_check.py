"""`bench/gpu_check.sh --device cpu`: every accelerator check of the GPU script, run on the CPU.

The script is what a person with a GPU runs (see its docstring); here it proves the checks
themselves work, on tiny weights, without the full-size timing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_passes_on_the_cpu() -> None:
    proc = subprocess.run(
        ["sh", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--threads", "1"],
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    verdicts = {line.split(":")[0].split(" ", 1)[1]: line.split(" ", 1)[0]
                for line in out.splitlines() if line.startswith(("PASS ", "FAIL ", "SKIP "))}
    for name in ("device", "dtypes", "load float32", "sampling", "non-finite", "engine float32", "vocoder"):
        assert verdicts.get(name) == "PASS", (name, out)
    assert "FAIL" not in verdicts.values(), out
    assert verdicts["oom"] == "SKIP" and verdicts["timing float32"] == "SKIP"  # CUDA only; --full
    assert " 0 failed, " in out.strip().splitlines()[-1]
