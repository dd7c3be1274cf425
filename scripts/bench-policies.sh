#!/usr/bin/env bash
# One load test per routing policy on the same synthetic model (the default: d_model 1024, d_ff 4096,
# 8 experts, top-2, capacity factor 1.25), 2 workers, 64 tokens per call, 4 callers. Writes the
# reports to docs/bench/routing-policies.txt. Extra arguments go to every `switchyard local` call.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$SWITCHYARD_ROOT/scripts/setup.sh"
source "$SWITCHYARD_ROOT/scripts/env.sh"
out="$SWITCHYARD_ROOT/docs/bench/routing-policies.txt"
mkdir -p "$(dirname "$out")"
policies=(
  "--policy top-k"
  "--policy top-k-softmax"
  "--policy top-k --route-top-k 1"
  "--policy noisy-top-k --noise-seed 7"
  "--policy dense"
  "--policy top-k --overflow reroute"
  "--policy top-k --overflow batch-prioritized"
  "--policy expert-choice"
  "--policy group-limited --expert-groups 4 --top-groups 2"
  "--policy soft-moe --slots 1"
)
{
  echo "# scripts/bench-policies.sh, $(date -u +%F), $(nproc) cores, no GPU"
  for policy in "${policies[@]}"; do
    echo
    echo "\$ switchyard local --workers 2 --loadtest --tokens 64 --concurrency 4 --duration 5s --warmup 1s $policy $*"
    # shellcheck disable=SC2086
    "$SWITCHYARD_ROOT/target/release/switchyard" local --workers 2 --loadtest --tokens 64 --concurrency 4 \
      --duration 5s --warmup 1s $policy "$@" 2>/dev/null
  done
} | tee "$out"
