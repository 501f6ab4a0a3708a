#!/usr/bin/env bash
# The prepared GPU check, for one H100/H200: the GPU-marked tests, the kernel benchmark with the Triton
# backend in bf16, and the sdxl preset of adapters-scale; every step is capped (about 11 minutes at
# worst, the first two steps under 5) and every result lands in one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: benchmarks/results/gpu-<date>)
#
# Needs a Python with a CUDA build of torch, triton, and this project installed (`pip install -e
# ".[dev]"` without the CPU torch pin: TORCH_SPEC=torch make venv).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET   # real kernels on the GPU

"$PY" - <<'PY' | tee "$OUT/machine.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
PY

status=0
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests 2>&1 | tee "$OUT/gpu-tests.log" || status=1
timeout 90 "$PY" -m benchmarks kernels --preset gpu --backend triton --dtype bfloat16 --repeats 10 \
    --out kernels-gpu-triton-bfloat16 2>&1 | tee "$OUT/kernels.log" || status=1
timeout 60 "$PY" -m benchmarks kernels --preset gpu --backend torch --dtype bfloat16 --repeats 10 \
    --out kernels-gpu-torch-bfloat16 2>&1 | tee "$OUT/kernels-torch.log" || status=1
timeout 420 "$PY" -m benchmarks adapters-scale --preset sdxl --popularity uniform --counts 1 100 \
    2>&1 | tee "$OUT/adapters-scale-sdxl.log" || status=1
cp benchmarks/results/kernels-gpu-*.json benchmarks/results/kernels-gpu-*.md "$OUT"/ 2>/dev/null
echo "results in $OUT (status $status)"
exit $status
