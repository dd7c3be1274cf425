#!/usr/bin/env bash
# The main job: set everything up (first time: protoc, a venv with torch 2.11.0, a release build),
# start a local cluster (a coordinator and 2 expert workers on 127.0.0.1), run a load test on the
# default synthetic model, print its report beside the in-process reference layer's, and stop.
# Extra arguments go to `switchyard local`, e.g. `scripts/run.sh --tokens 512 --duration 20s`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$SWITCHYARD_ROOT/scripts/setup.sh"
# Again: on a fresh clone the venv (and so the torch library path) exists only now.
source "$SWITCHYARD_ROOT/scripts/env.sh"
exec "$SWITCHYARD_ROOT/target/release/switchyard" local --workers 2 --loadtest --compare-reference \
  --duration 10s --warmup 2s --concurrency 4 --tokens 64 "$@"
