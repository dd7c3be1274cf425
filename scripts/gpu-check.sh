#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA checks (`switchyard device-check`: the workers' compute
# path on the GPU in f32, f16 and bf16 against the CPU and against transformers' outputs for every
# checkpoint fixture), a plain PyTorch bf16 MoE layer as the baseline, a short bench of
# Mixtral-size experts, and the DeepEP presets on this machine's cores. Everything lands in
# REPORT_DIR. About 3-5 minutes on an H200 (the presets took 16 s on a 2-core machine).
#
#   scripts/gpu-check.sh REPORT_DIR [BIN_DIR]
#
# BIN_DIR holds switchyard, switchyard-coordinator and switchyard-worker (default target/release).
# They may be built on a machine without a GPU (SWITCHYARD_LINK_CUDA=1 cargo build --release) and
# run here against this machine's PyTorch: its torch/lib is put on LD_LIBRARY_PATH, and
# libtorch_cuda.so is preloaded for binaries built without SWITCHYARD_LINK_CUDA=1.
set -euo pipefail

report=${1:?usage: scripts/gpu-check.sh REPORT_DIR [BIN_DIR]}
bin=${2:-${SWITCHYARD_BIN_DIR:-target/release}}
nvidia_smi=${SWITCHYARD_NVIDIA_SMI:-nvidia-smi}
python=${SWITCHYARD_PYTHON:-python3}
cd "$(dirname "$0")/.."

if ! gpus=$("$nvidia_smi" --query-gpu=name --format=csv,noheader 2>/dev/null) || [ -z "$gpus" ]; then
    echo "gpu-check: no NVIDIA GPU here ($nvidia_smi finds none); these checks need one." >&2
    echo "gpu-check: the CPU test suite is scripts/test.sh." >&2
    exit 2
fi
for binary in switchyard switchyard-torch switchyard-coordinator switchyard-worker; do
    [ -x "$bin/$binary" ] || { echo "gpu-check: $bin/$binary is missing (build with: SWITCHYARD_LINK_CUDA=1 cargo build --release)" >&2; exit 1; }
done
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
    echo "gpu-check: $python cannot import torch; its lib folder provides libtorch" >&2
    exit 1
}
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ! grep -q "libtorch_cuda.so" "$bin/switchyard-worker"; then
    export LD_PRELOAD="$torch_lib/libtorch_cuda.so${LD_PRELOAD:+:$LD_PRELOAD}"
fi
mkdir -p "$report"
echo "gpu-check: $gpus; torch $("$python" -c 'import torch; print(torch.__version__)'); report in $report"

# Where experts and the reference run: one GPU, the CPU threads shared out.
export SWITCHYARD_DEVICE=cuda

# What a CUDA worker offers placement: nine tenths of the GPU's free memory (NVML), not host RAM,
# and its measured bf16 matmul rate.
timeout 30 "$bin/switchyard-worker" --insecure --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --log-format json 2>&1 |
    grep -m1 '"worker listening"' | tee "$report/worker-offer.json" || true
nvidia-smi --query-gpu=memory.free,memory.total --format=csv >>"$report/worker-offer.json" 2>/dev/null || true
"$bin/switchyard" device-check --device cuda --fixtures fixtures 2>"$report/device-check.log" | tee "$report/device-check.txt"

"$python" scripts/torch_moe_baseline.py --dims 4096x14336 --experts 8 --top-k 2 --tokens 1,1024,4096 \
    --dtype bf16 --calls 20 --out "$report/torch-baseline.json"

"$bin/switchyard" bench --run sweep --workers 1,2 --experts 8 --top-k 2 --dims 4096x14336 \
    --tokens 1,1024,4096 --wire-dtypes bf16 --dtype bf16 --calls 10 --warmup-calls 3 --point-time 20s \
    --capacity-factor 4 --out "$report/bench" 2>"$report/bench.log"

# The data plane on a machine with many cores: the DeepEP presets' dispatch and combine beside one
# raw TCP connection and raw TCP to every worker at once, all measured in the same run, each
# worker reached over one connection per core (up to 8). Identity experts on the CPU: the
# transfers alone, with no GPU work between them.
SWITCHYARD_DEVICE=cpu "$bin/switchyard" bench --run deepep --preset-workers 2 --preset-calls 20 \
    --out "$report/deepep" 2>"$report/deepep.log"

echo "gpu-check: done; see $report/device-check.txt, $report/torch-baseline.json, $report/bench/report.md and $report/deepep/report.md"
