"""`python -m benchmarks.speculative`'s parts: Spec-Bench reading, the per-prompt driver, whose
steps give the printed accepted tokens per step, and the llama.cpp anchor (a fake llama_cpp module
stands in for the optional package; the real one, where installed, runs a tiny float32 GGUF)."""

import itertools
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import crossover, serving, speculative
from benchmarks.spec_bench import Question, read_questions
from medusa.engine import Engine
from medusa.heads import MedusaConfig, random_heads
from medusa.tree import get_tree
from runtime.config import SamplingParams
from runtime.loading import load_model
from runtime.prompt import Prompter
from tests.conftest import Vocab
from tests.runtime.test_loading import write_tiny_gguf

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


def test_syncs_are_counted_over_steps_of_a_decoding_sequence_which_then_finishes(tiny_llama, monkeypatch):
    """The count itself is CUDA's (`benchmarks.engine.syncs_per_step`); here, that it sees a prefilled
    sequence decode for its steps, and that the engine is left empty for the next mode."""
    seen = []

    def counted(e: Engine, steps: int) -> float:
        for _ in range(steps):
            seen.append(e.running)
            e.step()
        return 1.0

    monkeypatch.setattr(speculative.engine_benchmark, "syncs_per_step", counted)
    e = engine(tiny_llama)
    assert speculative.syncs_per_step(e, PROMPTS[1], max_new=20, steps=8) == 1.0
    assert seen == [1] * 8
    assert e.running == 0


def test_the_modes_take_turns_prompt_by_prompt_and_each_keeps_its_prompts_in_order():
    calls = []

    def mode(name: str) -> speculative.Run:
        def run(prompt: list[int]) -> tuple[list[int], float, int]:
            calls.append((name, prompt[0]))
            return [name, *prompt], 0.5, len(prompt)
        return run

    prompts = [[1], [2, 2], [3], [4]]
    results = speculative.run_each({m: mode(m) for m in "abc"}, prompts)
    # a machine that slows down during the run slows every mode alike, none always first or last
    assert calls == [("a", 1), ("b", 1), ("c", 1), ("b", 2), ("c", 2), ("a", 2),
                     ("c", 3), ("a", 3), ("b", 3), ("a", 4), ("b", 4), ("c", 4)]
    assert list(results) == ["a", "b", "c"]
    for name, result in results.items():
        assert result.outputs == [[name, *p] for p in prompts]
        assert result.steps == [1, 2, 1, 1] and result.seconds == [0.5] * 4


def test_the_read_bound_is_the_bytes_of_the_weights_a_token_reads_over_the_measured_rate(tiny_llama, capsys):
    bound = speculative.ReadBound(tiny_llama)
    linear = [tiny_llama.lm_head.weight] + [w for name, w in tiny_llama.named_parameters()
                                            if name.startswith("layers.") and "norm" not in name]
    assert bound.bytes == sum(w.numel() * w.element_size() for w in linear)  # the embedding: one row a token
    assert bound.buffer.numel() * bound.buffer.element_size() == bound.bytes

    run = bound.after(lambda prompt: (prompt, 0.25, 1))
    assert [run([7]), run([8, 9]), run([1])] == [([7], 0.25, 1), ([8, 9], 0.25, 1), ([1], 0.25, 1)]
    assert len(bound.rates) == 3 and all(rate > 0 for rate in bound.rates)  # one reading per run

    summary = bound.summary({"plain_tok_s": 30.0, "medusa_tok_s": 60.0})
    expected = sorted(bound.rates)[1] / bound.bytes  # the median reading
    assert summary["read_bound_tok_s"] == round(expected, 2)
    assert summary["plain_vs_read_bound"] == round(30.0 / expected, 3)
    assert "plain_compiled_vs_read_bound" not in summary and "read bound:" in capsys.readouterr().out


# --- mode "llamacpp": llama.cpp on the same GGUF file, a fake llama_cpp in its place ---------------


