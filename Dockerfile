# syntax=docker/dockerfile:1
#
# deft server image: `deft serve` on an NVIDIA CUDA runtime base.
#
#   docker build -t deft:latest .
#   docker run --gpus all -p 50051:50051 -p 9400:9400 -p 8000:8000 -v deft-data:/data deft:latest --model tiny-sdxl
#
# The default torch (PyPI's torch==2.13.0) is built for CUDA 13.0 and needs an NVIDIA driver >= 580.
# For an older driver, build against CUDA 12.8 instead:
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t deft:cu128 .
#
# Both stages start from the same image, so the virtual environment built in the first one finds the
# very same /usr/bin/python3 (3.12 on Ubuntu 24.04) in the second.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------- build
FROM ${CUDA_IMAGE} AS build

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG DEFT_EXTRAS=server,postgres,triton

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/deft/venv \
    PATH=/opt/deft/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/deft/venv \
    && pip install --no-cache-dir --upgrade pip

# torch first, in its own layer: it is the largest download and changes least often.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY deft_files ./deft_files
COPY deft_runtime ./deft_runtime
COPY server ./server
COPY clients/python/deft_client ./clients/python/deft_client
COPY cli ./cli
# A regular (not editable) install: the runtime stage gets the venv and nothing from /src.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "${TORCH_SPEC}" ".[${DEFT_EXTRAS}]" \
    && python -c "import torch, deft_runtime, deft_server.app, deft_server.healthcheck, deft_cli.app"

# -------------------------------------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE} AS runtime

# python3-dev and gcc: Triton compiles a small C launcher against Python.h the first time it runs a
# kernel on the GPU, at run time; without a C compiler every Triton kernel launch fails.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 deft \
    && useradd --system --uid 10001 --gid deft --home-dir /home/deft --create-home --shell /usr/sbin/nologin deft \
    && mkdir -p /data \
    && chown deft:deft /data

COPY --from=build /opt/deft/venv /opt/deft/venv

# Every `deft serve` flag has a DEFT_* variable (`deft serve --help`); override with `docker run -e`.
# Without authentication beyond loopback deft refuses to start unless DEFT_INSECURE_NO_AUTH is set: the
# image keeps today's open default for a private network; set DEFT_AUTH=keys (README "Multi-tenant
# deployment") or DEFT_TOKEN for anything reachable by others.
# Caches live on the data volume so a restart does not rebuild them.
ENV PATH=/opt/deft/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DEFT_HOST=0.0.0.0 \
    DEFT_INSECURE_NO_AUTH=true \
    DEFT_PORT=50051 \
    DEFT_METRICS_PORT=9400 \
    DEFT_HTTP_PORT=8000 \
    DEFT_DATA_DIR=/data \
    DEFT_CACHE_DIR=/data/cache/models \
    HF_HOME=/data/cache/huggingface \
    TRITON_CACHE_DIR=/data/cache/triton

USER deft:deft
WORKDIR /home/deft
VOLUME ["/data"]
EXPOSE 50051 9400 8000

# SIGTERM drains: new requests get UNAVAILABLE, in-flight ones get DEFT_GRACE_PERIOD seconds (30 by
# default), then the server exits 0. Give `docker stop` a longer timeout: `docker stop -t 60`.
STOPSIGNAL SIGTERM

# The gRPC health service is NOT_SERVING while the model loads (allowed for by --start-period) and
# while draining. A large model downloaded from the hub on first start can take longer: raise
# --start-period with `docker run --health-start-period`.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-m", "deft_server.healthcheck", "--timeout", "5"]

ENTRYPOINT ["deft", "serve"]
