#!/usr/bin/env bash
# Issue 5's GPU checks in one device call (a few minutes on an H100/H200):
#   1. every kernel against the torch reference on CUDA tensors (benchmarks/kernels_check.py);
#   2. the timing table, 2**16 .. 2**26 elements, kernel vs torch path vs a copy, with the
#      targets checked at its end (benchmarks/kernels.py).
# Run from the repository root on the GPU machine:  bash scripts/gpu_check.sh [OUTDIR]
# (the device tool: command "bash scripts/gpu_check.sh $OUT", then commit OUTDIR/kernels_gpu.*
# under benchmarks/results/). Needs python3 with CUDA torch, Triton and numpy; numba optional.
set -uo pipefail
out=${1:-${OUT:-/tmp/gradzip-gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=0
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/gpu.txt"
$py -m benchmarks.kernels_check --device cuda 2>&1 | tee "$out/check.log"
check=${PIPESTATUS[0]}
$py -m benchmarks.kernels --device cuda --max-log2 26 --repeat 10 --out "$out/kernels_gpu" 2>&1 \
    | tee "$out/kernels.log"
bench=${PIPESTATUS[0]}
echo "kernels_check exit $check; kernels exit $bench"
exit $((check || bench))