@pytest.fixture
def fake_llama_cpp(monkeypatch) -> list:
    """A llama_cpp module whose Llama records what it is given and "decodes" the prompt's last token
    + 1, + 2, ... forever; returns the Llamas made."""
    made = []

    class Llama:
        def __init__(self, model_path: str, **kwargs) -> None:
            self.model_path, self.kwargs, self.calls, self.n_tokens = model_path, kwargs, [], 0
            made.append(self)

        def reset(self) -> None:
            self.n_tokens = 0

        def generate(self, tokens, **sampling):
            self.calls.append({"tokens": list(tokens), "sampling": sampling, "cached": self.n_tokens})
            self.n_tokens = len(tokens)
            yield from itertools.count(tokens[-1] + 1)

    module = types.ModuleType("llama_cpp")
    module.Llama = Llama
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    return made


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny float32 GGUF model, two Spec-Bench questions and a cache folder for its conversion."""
    folder = tmp_path_factory.mktemp("llamacpp")
    prompts = folder / "spec_bench.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "category": category, "turns": [text]}) + "\n"
                               for i, (category, text) in enumerate([("qa", "What is the capital of France?"),
                                                                     ("writing", "Hello world!")])))
    return write_tiny_gguf(folder / "tiny.F32.gguf"), prompts, folder / "cache"


def run_main(gguf_run, monkeypatch, modes: str) -> dict:
    gguf, prompts, cache = gguf_run
    monkeypatch.setenv("MEDUSA_CACHE_DIR", str(cache))
    return speculative.main(["--prompts", str(prompts), "--model", str(gguf), "--modes", modes,
                             "--max-new-tokens", "6", "--json"])


def test_llamacpp_decodes_each_prompt_from_an_empty_cache_greedily_to_eos_or_max_tokens(fake_llama_cpp):
    result = speculative.run_llamacpp(Path("model.gguf"), PROMPTS, max_new=5, eos_token_ids=(9,),
                                      max_total_tokens=64)
    [llm] = fake_llama_cpp
    assert llm.model_path == "model.gguf" and llm.kwargs["n_ctx"] == 64
    assert llm.kwargs["n_threads"] == llm.kwargs["n_threads_batch"] == torch.get_num_threads()
    _, *timed = llm.calls  # the first is the untimed warm-up
    assert [call["tokens"] for call in timed] == PROMPTS
    assert all(call["cached"] == 0 for call in llm.calls)  # no prefix of an earlier prompt reused
    assert all(call["sampling"]["temp"] == 0 and call["sampling"]["top_k"] == 1 for call in llm.calls)
    assert result.outputs == [[8, 9], [18, 19, 20, 21, 22], [61, 62, 63, 64, 65]]  # EOS 9 is kept
    assert result.steps == [1, 4, 4] and len(result.seconds) == len(PROMPTS)


def test_llamacpp_runs_the_model_file_on_the_prompt_ids_our_engine_gets(fake_llama_cpp, gguf_run, monkeypatch,
                                                                        capsys):
    summary = run_main(gguf_run, monkeypatch, "plain,llamacpp")
    gguf, prompts, cache = gguf_run
    [llm] = fake_llama_cpp
    assert llm.model_path == str(gguf)
    prompter = Prompter(load_model(str(gguf), cache_dir=cache).tokenizer, chat_template=True)
    ours = [prompter.encode(q.text) for q in read_questions(prompts)]  # as main encodes them
    assert [call["tokens"] for call in llm.calls[1:]] == ours
    assert summary["plain_vs_llamacpp"] == round(summary["plain_tok_s"] / summary["llamacpp_tok_s"], 3)
    assert 0 <= summary["llamacpp_matches_plain"] <= 1 and "skipped" not in summary
    out = capsys.readouterr().out
    assert "plain tok/s  llamacpp tok/s" in out and json.loads(out.splitlines()[-1]) == summary


def test_without_llama_cpp_the_mode_is_skipped_with_a_line_and_the_others_report(gguf_run, monkeypatch,
                                                                               capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` does where it is missing
    summary = run_main(gguf_run, monkeypatch, "plain,llamacpp")
    out = capsys.readouterr().out
    assert "llamacpp skipped: llama-cpp-python is not installed (pip install -e '.[llamacpp]'" in out
    assert summary["plain_tok_s"] > 0 and summary["new_tokens"] > 0
    assert not any("llamacpp" in key for key in summary if key != "skipped")
    assert list(summary["skipped"]) == ["llamacpp"] and json.loads(out.splitlines()[-1]) == summary

    alone = run_main(gguf_run, monkeypatch, "llamacpp")
    assert alone["prompts"] == 2 and list(alone["skipped"]) == ["llamacpp"]


def test_llamacpp_needs_a_gguf_file(fake_llama_cpp, tmp_path):
    assert "GGUF" in speculative.llamacpp_skip_reason(str(tmp_path))  # a Hugging Face folder
    assert speculative.llamacpp_skip_reason(str(tmp_path / "model.gguf")) is None


def test_llamacpp_is_reported_beside_our_modes():
    questions = [Question("qa", "a"), Question("writing", "b")]
    results = {"plain": speculative.ModeResult(outputs=[[1, 2], [3]], seconds=[1.0, 1.0], steps=[1, 0]),
               "medusa": speculative.ModeResult(outputs=[[1, 2], [3]], seconds=[0.5, 0.5], steps=[1, 0]),
               "llamacpp": speculative.ModeResult(outputs=[[1, 2], [4, 5, 6]], seconds=[0.5, 0.5],
                                                  steps=[1, 2])}
    summary = speculative.report(questions, results, {})
    assert summary["llamacpp_tok_s"] == 5.0
    assert summary["plain_vs_llamacpp"] == 0.3 and summary["medusa_vs_llamacpp"] == 0.6
    assert summary["llamacpp_matches_plain"] == 0.5 and summary["exact_match"] == 1.0


def test_real_llama_cpp_on_float32_weights_gives_our_greedy_tokens(gguf_run, monkeypatch):
    pytest.importorskip("llama_cpp", reason="the optional extra 'llamacpp' is not installed")
    summary = run_main(gguf_run, monkeypatch, "plain,llamacpp")
    assert summary["llamacpp_matches_plain"] == 1.0  # the same ids in; no quantisation in this file


def test_crossover_measures_both_engines_at_each_batch_and_names_the_last_that_paid(gguf_run, monkeypatch,
                                                                                    capsys):
    gguf, prompts, cache = gguf_run
    monkeypatch.setenv("MEDUSA_CACHE_DIR", str(cache))
    summary = crossover.main(["--prompts", str(prompts), "--model", str(gguf), "--batches", "1,2",
                              "--rounds", "2", "--max-new-tokens", "6", "--json"])
    assert [row["batch"] for row in summary["rows"]] == [1, 2] and summary["drafter"] == "heads"
    for row in summary["rows"]:
        assert row["plain_tok_s"] > 0 and row["spec_tok_s"] > 0
        assert row["spec_vs_plain"] == pytest.approx(row["spec_tok_s"] / row["plain_tok_s"], abs=2e-3)
    assert summary["largest_paying_batch"] == crossover.largest_paying(summary["rows"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == summary


@pytest.mark.parametrize("ratios, largest", [([1.4, 1.1, 0.9, 1.2], 2), ([0.9, 1.3], 0), ([1.2, 1.0], 2)])
def test_the_largest_paying_batch_is_the_last_before_the_first_loss(ratios, largest):
    rows = [{"batch": b, "spec_vs_plain": r} for b, r in enumerate(ratios, start=1)]
    assert crossover.largest_paying(rows) == largest


def test_with_a_temperature_every_mode_samples_and_no_exact_match_is_claimed(gguf_run, monkeypatch, capsys):
    gguf, prompts, cache = gguf_run
    monkeypatch.setenv("MEDUSA_CACHE_DIR", str(cache))
    argv = ["--prompts", str(prompts), "--model", str(gguf), "--max-new-tokens", "6", "--json"]
    greedy = speculative.main([*argv, "--modes", "plain,medusa"])
    sampled = speculative.main([*argv, "--modes", "plain,medusa,llamacpp", "--temperature", "1.5",
                                "--top-p", "0.9", "--seed", "3"])
    assert "exact_match" in greedy and "exact_match" not in sampled and "temperature" not in greedy
    assert (sampled["temperature"], sampled["top_p"]) == (1.5, 0.9) and sampled["plain_tok_s"] > 0
    assert "greedily only" in sampled["skipped"]["llamacpp"]
    params = speculative.hf_sampling(SamplingParams(temperature=1.5, top_p=0.9, seed=3))
    assert params == {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "top_k": 0}
    assert speculative.hf_sampling(None) == {"do_sample": False}


def test_a_sampled_engine_run_draws_its_tokens_from_its_seed(tiny_llama):
    sampling = SamplingParams(temperature=1.5, seed=3)
    greedy = speculative.run_engine(engine(tiny_llama), PROMPTS, max_new=12).outputs
    runs = [speculative.run_each({"engine": speculative.engine_run(engine(tiny_llama), 12, sampling)},
                                 PROMPTS)["engine"].outputs for _ in range(2)]
    assert runs[0] == runs[1] != greedy


@pytest.mark.parametrize("main, argv", [(speculative.main, ["--temperature", "nan"]),
                                        (speculative.main, ["--temperature", "-1"]),
                                        (speculative.main, ["--top-p", "0"]),
                                        (crossover.main, ["--batches", "1,x"]),
                                        (crossover.main, ["--batches", "0"]),
                                        (crossover.main, ["--rounds", "0"])])
def test_bad_benchmark_arguments_stop_with_a_usage_error(main, argv, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        main(["--prompts", str(tmp_path / "none.jsonl"), *argv])
    assert stopped.value.code == 2
