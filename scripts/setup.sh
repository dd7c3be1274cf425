#!/usr/bin/env bash
# Installs what Switchyard needs on a fresh Debian machine and builds it. Idempotent: each step is
# skipped when its result is already there, so running it again costs seconds.
#
# Usage: scripts/setup.sh [--with-tests]
#   --with-tests  also build the tests and examples, in the same build as the binaries
#                 (scripts/test.sh). The tests' dev-dependencies turn on features the binaries
#                 alone leave off (tokio's test-util, ...), and cargo compiles every crate above
#                 such a dependency once per feature set: built apart, the binaries and then the
#                 tests would compile the whole tree twice.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SWITCHYARD_ROOT"

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

targets=(--bins)
case "${1:-}" in
  "") ;;
  --with-tests) targets=(--bins --tests --examples) ;;
  *) echo "usage: scripts/setup.sh [--with-tests]" >&2; exit 2 ;;
esac

if ! command -v protoc >/dev/null 2>&1; then
  step "installing protobuf-compiler (protoc)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq protobuf-compiler >/dev/null
fi

torch_ok() {
  [ -x "$SWITCHYARD_VENV/bin/python" ] &&
    "$SWITCHYARD_VENV/bin/python" -c "import torch,sys; sys.exit(torch.__version__.split('+')[0] != '$SWITCHYARD_TORCH_VERSION')" 2>/dev/null
}
if torch_ok; then
  step "torch $SWITCHYARD_TORCH_VERSION already in $SWITCHYARD_VENV"
else
  step "installing torch==$SWITCHYARD_TORCH_VERSION into $SWITCHYARD_VENV (first time only: a few GB)"
  python3 -m venv "$SWITCHYARD_VENV"
  # uv rather than pip for the GBs of torch and its CUDA wheels: it downloads them in parallel and
  # unpacks them without compiling every module to bytecode first (on a 2-core machine the step
  # took 27-33 s, uv's own install included, against pip's 100 s). Its lines are the download's
  # progress.
  "$SWITCHYARD_VENV/bin/pip" install --disable-pip-version-check --quiet "uv==$SWITCHYARD_UV_VERSION"
  # uv reads its own variables: a mirror or wheel folder set up for pip applies to it too.
  [ -z "${PIP_INDEX_URL:-}" ] || export UV_DEFAULT_INDEX="${UV_DEFAULT_INDEX:-$PIP_INDEX_URL}"
  [ -z "${PIP_FIND_LINKS:-}" ] || export UV_FIND_LINKS="${UV_FIND_LINKS:-$PIP_FIND_LINKS}"
  "$SWITCHYARD_VENV/bin/uv" pip install --python "$SWITCHYARD_VENV/bin/python" --system-certs --no-cache \
    "torch==$SWITCHYARD_TORCH_VERSION" numpy
  torch_ok || { echo "torch $SWITCHYARD_TORCH_VERSION did not import from $SWITCHYARD_VENV" >&2; exit 1; }
fi
source "$SWITCHYARD_ROOT/scripts/env.sh"

step "building (cargo build --release --workspace ${targets[*]}; the first build takes minutes: each crate is listed as it compiles)"
cargo build --release --workspace "${targets[@]}"
