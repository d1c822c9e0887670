# syntax=docker/dockerfile:1
#
# The dig-cluster services: one image whose entrypoint is `digctl`; the command
# picks the role (`api`, `coordinator`, `worker`, `upload-model`, ...).
#
# libtorch is PyTorch's wheel (torch==2.13.0, what tch 0.26 expects), installed
# into a venv in the builder exactly as `make setup` does. The binary finds
# libtorch through an rpath baked in at link time (model/torch_rpath.rs) that
# points into that venv, so the runtime stage copies the wheel's libraries to
# the same path (and sets LD_LIBRARY_PATH as well).
#
# Two builds of the same file:
#
#   CPU (api, coordinator, CPU workers; the default, ~1 GB):
#     docker build -t dig-cluster:cpu .
#
#   CUDA (GPU workers; torch's CUDA 13.0 wheel bundles the CUDA runtime, cuDNN,
#   NCCL... under site-packages/nvidia, which is copied along; the host needs an
#   NVIDIA driver for CUDA 13 (>= 580) and the NVIDIA container toolkit):
#     docker build -t dig-cluster:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
#       --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04 .
#   and run the worker with DIG_WORKER_DEVICE=cuda (`docker run --gpus all`, or
#   the device reservation in docker-compose.yml, or nvidia.com/gpu in the Helm
#   chart). PyPI's own torch==2.13.0 wheel is the CUDA 13.0 build too
#   (TORCH_INDEX_URL=https://pypi.org/simple gives the same libraries).
#
# The Helm chart expects REGISTRY/dig-cluster:VERSION (CPU) and
# REGISTRY/dig-cluster:VERSION-cuda (workers); docker-compose.yml builds
# dig-cluster:cpu itself (WORKER_IMAGE=dig-cluster:cuda for GPU workers).
#
# The runtime base must have a glibc at least as new as the builder's
# (Debian 12: 2.36); Ubuntu 24.04 (2.39) and Debian 12 both qualify.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- builder
FROM ${RUST_IMAGE} AS builder

# CPU wheels by default; https://download.pytorch.org/whl/cu130 for CUDA.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip cmake \
 && rm -rf /var/lib/apt/lists/*

# The venv lives at a fixed path: the binary's rpath points here, and the
# runtime stage puts the libraries at the same place. Debian 12's Python is
# 3.11, the version in .cargo/config.toml's LIBTORCH path.
ENV VENV=/opt/dig/venv
ENV TORCH_DIR=${VENV}/lib/python3.11/site-packages/torch
RUN python3 -m venv "$VENV" \
 && "$VENV/bin/pip" install --no-cache-dir --disable-pip-version-check \
      --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
 && test -f "$TORCH_DIR/lib/libtorch_cpu.so"

# An explicit LIBTORCH overrides the relative one of .cargo/config.toml
# (cargo's [env] never overrides the environment). torch_rpath.rs bakes
# "$TORCH_DIR/lib" in as the rpath and, for a CUDA wheel, keeps
# libtorch_cuda.so linked.
ENV LIBTORCH=${TORCH_DIR} \
    LIBTORCH_CXX11_ABI=1 \
    PATH=${VENV}/bin:${PATH}

WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p digctl \
 && install -D -m 0755 target/release/digctl /out/usr/local/bin/digctl

# Only libtorch's shared libraries travel on, at the same absolute path
# (libtorch_cuda.so finds the CUDA libraries through its own rpath,
# $ORIGIN/../../nvidia/*/lib, so that tree keeps its place next to torch/).
RUN SITE="$(dirname "$TORCH_DIR")" \
 && mkdir -p "/out$TORCH_DIR" \
 && cp -a "$TORCH_DIR/lib" "/out$TORCH_DIR/" \
 && rm -f "/out$TORCH_DIR/lib/libtorch_python.so" \
 && if [ -d "$SITE/nvidia" ]; then cp -a "$SITE/nvidia" "/out$SITE/"; fi

# ---------------------------------------------------------------- runtime
FROM ${RUNTIME_IMAGE} AS runtime

ARG TORCH_DIR=/opt/dig/venv/lib/python3.11/site-packages/torch

# curl: the healthchecks of docker-compose.yml; ca-certificates: S3 and
# webhooks over HTTPS; libgomp1: OpenMP for libtorch_cpu (the CPU wheel may
# not bundle it).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates curl libgomp1 libstdc++6 \
 && rm -rf /var/lib/apt/lists/*

COPY --from=builder /out/ /

# The rpath already points at $TORCH_DIR/lib; LD_LIBRARY_PATH is a second way
# for tools (ldd) and for a binary built with another venv path.
# No DIG_* settings here: they would override a mounted config file.
ENV LD_LIBRARY_PATH=${TORCH_DIR}/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Non-root; /var/lib/dig is the working directory, so the relative defaults
# (worker.cache_dir = dig-cache) land in a writable place. Mount volumes at
# /var/lib/dig/cache (worker) and /var/lib/dig/spool (api uploads).
RUN groupadd --system --gid 10001 dig \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/dig --create-home dig \
 && mkdir -p /var/lib/dig/cache /var/lib/dig/spool /etc/dig \
 && chown -R dig:dig /var/lib/dig \
 && digctl --help >/dev/null

USER 10001:10001
WORKDIR /var/lib/dig

# api: 8080 (API and its /metrics); coordinator and worker: 9100 (/metrics,
# setting metrics.listen).
EXPOSE 8080 9100
ENTRYPOINT ["digctl"]
CMD ["--help"]
