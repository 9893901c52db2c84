#!/usr/bin/env bash
# Everything GPU-side in one device call (at most 7.5 minutes: each part is bounded
# by its own timeout), every figure written under OUTDIR, a summary table at the end:
#   1. the users' path (benchmarks/train_check.py): the optimizer and the DDP hook with every
#      compressor on CUDA tensors over a 1-rank NCCL group (bit for bit against a LocalBackend)
#      and over 2 gloo ranks (replicas compared), then fp16 AMP with GradScaler and an Inf on
#      one rank (every rank skips the step, error-feedback state kept);
#   2. sparse receive sums in rank order on CUDA (tests/allreduce/test_sparse.py, if pytest is
#      there);
#   3. every kernel against the torch reference on CUDA tensors (benchmarks/kernels_check.py);
#   4. the timing table, 2**16 .. 2**26 elements, kernel vs torch path vs a copy, with the
#      targets checked at its end (benchmarks/kernels.py).
# Run from the repository root on the GPU machine:  bash scripts/gpu_check.sh [OUTDIR]
# (the device tool: command "bash scripts/gpu_check.sh $OUT"; then commit OUTDIR/train_check.md,
# OUTDIR/kernels_gpu.* and OUTDIR/summary.md under benchmarks/results/). Needs python3 with CUDA
# torch, Triton and numpy; numba and pytest optional.
set -uo pipefail
out=${1:-${OUT:-/tmp/gradzip-gpu}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=0
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/gpu.txt"

timeout 150 $py -m benchmarks.train_check --device cuda --out "$out" 2>&1 | tee "$out/train.log"
train=${PIPESTATUS[0]}

if $py -c "import pytest" 2>/dev/null; then
    timeout 45 $py -m pytest -q -p no:cacheprovider tests/allreduce/test_sparse.py -k rank_order \
        2>&1 | tee "$out/sparse.log"
    sparse=${PIPESTATUS[0]}
else
    echo "pytest not installed: sparse rank-order check not run" | tee "$out/sparse.log"
    sparse=skipped
fi

timeout 100 $py -m benchmarks.kernels_check --device cuda 2>&1 | tee "$out/check.log"
check=${PIPESTATUS[0]}

timeout 150 $py -m benchmarks.kernels --device cuda --max-log2 26 --repeat 10 \
    --out "$out/kernels_gpu" 2>&1 | tee "$out/kernels.log"
bench=${PIPESTATUS[0]}

verdict() { case $1 in 0) echo ok ;; skipped) echo "not run" ;; 124) echo "TIMEOUT" ;; *) echo "FAIL (exit $1)" ;; esac; }
{
    echo "| part | result | detail |"
    echo "|---|---|---|"
    echo "| users' path: optimizer + DDP hook, NCCL 1 rank, gloo 2 ranks, fp16 AMP | $(verdict "$train") | $(tail -n 1 "$out/train_check.md" 2>/dev/null) |"
    echo "| sparse sums in rank order on CUDA | $(verdict "$sparse") | $(tail -n 1 "$out/sparse.log") |"
    echo "| kernels against the torch reference | $(verdict "$check") | $(grep -c '^ok' "$out/check.log") checks ok |"
    echo "| kernel timing table and targets | $(verdict "$bench") | $out/kernels_gpu.md |"
} | tee "$out/summary.md"
[ "$train" = 0 ] && [ "$check" = 0 ] && [ "$bench" = 0 ] && { [ "$sparse" = 0 ] || [ "$sparse" = skipped ]; }
