# medusa-serve on a GPU host (NVIDIA driver and container toolkit installed):
#   docker build -t medusa-serve .
#   docker run --gpus all -p 8000:8000 -v medusa-cache:/cache --stop-timeout 75 medusa-serve
# On a host without a GPU, the same file with a plain base image and torch's CPU wheels:
#   docker build -t medusa-serve:cpu --build-arg BASE_IMAGE=ubuntu:24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu --build-arg DEVICE=cpu .
# Configured by environment variables only, one per setting (`medusa-serve --help` names them; TGI's
# where TGI has the option): -e MODEL_ID=/models/my-model -e MAX_BATCH_SIZE=32 ...
# `docker stop` waits 10 s by default: --stop-timeout (compose: stop_grace_period) must exceed the drain
# timeout (MEDUSA_DRAIN_TIMEOUT, 60 s by default), or the requests still running are cut.
# tests/deploy/test_dockerfile.py checks these instructions; no Docker engine builds the image in CI.

# the CUDA runtime image sets what the NVIDIA container toolkit reads (NVIDIA_VISIBLE_DEVICES, the driver
# it requires); torch brings its own CUDA libraries. Keep its CUDA version in step with TORCH_INDEX's.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# where pip looks for torch besides PyPI: the CUDA 12.8 build (a CPU image: the CPU build)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG DEVICE=cuda

# gcc and the Python headers: Triton compiles its kernel launchers with the host's C compiler at run time;
# g++: on a CPU, our kernels (runtime/*.cpp, attention/cpu_attention.cpp) and torch.compile's kernels are C++
# built there.
# make: the install below is the Makefile's, as in CI. tini: as PID 1 it hands SIGTERM to the server even
# while the model loads (a PID 1 without a handler ignores it) and reaps compiler processes. curl: the
# health check.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc g++ libc6-dev make tini curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# a fixed uid, so that Kubernetes' runAsNonRoot can check it (ubuntu images already hold uid 1000)
RUN groupadd --gid 10001 medusa && useradd --uid 10001 --gid medusa --create-home medusa \
    && mkdir -p /app /cache && chown medusa:medusa /app /cache
WORKDIR /app
COPY --chown=medusa:medusa . .
USER 10001:10001

# One volume for every cache, so that a restart skips the work done before: the embedded model's
# conversion (converted below, copied into a new named volume at its first mount), hub downloads, Triton's
# kernels, torch.compile's graphs and our CPU kernel's build.
ENV MEDUSA_CACHE_DIR=/cache/medusa \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# the same make target as `make test` runs before the tests: .venv, the project with its test extra, the
# embedded model prepared
RUN PIP_NO_CACHE_DIR=1 PIP_EXTRA_INDEX_URL="$TORCH_INDEX" make model
VOLUME ["/cache"]

ENV HOST=0.0.0.0 \
    PORT=8000 \
    MEDUSA_DEVICE=${DEVICE}
EXPOSE 8000

# the first start may load a large model and compile every graph: minutes before /health answers
HEALTHCHECK --interval=10s --timeout=5s --start-period=10m --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "medusa-serve"]
