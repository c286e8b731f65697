#!/usr/bin/env bash
# One session on the GPU host (see ../shared/GPU.md), JSON lines on stdout, about 5 minutes:
#   1. the Triton kernels' correctness on the device against the naive attention (every dtype,
#      head dims 64/128, GQA, tree and causal masks, ragged lengths, forced split-KV, prefill),
#   2. the benchmark: ours vs SDPA with a mask vs naive, Llama-2-7B and SmolLM2 shapes,
#      context 512/2k/8k, T 1/16/64, batch 1/8/32, bfloat16,
#   3. a sweep of launch configurations and split counts at the shapes that matter most.
# Each part has its own time limit, so one hang cannot eat the session. A part that fails (a
# FAIL in the check, an error, a timeout) does not stop the next; the script then exits 1.
#
#   benchmarks/gpu_check.sh                      # on the GPU host
#   benchmarks/gpu_check.sh --device cpu --tiny  # the dry run here first (PYTHON=.venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARGS=("$@")
status=0

"$PY" -c 'import json, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps({"part": "env", "torch": torch.__version__, "triton": triton_version, "gpu": gpu}))' \
    || status=1

run() {  # run LIMIT_S PART ARGS...: one part, its failure reported as a JSON line
    local limit=$1 part=$2
    shift 2
    timeout "$limit" "$PY" -m benchmarks.attention --json "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "{\"part\": \"$part\", \"error\": \"exit status $rc (1: a FAIL or an exception; 124: over ${limit}s)\"}"
        status=1
    fi
}

run 200 check --check "${ARGS[@]}"
run 200 bench "${ARGS[@]}"
if [[ " ${ARGS[*]} " != *" cpu "* ]]; then  # the sweep times Triton launches: CUDA only
    run 150 sweep --sweep "${ARGS[@]}"
fi
exit $status
