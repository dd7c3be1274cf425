#!/usr/bin/env bash
# Stages what the runtime image holds, from this machine's release build: the four binaries without
# debug info in OUT/bin, and in OUT/lib the shared libraries they load that a Debian base lacks
# (ldd's closure, less glibc, libgcc and libstdc++: libtorch_cpu, libc10, torch's libgomp and the
# CUDA runtime libtorch_cpu names). The cuda variant adds every library of the wheel's nvidia
# packages, some of which CUDA opens at run time (dlopen), where ldd cannot see them.
#
# The binaries are those the last release build left in target/release: after scripts/test.sh,
# the tests' build (tokio's test-util and the test-support modules compiled in); run
# scripts/setup.sh (or a `cargo build --release --bins` of your own) first to ship the binaries alone.
#
# Usage: scripts/dist.sh [OUT (default target/dist)] [cpu|cuda (default cpu)]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SWITCHYARD_ROOT"
out="${1:-target/dist}"
variant="${2:-cpu}"
binaries=(switchyard switchyard-torch switchyard-coordinator switchyard-worker)

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
for binary in "${binaries[@]}"; do
  [ -x "target/release/$binary" ] || { echo "dist: target/release/$binary is missing (run scripts/setup.sh)" >&2; exit 1; }
  strip --strip-debug -o "$out/bin/$binary" "target/release/$binary"
done

# Every Debian base image has these.
provided='^(libc|libm|libdl|libpthread|librt|libutil|libresolv|libgcc_s|libstdc\+\+|ld-linux-x86-64)\.so'
loaded() {
  LD_LIBRARY_PATH="$SWITCHYARD_TORCH_LIB" ldd "$@" |
    awk '/=> not found/ { print "MISSING " $1; next } /=> \// { print $3 }'
}
objects=()
for binary in "${binaries[@]}"; do objects+=("target/release/$binary"); done
if [ "$variant" = "cuda" ]; then objects+=("$SWITCHYARD_TORCH_LIB/libtorch_cuda.so"); fi
mapfile -t libraries < <(for object in "${objects[@]}"; do loaded "$object"; done | sort -u)
for library in "${libraries[@]}"; do
  case "$library" in
    MISSING*) echo "dist: ${library#MISSING } is loaded but not found" >&2; exit 1 ;;
  esac
  [[ "$(basename "$library")" =~ $provided ]] || cp -L "$library" "$out/lib/"
done
if [ "$variant" = "cuda" ]; then
  cp -L "$SWITCHYARD_TORCH_LIB"/*.so* "$out/lib/"
  find "$SWITCHYARD_VENV"/lib/python3*/site-packages/nvidia -path '*/lib/*' -name '*.so*' -exec cp -L {} "$out/lib/" \;
fi
echo "dist: $(du -sh "$out/bin" | cut -f1) of binaries, $(du -sh "$out/lib" | cut -f1) of libraries in $out ($variant)" >&2
