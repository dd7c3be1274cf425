# Switchyard images: the coordinator, the expert worker and the `switchyard` CLI in one image.
#
#   docker build -t ghcr.io/switchyard/switchyard:0.1.0 .                                # CPU
#   docker build -t ghcr.io/switchyard/switchyard:0.1.0-cuda --build-arg VARIANT=cuda .  # gpu.enabled
#
# These are the chart's default image and its GPU variant (charts/switchyard/values.yaml: image).
# scripts/container-loadtest.sh builds the same runtime stage with podman from this machine's build
# (--build-arg BINARIES=prebuilt) on a base made from Debian packages, and load-tests it.
#
# The build stage runs the same set-up as the README (scripts/setup.sh: protoc, torch 2.11.0 from
# PyPI into a venv, release build); scripts/dist.sh then stages the binaries without debug info and
# only the shared libraries they load (ldd's closure: libtorch_cpu, libc10, torch's libgomp, ...),
# not the wheel's 3.8 GB of CUDA libraries the CPU binaries never open. The runtime stage holds
# those and nothing else; no shell form needs bash, so podman (OCI format) and Docker build it alike.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# Where the binaries come from: build (compiled in the build stage) or prebuilt (target/dist, as
# scripts/dist.sh stages a build made outside).
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
# cpu or cuda. cuda links libtorch_cuda past --as-needed, so CUDA is really used when present.
ARG VARIANT=cpu
# An extra pip index for torch, e.g. a CPU-only wheel index (default: PyPI's wheel, which carries
# CUDA libraries and also runs on CPU; only those the binaries load reach the image).
ARG TORCH_INDEX_URL=""
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      protobuf-compiler python3 python3-venv python3-pip binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && if [ "$VARIANT" = "cuda" ]; then export SWITCHYARD_LINK_CUDA=1; fi \
 && scripts/setup.sh \
 && scripts/dist.sh /out "$VARIANT"

FROM scratch AS prebuilt
COPY target/dist/ /out/

# hadolint ignore=DL3006
FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE}
ARG VARIANT=cpu
COPY --from=binaries /out/bin/ /usr/local/bin/
COPY --from=binaries /out/lib/ /usr/local/lib/switchyard/
ENV LD_LIBRARY_PATH=/usr/local/lib/switchyard
# Fails the build if a shared library is missing.
RUN switchyard-worker --insecure --check-config >/dev/null && switchyard-torch --version && switchyard --version
USER 65532:65532
EXPOSE 50051 50061 9090 9091
# The chart (and `docker run`) name the binary: switchyard-coordinator, switchyard-worker or switchyard.
CMD ["switchyard", "--help"]
LABEL org.opencontainers.image.title="switchyard" \
      org.opencontainers.image.description="Distributed expert-parallel runtime for Mixture-of-Experts layers" \
      io.switchyard.variant="${VARIANT}"
