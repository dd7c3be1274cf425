# Switchyard images: the coordinator, the expert worker and the `switchyard` CLI in one image.
#
#   docker build -t ghcr.io/switchyard/switchyard:0.1.0 .                                # CPU
#   docker build -t ghcr.io/switchyard/switchyard:0.1.0-cuda --build-arg VARIANT=cuda .  # gpu.enabled
#
# These are the chart's default image and its GPU variant (charts/switchyard/values.yaml: image).
#
# The build stage runs the same set-up as the README (scripts/setup.sh: protoc, torch 2.11.0 from
# PyPI into a venv, release build). The runtime stage holds the binaries and libtorch's shared
# libraries from that same torch wheel, at the path the binaries' rpath names.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# cpu or cuda. cuda links libtorch_cuda past --as-needed, so CUDA is really used when present.
ARG VARIANT=cpu
# An extra pip index for torch, e.g. a CPU-only wheel index for a smaller CPU image (default: PyPI's
# wheel, which carries CUDA libraries and also runs on CPU).
ARG TORCH_INDEX_URL=""
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      protobuf-compiler python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && if [ "$VARIANT" = "cuda" ]; then export SWITCHYARD_LINK_CUDA=1; fi \
 && scripts/setup.sh \
 && mkdir -p /out/bin \
 && cp target/release/switchyard target/release/switchyard-torch target/release/switchyard-coordinator target/release/switchyard-worker /out/bin/ \
 && SITE="$(ls -d /src/.venv/lib/python3*/site-packages)" \
 && mkdir -p "/out$SITE/torch" && cp -a "$SITE/torch/lib" "/out$SITE/torch/" \
 # PyPI's torch wheel needs its CUDA libraries even on CPU (libtorch.so names libtorch_cuda.so); the
 # wheel finds them by $ORIGIN-relative paths, so they keep their place beside torch/.
 && if [ -d "$SITE/nvidia" ]; then \
      find "$SITE/nvidia" -type d -name lib | while read -r lib; do mkdir -p "/out$lib" && cp -a "$lib/." "/out$lib/"; done; \
    fi
FROM ${RUNTIME_IMAGE}
ARG VARIANT=cpu
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 switchyard \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin switchyard
# libtorch (and CUDA's libraries) at the very paths the binaries' rpath and the wheel's $ORIGIN name.
COPY --from=build /out/src /src
COPY --from=build /out/bin/ /usr/local/bin/
# Fails the build if a shared library is missing.
RUN switchyard-worker --check-config >/dev/null && switchyard-torch --version
USER 65532:65532
EXPOSE 50051 50061 9090 9091
# The chart (and `docker run`) name the binary: switchyard-coordinator, switchyard-worker or switchyard.
CMD ["switchyard", "--help"]
LABEL org.opencontainers.image.title="switchyard" \
      org.opencontainers.image.description="Distributed expert-parallel runtime for Mixture-of-Experts layers" \
      io.switchyard.variant="${VARIANT}"
