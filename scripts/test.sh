#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): set-up, format, lint and API-doc checks,
# then unit, in-process and integration tests (which start real processes on 127.0.0.1; promtool
# checks every process's /metrics), the fuzz targets for a bounded time (scripts/fuzz.sh; built
# meanwhile in the background), then the Helm chart's tests (real Helm 3 and Helm 4 engines, strict
# Kubernetes schemas, the binaries' flags).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The tests build with the binaries (see setup.sh): `cargo test` below then compiles nothing.
"$SWITCHYARD_ROOT/scripts/setup.sh" --with-tests
# Again: on a fresh clone the venv (and so the torch library path) exists only now.
source "$SWITCHYARD_ROOT/scripts/env.sh"
cd "$SWITCHYARD_ROOT"

# The fuzz targets build in the background at the scheduler's idle priority (SCHED_IDLE: only on a
# core nothing else wants, given up at once to any other thread): the checks and tests below leave
# a core idle much of the time (the tests kept 1.15 of 2 cores busy on average), and the targets'
# build (3-4 minutes of CPU) fills those gaps instead of running after them.
idle=(chrt --idle 0)
"${idle[@]}" true 2>/dev/null || idle=(nice -n 19)
fuzz_build_log="$(mktemp)"
# A session of its own, so that its cargo and compilers can be stopped together.
setsid "${idle[@]}" "$SWITCHYARD_ROOT/scripts/fuzz.sh" --build-only >"$fuzz_build_log" 2>&1 &
fuzz_build=$!
# On any exit, also an early failure or an interrupt: no build left running, no log left behind.
trap 'kill -- "-$fuzz_build" 2>/dev/null || true; rm -f "$fuzz_build_log"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "==> cargo fmt --check" >&2
cargo fmt --all --check
echo "==> cargo clippy -D warnings" >&2
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
echo "==> cargo doc -D warnings (broken intra-doc links, links to private items)" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --workspace --quiet
# The validators (Helm, schemas, promtool) before the tests: the metrics test runs promtool.
"$SWITCHYARD_ROOT/scripts/setup-chart-tools.sh"
echo "==> cargo test" >&2
# Release profile: shares the build the set-up made, and the integration tests run its binaries.
cargo test --release --workspace
echo "==> fuzz targets (libFuzzer, bounded time each)" >&2
if ! wait "$fuzz_build"; then
  cat "$fuzz_build_log" >&2
  echo "building the fuzz targets failed (scripts/fuzz.sh --build-only)" >&2
  exit 1
fi
"$SWITCHYARD_ROOT/scripts/fuzz.sh"
echo "==> Helm chart: lint, render, strict schema validation, chart tests" >&2
"$SWITCHYARD_VENV/bin/python" -m unittest discover --start-directory charts/tests --verbose
