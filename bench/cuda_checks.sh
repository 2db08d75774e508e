#!/usr/bin/env bash
# The CUDA checks in one run, for a machine with an NVIDIA GPU and torch (plus pytest, numba, scikit-learn, httpx):
# tests/test_cuda.py, tests/test_cuda_kernels.py and KoalaDiag's CUDA tests, bench/optimizer_step.py on CUDA without
# and with weight decay, bench/koala_diag_step.py on CUDA, and bench/step_profile.py's host-time profile of a CUDA
# step. CUDA_CHECKS_QUICK=1 keeps the tests and the step benchmarks without weight decay only.
# Usage: bench/cuda_checks.sh OUTPUT_DIR   (logs, the Markdown tables and the JSON results land there)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/cuda_checks.sh OUTPUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}
status=0

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$python" -c 'import sys, torch, numba; print("python", sys.version.split()[0], "torch", torch.__version__, "numba", numba.__version__)'
} 2>&1 | tee "$out/machine.txt"

# -W default: report, not fail on, warnings from the packages of that machine (its versions differ from our pins).
timeout 300 "$python" -m pytest tests/test_cuda.py tests/test_cuda_kernels.py tests/test_koala_diag.py -m gpu -v \
    -p no:cacheprovider -W default -k "not interpreter" 2>&1 | tee "$out/test_cuda.log" || status=1
timeout 200 "$python" bench/optimizer_step.py --device cuda --json "$out/step_cuda.json" 2>&1 | tee "$out/step_cuda.md" || status=1
timeout 100 "$python" bench/koala_diag_step.py --device cuda --sets resnet18-cifar,transformer-4l 2>&1 |
    tee "$out/koala_diag_step_cuda.md" || status=1
[ "${CUDA_CHECKS_QUICK:-0}" = 1 ] && exit $status
timeout 150 "$python" bench/optimizer_step.py --device cuda --weight-decay 5e-4 --no-check \
    --json "$out/step_cuda_wd.json" 2>&1 | tee "$out/step_cuda_wd.md" || status=1
(cd bench && timeout 60 "$python" step_profile.py --device cuda --top 30) > "$out/profile_cuda.txt" 2>&1 || status=1
exit $status
