#!/bin/sh
# Every accelerator path of vallexd, PASS/FAIL per line: see bench/gpu_check.py for the checks.
#   bench/gpu_check.sh                  # on the first CUDA GPU, with full-size timing
#   bench/gpu_check.sh --device cpu     # the same checks on the CPU (no timing unless --full)
# PYTHON picks the interpreter (default: the checkout's .venv, else python3).
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
[ -x "$python" ] || python=python3
exec "$python" "$here/gpu_check.py" "$@"
