#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA checks (`switchyard device-check`: the workers' compute
# path on the GPU in f32, f16 and bf16, its rows sent in each wire dtype and layout and routed by
# several policies, against the CPU, and against transformers' outputs for every checkpoint
# fixture), the DeepEP presets on this machine's cores, one token per call on the
# 512x1024 model, a plain PyTorch bf16 MoE layer as the baseline (its experts also fused and
# grouped) and a short bench of Mixtral-size experts, one by one and in grouped products. Everything lands in REPORT_DIR. About 3-5 minutes on an H200 (the presets took 16 s on a
# 2-core machine).
#
#   scripts/gpu-check.sh REPORT_DIR [BIN_DIR]
#
# BIN_DIR holds switchyard, switchyard-torch, switchyard-coordinator and switchyard-worker (default
# target/release). They may be built on a machine without a GPU (SWITCHYARD_LINK_CUDA=1 cargo build
# --release) and run here against this machine's PyTorch: its torch/lib is put on LD_LIBRARY_PATH,
# and libtorch_cuda.so is preloaded for binaries built without SWITCHYARD_LINK_CUDA=1.
#
# Each step runs under its own time limit, and all of them within SWITCHYARD_GPU_CHECK_SECONDS
# (default 600): a step that fails or runs out of time is reported and the next one still runs, so
# one rented session of a GPU machine yields every figure that could be measured. The exit status
# is non-zero when any step failed. SWITCHYARD_GPU_CHECK_STEPS picks steps by name (comma-separated:
# offer, device-check, presets, one-token, torch-baseline, mixtral, mixtral-grouped; default all).
set -uo pipefail

report=${1:?usage: scripts/gpu-check.sh REPORT_DIR [BIN_DIR]}
bin=${2:-${SWITCHYARD_BIN_DIR:-target/release}}
nvidia_smi=${SWITCHYARD_NVIDIA_SMI:-nvidia-smi}
python=${SWITCHYARD_PYTHON:-python3}
deadline=$((SECONDS + ${SWITCHYARD_GPU_CHECK_SECONDS:-600}))
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
echo "gpu-check: $gpus; $(nproc) cores; torch $("$python" -c 'import torch; print(torch.__version__)'); report in $report"

# Where experts and the reference run: one GPU, the CPU threads shared out.
export SWITCHYARD_DEVICE=cuda

failed=()
# run_step NAME LIMIT_SECONDS FUNCTION: FUNCTION under at most LIMIT_SECONDS and what is left of the
# whole check's time; a failure or a timeout is recorded and the check goes on.
run_step() {
    local name=$1 limit=$2 step=$3 left=$((deadline - SECONDS)) started=$SECONDS status=0
    if [ -n "${SWITCHYARD_GPU_CHECK_STEPS:-}" ] && [[ ",$SWITCHYARD_GPU_CHECK_STEPS," != *",$4,"* ]]; then
        return
    fi
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "gpu-check: $name skipped (the check's time is spent)"
        failed+=("$name (skipped)")
        return
    fi
    echo "gpu-check: $name (at most ${limit} s)"
    timeout --kill-after=10 "$limit" bash -o pipefail -c "$(declare -f "$step"); $step" || status=$?
    if ((status == 0)); then
        echo "gpu-check: $name done in $((SECONDS - started)) s"
    else
        echo "gpu-check: $name FAILED (exit $status$( ((status == 124)) && echo ", out of time"), $((SECONDS - started)) s)"
        failed+=("$name")
    fi
}

# What a CUDA worker offers placement: nine tenths of the GPU's free memory (NVML), not host RAM,
# and its measured bf16 matmul rate.
worker_offer() {
    "$bin/switchyard-worker" --insecure --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --log-format json >"$report/worker.log" 2>&1 &
    local worker=$! tries=300
    until grep -m1 '"worker listening"' "$report/worker.log" >"$report/worker-offer.json" || ((--tries == 0)); do sleep 0.1; done
    kill "$worker" && wait "$worker"
    "$nvidia_smi" --query-gpu=memory.free,memory.total --format=csv >>"$report/worker-offer.json" 2>/dev/null
    cat "$report/worker-offer.json"
    ((tries > 0))
}

