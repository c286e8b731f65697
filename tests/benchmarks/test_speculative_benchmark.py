"""`python -m benchmarks.speculative`'s parts: Spec-Bench reading and the per-prompt driver, whose
steps give the printed accepted tokens per step."""

import json

from benchmarks import serving, speculative
from benchmarks.spec_bench import Question, read_questions
from medusa.engine import Engine
from medusa.heads import MedusaConfig, random_heads
from medusa.tree import get_tree
from runtime.config import SamplingParams
from tests.conftest import Vocab

PROMPTS = [[5, 6, 7], [11, 3, 9, 2, 40, 41, 42, 1, 17], [60]]


def test_spec_bench_questions_are_first_turns_in_file_order(tmp_path):
    path = tmp_path / "spec_bench.jsonl"
    rows = [{"question_id": i, "category": category, "turns": [f"Question {i}?", "And then?"]}
            for i, category in enumerate(["writing", "math", "writing"])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")
    assert read_questions(path) == [Question("writing", "Question 0?"), Question("math", "Question 1?"),
                                    Question("writing", "Question 2?")]
    assert read_questions(path, limit=2) == read_questions(path)[:2]
    assert serving.read_prompts(path) == ["Question 0?", "Question 1?", "Question 2?"]


def engine(model, heads=None) -> Engine:
    return Engine(model, Vocab(), [], max_batch_size=1, max_total_tokens=64, heads=heads,
                  tree=get_tree("mc_sim_7b_63") if heads else None)


def test_plain_decoding_takes_one_step_per_token_after_the_first(tiny_llama):
    result = speculative.run_engine(engine(tiny_llama), PROMPTS, max_new=12)
    assert result.outputs == engine(tiny_llama).generate(PROMPTS, SamplingParams(max_new_tokens=12))
    assert result.steps == [len(tokens) - 1 for tokens in result.outputs] == [11, 11, 11]
    assert len(result.seconds) == len(PROMPTS)


def test_speculation_gives_the_same_tokens_in_fewer_steps(tiny_llama):
    config = tiny_llama.config
    heads = random_heads(MedusaConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size), seed=0)
    plain = speculative.run_engine(engine(tiny_llama), PROMPTS, max_new=12)
    medusa = speculative.run_engine(engine(tiny_llama, heads), PROMPTS, max_new=12)
    assert medusa.outputs == plain.outputs
    assert all(steps < plain_steps for steps, plain_steps in zip(medusa.steps, plain.steps, strict=True))
