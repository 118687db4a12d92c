#!/usr/bin/env bash
# One-shot GPU check (one GPU, well under 10 minutes, no network): anchored-loss parity on the
# GPU vs a float64 CPU reference; bf16 vs FP8 anchored step time, tokens/s and peak memory for a
# ~1B Llama (llama3-1b shape, seq 2048) at TP=1; anchored vs sft step-time ratio. Writes
# gpu_step.json and gpu_step.md (plus one JSON per step configuration) to $1, else $OUT, else
# bench/results/gpu_step, and prints the table last.
#
#   scripts/gpu_check.sh [OUT_DIR]
#
# Needs: python3 with a CUDA PyTorch; megatron-core 0.16.1 - 0.19.x (the newest, 0.19.2, is what the
# GPU machine runs: it has Python 3.12); this repository (run from anywhere).
# Optional: Transformer Engine (the TE layer spec, and the FP8 runs; without it those are
# reported as skipped with the reason) and apex (fused kernels; used when present).
#
# On a machine with no network (the workplace's H200 has torch but, per its package list,
# neither megatron-core nor Transformer Engine), carry megatron-core as a wheel. Once, on a
# machine with pip access, in the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl megatron-core==0.19.2
#
# (2.4 MB, a cp312 wheel with a compiled extension: download it for the Python the GPU machine
# runs. Its requirements torch, numpy, packaging and typing_extensions are already there, and
# triton, which 0.18+ imports, comes with every CUDA build of torch.) This script installs every
# wheel in .whl/ into /tmp/site first when the folder exists. Transformer Engine
# cannot travel that way: its PyTorch extension is built against the local torch and its wheels
# are far over the 64 MiB a device call carries, so FP8 runs only where TE is preinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu_step}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
# megatron-core 0.18+ would run `git rev-parse` at import and stamp its version with this repo's commit.
export NO_VCS_VERSION=1
PYTHON="${PYTHON:-python3}"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true
"$PYTHON" - <<'EOF'
import torch
import megatron.core
print(f"torch {torch.__version__} cuda {torch.version.cuda} available={torch.cuda.is_available()} megatron-core {megatron.core.__version__}")
for name in ("transformer_engine.pytorch", "apex"):
    try:
        __import__(name)
        print(f"{name}: importable")
    except Exception as exc:  # report, do not stop: the benchmark records what is missing
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
EOF

set -o pipefail
timeout 560 "$PYTHON" bench/gpu_step.py all --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_check.log"
