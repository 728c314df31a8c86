# syntax=docker/dockerfile:1
# The crossmodal images: `serve` (the default, last stage) answers HTTP; `train` runs the training CLI.
#
#   docker build -t crossmodal:cuda .                                   # CUDA serving image
#   docker build -t crossmodal:cpu --build-arg VARIANT=cpu .            # CPU-only serving image
#   docker build -t crossmodal-train:cuda --target train .              # training image (adds the `train` extra)
#
# Base image. The torch 2.14.1 wheel on PyPI is the CUDA 13.0 build and carries its own CUDA libraries
# (cuBLAS, cuDNN, NCCL … as nvidia-* wheels). So the CUDA variant starts from NVIDIA's CUDA 13.0 *base*
# image: it holds the CUDA runtime and the container contract (NVIDIA_VISIBLE_DEVICES,
# NVIDIA_DRIVER_CAPABILITIES, and NVIDIA_REQUIRE_CUDA, which refuses to start on a driver too old for
# CUDA 13.0 with a clear message) without the ~2 GB of cuBLAS/cuDNN that the `-runtime` flavour would add
# a second time next to the wheel's copy. The CPU variant is the same Ubuntu release with torch from the
# PyTorch CPU index (the build needs internet access, as any image build that installs wheels does).
# Host requirement for the CUDA variant: an NVIDIA driver for CUDA 13.0 (>= 580) and the NVIDIA
# Container Toolkit.
ARG VARIANT=cuda
# Keep these equal to the pins in pyproject.toml (tests/deploy checks it).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Empty: PyPI for `cuda` (its default Linux wheel is the CUDA build), the PyTorch CPU index for `cpu`.
ARG TORCH_INDEX_URL=""

FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS os-cuda
FROM ubuntu:24.04 AS os-cpu

# ---- the interpreter both final images share (Ubuntu 24.04's Python 3.12, no compilers) -------------------
# `os-${VARIANT}` names one of the two stages above, both pinned; it is not a registry image.
# hadolint ignore=DL3006
FROM os-${VARIANT} AS python
ARG DEBIAN_FRONTEND=noninteractive
# Package versions come with the pinned Ubuntu release; pinning each apt version breaks whenever Ubuntu
# ships a security update, so DL3008 is waived here on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# ---- builder: a virtual environment with torch and the serving install of the project --------------------
FROM python AS builder
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ARG VARIANT
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, in its own layer: it is most of the image and changes only with its version.
RUN case "${VARIANT}" in \
        cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
        cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
        *) echo "VARIANT must be cuda or cpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && echo "${index}" > /opt/venv/torch-index-url \
    && pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY models ./models
COPY training ./training
# The serving install: `.` without extras, so nothing training-only (torchvision, matplotlib, scikit-learn …).
RUN pip install --no-cache-dir .

# ---- train-builder: the same environment plus the `train` extra ------------------------------------------
FROM builder AS train-builder
ARG TORCHVISION_VERSION
# torchvision must come from torch's own index so that its compiled ops match the torch build. The extra's
# other versions are the ones pyproject.toml states, hence DL3013 is waived.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "$(cat /opt/venv/torch-index-url)" "torchvision==${TORCHVISION_VERSION}" \
    && pip install --no-cache-dir ".[train]"

# ---- what both final images share: the non-root user and the bundled checkpoints ------------------------
FROM python AS app-base
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app
WORKDIR /srv/crossmodal
# Owned by `app`, so that a Docker volume mounted here starts as a writable copy of the bundled checkpoints.
COPY --chown=app:app checkpoints ./checkpoints
COPY --chmod=0755 deploy/docker/serve.sh /usr/local/bin/crossmodal-serve
ENV MODEL_DIR=/srv/crossmodal/checkpoints

# ---- train: `docker run … crossmodal-train:cuda pretrain-image --data /data --output …` -------------------
FROM app-base AS train
COPY --from=train-builder /opt/venv /opt/venv
USER 10001:10001
ENTRYPOINT ["python3", "-m", "training"]
CMD ["--help"]

# ---- serve (default): one uvicorn process, one inference worker on the container's device ----------------
FROM app-base AS serve
COPY --from=builder /opt/venv /opt/venv
# HOST/PORT: where uvicorn listens. DEVICE=auto takes the GPU when the container has one. One container per
# GPU: a single process whose worker owns that device; scale out with more containers, not more workers.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    DEVICE=auto \
    DRAIN_TIMEOUT=30
USER 10001:10001
EXPOSE 8000
# Healthy once /readyz answers 200: models loaded and warmed up, not draining (urllib raises on 503).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/readyz', timeout=4)"]
STOPSIGNAL SIGTERM
# Exec form, and the script `exec`s uvicorn: uvicorn is PID 1 and receives SIGTERM itself.
CMD ["crossmodal-serve"]
