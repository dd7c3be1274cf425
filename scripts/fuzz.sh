#!/usr/bin/env bash
# Runs every libFuzzer target under fuzz/ for a bounded time (SWITCHYARD_FUZZ_SECONDS each, default
# 20), as many at once as the machine has cores (SWITCHYARD_FUZZ_JOBS; each fuzzer runs on one),
# coverage-guided from the committed seeds (fuzz/corpus/<target>) plus what earlier runs here
# found (target/fuzz-corpus/<target>, kept between runs). A crash, a panic, a timeout or an
# allocation past 2 GiB fails the run, with the input saved under fuzz/artifacts/<target>/ and the
# command that replays it. cargo-fuzz's `--sanitizer none` builds on the stable toolchain; `--dev` is
# fuzz/Cargo.toml's dev profile (libFuzzer and the decoders at -O1, the rest at -O0; overflow checks
# on).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
seconds="${SWITCHYARD_FUZZ_SECONDS:-20}"
jobs="${SWITCHYARD_FUZZ_JOBS:-$(nproc)}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
cd "$SWITCHYARD_ROOT/fuzz"
cargo fuzz build --dev --sanitizer none
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# One target's run, its output in $scratch/<target>.log and a <target>.passed mark if it passed.
# The targets write the files under test into a temporary folder: each its own, in this run's.
fuzz_target() {
    local target="$1" found="$SWITCHYARD_ROOT/target/fuzz-corpus/$1"
    mkdir -p "$found" "$scratch/$target.tmp"
    TMPDIR="$scratch/$target.tmp" cargo fuzz run --dev --sanitizer none "$target" "$found" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        >"$scratch/$target.log" 2>&1 && touch "$scratch/$target.passed"
}
export -f fuzz_target
export seconds scratch SWITCHYARD_ROOT

targets=()
for source in fuzz_targets/*.rs; do targets+=("$(basename "$source" .rs)"); done
echo "fuzzing ${#targets[@]} targets for ${seconds} s each, ${jobs} at a time" >&2
# A failed target is reported below, after every target has run.
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'fuzz_target "$1" || true' _ {}

failed=0
for target in "${targets[@]}"; do
    log="$scratch/$target.log"
    if [ ! -e "$scratch/$target.passed" ]; then
        grep -v '^#' "$log" >&2
        echo "fuzz target $target failed: the input is under fuzz/artifacts/$target/" >&2
        failed=1
        continue
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    per_second="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
    coverage="$(grep -o 'cov: [0-9]*' "$log" | tail -1)"
    echo "fuzz $target: $runs inputs in ${seconds} s ($per_second/s), $coverage, no crash"
done
exit "$failed"
