# Sourced by the other scripts: where the project's torch lives and how cargo finds it.
# Safe to source more than once.
SWITCHYARD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SWITCHYARD_ROOT
export SWITCHYARD_VENV="${SWITCHYARD_VENV:-$SWITCHYARD_ROOT/.venv}"
export SWITCHYARD_TORCH_VERSION="2.11.0"
export SWITCHYARD_UV_VERSION="0.13.9"

# torch-sys (tch 0.24) reads torch's headers and libraries from the Python install (LIBTORCH_USE_PYTORCH=1);
# it runs `python` from PATH when VIRTUAL_ENV is set, so the venv goes first.
export VIRTUAL_ENV="$SWITCHYARD_VENV"
export PATH="$SWITCHYARD_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1

# Our build scripts read this to set an rpath, so binaries run without LD_LIBRARY_PATH
# (cargo passes torch-sys's own library path only to torch-sys's direct dependents).
if [ -d "$SWITCHYARD_VENV" ]; then
  SWITCHYARD_TORCH_LIB="$(ls -d "$SWITCHYARD_VENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n 1)"
  export SWITCHYARD_TORCH_LIB
fi
