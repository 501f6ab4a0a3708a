#!/usr/bin/env bash
# The prepared GPU check, for one H100/H200, in at most 8 minutes (every step is capped; the caps add up
# to 480 s): the GPU-marked tests, the kernel suite (Triton and torch, bf16), the sdxl preset of
# mixed-vs-base and adapters-scale against the diffusers+PEFT baseline, cold-load, and the compiled path
# (deft serve --compile --compile-buckets: inductor with CUDA graphs per bucketed batch size, against
# the eager engine); every result lands in one folder.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]                 (default: benchmarks/results/gpu-<date>)
#   bash benchmarks/gpu_check.sh --cpu-dry-run [OUT_DIR]   (default: a temporary folder)
#
# --cpu-dry-run runs every step on this CPU with every size shrunk (tiny presets, Triton under its
# interpreter, report names prefixed dryrun- and removed from benchmarks/results afterwards), so the
# first real GPU run does not fail on a typo. Its caps are 8x longer: a shared CPU is slow.
#
# Needs a Python with a CUDA build of torch, triton, and this project installed (`pip install -e
# ".[dev]"` without the CPU torch pin: TORCH_SPEC=torch make venv). The compiled path's correctness on
# the GPU (no recompiles, equal images) is also checked by its GPU-marked test in
# tests/test_torch_compile.py. The efficiency suite (python -m benchmarks efficiency --device cuda) is
# not in the 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    DRY=1
    shift
fi
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi # make venv's
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ((DRY)); then
    OUT=${1:-$(mktemp -d -t deft-gpu-dry-XXXXXX)}
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    PRESET=tiny KPRESET=dry DTYPE=float32 NAME=dryrun-
    SCALE=(--counts 1 2 --requests 2 --popularity uniform --confirm-rounds 0)
    MIXED=(--adapters 2 --requests 2 --rounds 1)
    COLD=(--adapters 2 --repeats 1 --sdxl-ranks 4)
    COMPILED=(--device cpu --models tiny-sdxl --requests 2 --steps 2 --max-batch-rows 4 --repeats 1)
    REPEATS=1 CAPX=8
else
    OUT=${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M)}
    unset TRITON_INTERPRET # real kernels on the GPU
    PRESET=sdxl KPRESET=gpu DTYPE=bfloat16 NAME=
    SCALE=(--counts 1 100 --popularity uniform --confirm-rounds 0)
    MIXED=(--rounds 2)
    COLD=(--repeats 3 --sdxl-ranks 4 8 32)
    COMPILED=(--device cuda --models shapes-sdxl --requests 4 --steps 12 --max-batch-rows 8 --repeats 3)
    REPEATS=10 CAPX=1
fi
mkdir -p "$OUT"

"$PY" - <<'PY' | tee "$OUT/machine.txt"
import torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", device)
PY

status=0
step() { # step SECONDS LOG COMMAND...: run one capped step, its output in OUT/LOG
    local cap=$(($1 * CAPX)) log=$2
    shift 2
    echo "== $* (cap ${cap}s)"
    timeout "$cap" "$@" 2>&1 | tee "$OUT/$log" || { status=1; echo "!! failed: $*" | tee -a "$OUT/$log"; }
}
step 60 gpu-tests.log "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" tests
step 55 kernels.log "$PY" -m benchmarks kernels --preset $KPRESET --backend triton --dtype $DTYPE \
    --repeats $REPEATS --out "${NAME}kernels-$KPRESET-triton-$DTYPE"
step 35 kernels-torch.log "$PY" -m benchmarks kernels --preset $KPRESET --backend torch --dtype $DTYPE \
    --repeats $REPEATS --out "${NAME}kernels-$KPRESET-torch-$DTYPE"
step 105 mixed-vs-base.log "$PY" -m benchmarks mixed-vs-base --preset $PRESET "${MIXED[@]}" \
    --out "${NAME}mixed-vs-base-$PRESET"
step 105 adapters-scale.log "$PY" -m benchmarks adapters-scale --preset $PRESET "${SCALE[@]}" \
    --out "${NAME}adapters-scale-$PRESET"
step 45 cold-load.log "$PY" -m benchmarks cold-load --preset $PRESET "${COLD[@]}" --out "${NAME}cold-load-$PRESET"
step 75 compiled.log "$PY" -m benchmarks compiled --modes buckets "${COMPILED[@]}" --out "${NAME}compiled-$PRESET"

for f in benchmarks/results/"${NAME}"kernels-* benchmarks/results/"${NAME}"mixed-vs-base-$PRESET.* \
    benchmarks/results/"${NAME}"adapters-scale-$PRESET.* benchmarks/results/"${NAME}"cold-load-$PRESET.* \
    benchmarks/results/"${NAME}"compiled-$PRESET.*; do
    [[ -e "$f" ]] || continue
    cp "$f" "$OUT"/
    if ((DRY)); then rm -f "$f"; fi
done
echo "results in $OUT (status $status)"
exit $status
