#!/usr/bin/env bash
# What a GPU session brings to the host (../shared/GPU.md): the host reaches no package registry and
# no ../shared, keeps nothing after the session, and takes at most 64 MiB a call, the working tree
# (~22 MB) included. So the real SmolLM2 GGUF (98 MB) travels in three parts, one call each.
#
#   bash benchmarks/gpu_carry.sh prepare   # here: writes .carry/ (ignored by git), prints the calls
#   receive                                # there: gpu_check.sh sources this file and calls it first
#
#   .carry/whl          wheels the host lacks (gguf), installed into /tmp/site, put on PYTHONPATH
#   .carry/data         prompts.jsonl: the Spec-Bench prompts (SPEC_BENCH_PROMPTS)
#   .carry/model1..3    a third of the GGUF each (part) and "sha256 parts" of the whole file (meta)
#
# receive copies the carried parts into GPU_CHECK_STORE (default ~/gpu-check), which outlives the
# call while the machine stays warm (30 s), and once all are there joins them, checks the sha256 and
# sets SMOLLM2_GGUF. It prints one JSON row, part "carry". Settings: GPU_CHECK_CARRY (default .carry);
# for prepare SMOLLM2_GGUF (default: the embedded model's file), SPEC_BENCH_PROMPTS (default
# ../shared/data/spec_bench_dev.jsonl), GPU_CARRY_WHEELS=0 to download no wheel, PYTHON.

prepare() {
    local carry=${GPU_CHECK_CARRY:-.carry} py=${PYTHON:-.venv/bin/python}
    local prompts=${SPEC_BENCH_PROMPTS:-../shared/data/spec_bench_dev.jsonl} gguf=${SMOLLM2_GGUF:-}
    [ -n "$gguf" ] || gguf=$("$py" -c 'from runtime.loading import embedded_gguf_path; print(embedded_gguf_path())') ||
        return 1
    if [ -e "$carry" ] && [ ! -f "$carry/data/prompts.jsonl" ]; then  # never remove what prepare did not write
        echo "$carry exists and is not a carry folder: remove it, or set GPU_CHECK_CARRY to another" >&2
        return 1
    fi
    rm -rf "$carry" && mkdir -p "$carry/data" || return 1
    if [ "$carry" = .carry ] && ! grep -qsx '/.carry/' .git/info/exclude; then
        mkdir -p .git/info && echo '/.carry/' >> .git/info/exclude
    fi
    cp "$prompts" "$carry/data/prompts.jsonl" || return 1
    if [ "${GPU_CARRY_WHEELS:-1}" = 1 ]; then  # the version installed here, built for the host's Python
        local version
        version=$("$py" -c 'import importlib.metadata as m; print(m.version("gguf"))') || return 1
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux2014_x86_64 -d "$carry/whl" "gguf==$version" || return 1
    fi
    local sha i
    sha=$(sha256sum "$gguf" | cut -d' ' -f1)
    split -n 3 -d "$gguf" "$carry/part." || return 1
    for i in 1 2 3; do
        mkdir "$carry/model$i" && mv "$carry/part.0$((i - 1))" "$carry/model$i/part" &&
            echo "$sha 3" > "$carry/model$i/meta" || return 1
    done
    cat <<EOF
Prepared $carry from $gguf ($(du -sh "$carry" | cut -f1)). Three device runs, each started within
30 s of the last one's end (the machine keeps /root only while warm):
  1. carry [".carry/whl", ".carry/data", ".carry/model1"], timeout_s 170:
     GPU_CHECK_PARTS="env check bench" bash benchmarks/gpu_check.sh 2>&1 | tee \$OUT/gpu1.log
  2. carry [".carry/whl", ".carry/data", ".carry/model2"], timeout_s 240:
     GPU_CHECK_PARTS="decode-llama2-7b" bash benchmarks/gpu_check.sh 2>&1 | tee \$OUT/gpu2.log
  3. carry [".carry/whl", ".carry/data", ".carry/model3"], timeout_s 500:
     GPU_CHECK_PARTS="speculative speculative-compiled" bash benchmarks/gpu_check.sh 2>&1 | tee \$OUT/gpu3.log
Each command starts with: export PYTHONUNBUFFERED=1; set -o pipefail;
Left out for lack of time: speculative-float32 (greedy exactness on the GPU: the first to add if
time is left, 80 s, in run 3), step (verification cost by tree size on 7B shapes), decode-llama3-8b,
speculative-dynamic, sweep.
EOF
}

receive() {
    local carry=${GPU_CHECK_CARRY:-.carry} store=${GPU_CHECK_STORE:-$HOME/gpu-check}
    [ -d "$carry" ] || return 0
    if compgen -G "$carry/whl/*.whl" > /dev/null; then
        "${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
            "$carry"/whl/*.whl > /dev/null || return 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [ -f "$carry/data/prompts.jsonl" ]; then
        export SPEC_BENCH_PROMPTS=${SPEC_BENCH_PROMPTS:-$(realpath "$carry/data/prompts.jsonl")}
    fi
    local dir sha count have model=null
    mkdir -p "$store" || return 1
    for dir in "$carry"/model*/; do
        [ -d "$dir" ] || continue  # no part carried: the pattern itself
        cp "$dir/part" "$store/$(basename "$dir").part" && cp "$dir/meta" "$store/meta" || return 1
    done
    [ -f "$store/meta" ] || return 0
    read -r sha count < "$store/meta"
    have=$(compgen -G "$store/model*.part" | wc -l)
    if [ "$have" -eq "$count" ]; then
        compgen -G "$store/model*.part" | sort -V | xargs cat > "$store/model.gguf"
        if [ "$(sha256sum "$store/model.gguf" | cut -d' ' -f1)" != "$sha" ]; then
            echo "the joined GGUF's sha256 is not $sha: a part is missing or damaged" >&2
            return 1
        fi
        export SMOLLM2_GGUF=${SMOLLM2_GGUF:-$store/model.gguf}
        model="\"$store/model.gguf\""
    fi
    echo "{\"part\": \"carry\", \"model_parts\": $have, \"of\": $count, \"model\": $model}"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -uo pipefail
    cd "$(dirname "$0")/.." || exit 1
    case ${1:-} in
        prepare) prepare ;;
        *) echo "usage: bash benchmarks/gpu_carry.sh prepare  (receive: gpu_check.sh calls it)" >&2; exit 2 ;;
    esac
fi
