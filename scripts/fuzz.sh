#!/usr/bin/env bash
# Runs every libFuzzer target under fuzz/ for a bounded time (SWITCHYARD_FUZZ_SECONDS each, default
# 20), coverage-guided from the committed seeds (fuzz/corpus/<target>) plus what earlier runs here
# found (target/fuzz-corpus/<target>, kept between runs). A crash, a panic, a timeout or an
# allocation past 2 GiB fails the run, with the input saved under fuzz/artifacts/<target>/ and the
# command that replays it. cargo-fuzz's `--sanitizer none` builds on the stable toolchain.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
seconds="${SWITCHYARD_FUZZ_SECONDS:-20}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
cd "$SWITCHYARD_ROOT/fuzz"
cargo fuzz build --sanitizer none
# The targets write the files under test into a scratch folder of the temporary one: this run's own.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch"
for source in fuzz_targets/*.rs; do
    target="$(basename "$source" .rs)"
    found="$SWITCHYARD_ROOT/target/fuzz-corpus/$target"
    mkdir -p "$found"
    log="$scratch/$target.log"
    if ! cargo fuzz run --sanitizer none "$target" "$found" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        grep -v '^#' "$log" >&2
        echo "fuzz target $target failed: the input is under fuzz/artifacts/$target/" >&2
        exit 1
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    per_second="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
    coverage="$(grep -o 'cov: [0-9]*' "$log" | tail -1)"
    echo "fuzz $target: $runs inputs in ${seconds} s ($per_second/s), $coverage, no crash"
done