device_check() {
    "$bin/switchyard" device-check --device cuda --fixtures fixtures 2>"$report/device-check.log" | tee "$report/device-check.txt"
}

# The data plane on a machine with many cores: the DeepEP presets' dispatch and combine beside one
# raw TCP connection and raw TCP to every worker at once, all measured in the same run, each
# worker reached over one connection per core (up to 8). Identity experts on the CPU: the
# transfers alone, with no GPU work between them. The low-latency preset twice more, for its spread.
deepep_presets() {
    "$bin/switchyard" bench --run deepep --device cpu --preset-workers 2 --preset-calls 20 \
        --out "$report/deepep" 2>"$report/deepep.log" >/dev/null || return
    grep "^deepep" "$report/deepep.log"
    for run in 2 3; do
        "$bin/switchyard" bench --run deepep-low-latency --device cpu --preset-workers 2 --preset-calls 20 \
            --out "$report/deepep-low-latency-$run" 2>"$report/deepep-low-latency-$run.log" >/dev/null || return
        grep -m1 "^deepep-low-latency:" "$report/deepep-low-latency-$run.log"
    done
}

# One token per call on the 512x1024 model, distributed beside the in-process layer, the workers
# and the in-process layer on the CPU, then both on the GPU.
one_token() {
    for device in cpu cuda; do
        "$bin/switchyard" bench --run sweep --device $device --workers 2 --experts 8 --top-k 1 --dims 512x1024 \
            --tokens 1 --wire-dtypes f32,bf16 --out "$report/one-token-$device" 2>"$report/one-token-$device.log" >/dev/null || return
        echo "one token per call, $device:"
        grep -E "^\| 2 \| 8 " "$report/one-token-$device/report.md"
    done
}

torch_baseline() {
    "$python" scripts/torch_moe_baseline.py --dims 4096x14336 --experts 8 --top-k 2 --tokens 1,1024,4096 \
        --dtype bf16 --calls 20 --out "$report/torch-baseline.json"
}

# Mixtral-size experts on the GPU into $report/OUT (FLAGS: the workers and what else differs),
# whose report gives expert compute as a share of the bf16 matmul peak measured in the same run;
# the workers log each step's phases (upload, kernels, download) in OUT.log.
mixtral_sweep() {
    local out=$1
    shift
    RUST_LOG=warn,switchyard_expert_worker::step=debug "$bin/switchyard" bench --run sweep --device cuda "$@" \
        --experts 8 --top-k 2 --dims 4096x14336 --tokens 1,1024,4096 --wire-dtypes bf16 --dtype bf16 --calls 10 --warmup-calls 3 --point-time 20s \
        --capacity-factor 4 --out "$report/$out" 2>"$report/$out.log" >/dev/null || return
    grep -E "^\| [0-9]+ \| 8 " "$report/$out/report.md"
}

mixtral_bench() {
    mixtral_sweep bench --workers 1,2
}

# The same experts on 1 worker with each step's experts in one grouped product per matrix
# (`--grouped-experts`; the in-process layer too): set beside the 1-worker rows above.
mixtral_grouped() {
    mixtral_sweep bench-grouped --grouped-experts --workers 1
}

export bin report nvidia_smi python
# Each step runs in a shell of its own (run_step): the steps' shared helper goes with them.
export -f mixtral_sweep
run_step "worker offer" 40 worker_offer offer
run_step "device-check" 200 device_check device-check
run_step "DeepEP presets" 150 deepep_presets presets
run_step "one token per call" 90 one_token one-token
run_step "PyTorch baseline" 90 torch_baseline torch-baseline
run_step "Mixtral-size bench" 300 mixtral_bench mixtral
run_step "Mixtral-size bench, grouped experts" 200 mixtral_grouped mixtral-grouped

if ((${#failed[@]})); then
    printf 'gpu-check: failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "gpu-check: done; see $report/device-check.txt, $report/deepep/report.md, $report/one-token-*/report.md, $report/torch-baseline.json, $report/bench/report.md and $report/bench-grouped/report.md"
