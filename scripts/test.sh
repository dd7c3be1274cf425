#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): set-up, format, lint and API-doc checks,
# then unit, in-process and integration tests (which start real processes on 127.0.0.1; promtool
# checks every process's /metrics), the fuzz targets for a bounded time (scripts/fuzz.sh), then the
# Helm chart's tests (real Helm 3 and Helm 4 engines, strict Kubernetes schemas, the binaries' flags).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The tests build with the binaries (see setup.sh): `cargo test` below then compiles nothing.
"$SWITCHYARD_ROOT/scripts/setup.sh" --with-tests
# Again: on a fresh clone the venv (and so the torch library path) exists only now.
source "$SWITCHYARD_ROOT/scripts/env.sh"
cd "$SWITCHYARD_ROOT"
echo "==> cargo fmt --check" >&2
cargo fmt --all --check
echo "==> cargo clippy -D warnings" >&2
cargo clippy --release --workspace --all-targets --quiet -- -D warnings
echo "==> cargo doc -D warnings (broken intra-doc links, links to private items)" >&2
# With the examples, whose dev-dependencies turn on the features the tests do, the dependencies'
# features are clippy's above, so rustdoc reads the metadata clippy checked them into rather than
# checking many of them again (39 s against 16 s in a fresh clone, 2026-12-06).
RUSTDOCFLAGS="-D warnings" cargo doc --release --no-deps --workspace --examples --quiet
# The validators (Helm, schemas, promtool) before the tests: the metrics test runs promtool.
"$SWITCHYARD_ROOT/scripts/setup-chart-tools.sh"
echo "==> cargo test" >&2
# Release profile: shares the build the set-up made, and the integration tests run its binaries.
cargo test --release --workspace
echo "==> fuzz targets (libFuzzer, bounded time each)" >&2
"$SWITCHYARD_ROOT/scripts/fuzz.sh"
echo "==> Helm chart: lint, render, strict schema validation, chart tests" >&2
"$SWITCHYARD_VENV/bin/python" -m unittest discover --start-directory charts/tests --verbose
