#!/usr/bin/env bash
# Builds the CPU image with podman from this machine's release build, on a base image made from
# Debian packages (mmdebstrap; no registry needed), then runs a coordinator and two workers in
# containers and a load test from a fourth container, and writes the image's size and the load
# test's report to REPORT_DIR (default docs/bench/container). Containers share the host's network
# on 127.0.0.1 and are removed when the script ends, also on failure or Ctrl-C.
#
# Needs root (or rootless podman), podman and mmdebstrap (apt-get install podman mmdebstrap; runc
# too where the kernel mounts cgroups v1 and v2 side by side, which crun refuses).
# Usage: scripts/container-loadtest.sh [REPORT_DIR] [extra loadtest flags...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$SWITCHYARD_ROOT"
report="${1:-docs/bench/container}"
shift || true
image=localhost/switchyard:dev
base=localhost/switchyard-base:bookworm-extract

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
for tool in podman mmdebstrap python3; do
  command -v "$tool" >/dev/null || { echo "container-loadtest: $tool is needed (apt-get install $tool)" >&2; exit 1; }
done

"$SWITCHYARD_ROOT/scripts/setup.sh"
step "staging the binaries and the libraries they load (scripts/dist.sh)"
"$SWITCHYARD_ROOT/scripts/dist.sh" target/dist cpu

# crun refuses a cgroup v1 + v2 ("hybrid") host; runc runs there.
runtime=()
if [ -d /sys/fs/cgroup/unified ] && [ -d /sys/fs/cgroup/memory ] && command -v runc >/dev/null; then
  runtime=(--runtime runc)
fi
# Limits below this shell's (a container may not raise them; podman's defaults do). Processes are
# counted per user across the containers: 4096 threads leaves every process room.
limits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")
run=(podman "${runtime[@]}" run --network host "${limits[@]}")

if ! podman image exists "$base"; then
  step "making $base from Debian packages: glibc, libgcc, libstdc++, dash, coreutils (mmdebstrap)"
  mmdebstrap --variant=extract --include=base-files,libc6,libgcc-s1,libstdc++6,dash,coreutils \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm - | podman import --change 'CMD ["/bin/sh"]' - "$base" >/dev/null
fi
step "building $image (Dockerfile, prebuilt binaries, on $base)"
podman build "${runtime[@]}" "${limits[@]}" --quiet --build-arg BINARIES=prebuilt --build-arg "RUNTIME_IMAGE=$base" -t "$image" . >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$image")
base_size=$(podman image inspect --format '{{.Size}}' "$base")

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

containers=()
cleanup() { [ "${#containers[@]}" -eq 0 ] || podman "${runtime[@]}" rm -f "${containers[@]}" >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM

coordinator_port=$(free_port)
step "starting a coordinator and two workers in containers"
containers+=("$("${run[@]}" -d "$image" switchyard-coordinator --insecure \
  --listen "127.0.0.1:$coordinator_port" --metrics-listen "127.0.0.1:$(free_port)")")
for worker in 0 1; do
  containers+=("$("${run[@]}" -d "$image" switchyard-worker --insecure --name "worker-$worker" \
    --coordinator "http://127.0.0.1:$coordinator_port" --listen "127.0.0.1:$(free_port)" \
    --metrics-listen "127.0.0.1:$(free_port)")")
done

step "waiting for both workers to hold experts"
for _ in $(seq 60); do
  placed=$("${run[@]}" --rm "$image" switchyard status --coordinator "127.0.0.1:$coordinator_port" 2>/dev/null |
    grep -c '^w[0-9].* [1-9][0-9]* experts' || true)
  [ "$placed" -ge 2 ] && break
  sleep 1
done
[ "$placed" -ge 2 ] || { echo "container-loadtest: the workers did not both receive experts within 60 s" >&2; exit 1; }

step "load test from a fourth container"
mkdir -p "$report"
"${run[@]}" --rm "$image" switchyard loadtest --coordinator "127.0.0.1:$coordinator_port" \
  --duration 10s --tokens 64 --concurrency 4 "$@" | tee "$report/loadtest.txt"
"${run[@]}" --rm "$image" switchyard status --coordinator "127.0.0.1:$coordinator_port" >"$report/status.txt"
{
  echo "image $image: $((size / 1000000)) MB (base $base: $((base_size / 1000000)) MB)"
  echo "binaries: $(du -sh target/dist/bin | cut -f1); libraries: $(du -sh target/dist/lib | cut -f1) ($(ls target/dist/lib | tr '\n' ' '))"
} | tee "$report/image.txt"
