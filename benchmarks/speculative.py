"""Speculative decoding benchmark: transformers generate() vs our plain decoding vs Medusa, greedy.

    python -m benchmarks.speculative --prompts ../shared/data/spec_bench_dev.jsonl --limit 10 --json

Prompts are Spec-Bench questions (`benchmarks.spec_bench`), each wrapped in the model's chat
template when it has one, as the server wraps /generate inputs. Every mode runs on the same prompts
in this one process, one prompt at a time (batch 1), so the ratios printed are measured in one run.
Medusa uses the heads shipped for the embedded model, or random heads for another model (engine
speed only: random heads rarely guess right). Modes "plain-compiled" and "medusa-compiled" run the
same engines with their step compiled (graphs built before timing), for a compiled-vs-eager ratio:

    python -m benchmarks.speculative --prompts ../shared/data/spec_bench_dev.jsonl --limit 10 \
        --modes plain,medusa,plain-compiled,medusa-compiled --json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.spec_bench import Question, read_questions
from medusa.checkpoints import SHIPPED_HEADS, load_heads
from medusa.engine import Engine, use_compile
from medusa.heads import MedusaConfig, MedusaHeads, random_heads
from medusa.tree import default_tree, get_tree
from runtime.config import SamplingParams
from runtime.loading import LoadedModel, is_embedded, load_model
from runtime.prompt import Prompter


@dataclass
class ModeResult:
    outputs: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


def run_hf(loaded: LoadedModel, prompts: list[list[int]], max_new: int) -> ModeResult:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=loaded.model.embed.weight.dtype)
    hf = hf.to(loaded.model.embed.weight.device).eval()
    result = ModeResult()
    eos = list(loaded.eos_token_ids)
    for prompt in prompts:
        ids = torch.tensor([prompt], device=hf.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                              do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        result.seconds.append(time.perf_counter() - start)
        result.outputs.append(out[0, len(prompt):].tolist())
        result.steps.append(len(result.outputs[-1]))
    return result


def run_engine(engine: Engine, prompts: list[list[int]], max_new: int) -> ModeResult:
    result = ModeResult()
    params = SamplingParams(max_new_tokens=max_new)
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        emitted = list(engine.run([(i, prompt, params)]))
        result.seconds.append(time.perf_counter() - start)
        result.outputs.append([token for e in emitted for token in e.token_ids])
        result.steps.append(len(emitted) - 1)  # the prefill's Emitted, then one per step
    return result


# our engine: plain decoding, Medusa; "-compiled": the same with compile on, whatever --compile says
ENGINE_MODES = ("plain", "medusa", "plain-compiled", "medusa-compiled")


def get_heads(loaded: LoadedModel, path: str | None, model: str | None) -> tuple[MedusaHeads, str]:
    """The heads at `path`, else the shipped ones for the embedded model, else random ones."""
    config = loaded.model.config
    device, dtype = loaded.model.embed.weight.device, loaded.model.embed.weight.dtype
    if path is None and is_embedded(model):
        path = str(SHIPPED_HEADS)
    if path is not None:
        return load_heads(Path(path), config, loaded.model.lm_head, device=device, dtype=dtype), path
    heads = random_heads(MedusaConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size), seed=0)
    return heads.to(device, dtype), "random-initialised heads (seed 0): no trained heads for this model"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--modes", default="hf,plain,medusa")
    ap.add_argument("--model", help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--medusa-heads", help="heads folder (default: the shipped heads for the embedded "
                                           "model, random heads for another)")
    ap.add_argument("--tree", help="tree name or JSON file (default: 'gpu' on CUDA, 'cpu' otherwise)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="our engine's step through torch.compile, its graphs built before timing "
                         "(auto: on for CUDA, off on the CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")

    torch.set_grad_enabled(False)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    questions = read_questions(args.prompts, args.limit)
    prompter = Prompter(loaded.tokenizer, chat_template=True)
    prompts = [prompter.encode(q.text) for q in questions]
    max_total = max(len(p) for p in prompts) + args.max_new_tokens
    results: dict[str, ModeResult] = {}
    heads_note = None
    warm_up_s: dict[str, float] = {}
    tree_name = args.tree or default_tree(args.device)
    compile = use_compile(args.compile, args.device)
    for mode in modes:
        if mode == "hf":
            results[mode] = run_hf(loaded, prompts, args.max_new_tokens)
        elif mode in ENGINE_MODES:
            heads = tree = None
            if mode.startswith("medusa"):
                heads, heads_note = get_heads(loaded, args.medusa_heads, args.model)
                tree = get_tree(tree_name)
            engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, max_batch_size=1,
                            max_total_tokens=max_total, heads=heads, tree=tree,
                            compile=compile or mode.endswith("-compiled"))
            started = time.perf_counter()
            engine.warm_up()  # not timed: a server does it before it listens
            warm_up_s[mode] = round(time.perf_counter() - started, 1)
            results[mode] = run_engine(engine, prompts, args.max_new_tokens)
        else:
            raise SystemExit(f"unknown mode {mode!r} (choose from hf, {', '.join(ENGINE_MODES)})")

    summary = report(questions, results, heads_note, tree_name)
    summary["prompts"] = len(questions)
    summary["compile"] = compile
    for mode in ("plain", "medusa"):  # the same engine compiled, in this run
        if mode in results and f"{mode}-compiled" in results:
            ours, compiled = results[mode].outputs, results[f"{mode}-compiled"].outputs
            summary[f"{mode}_compiled_vs_eager"] = round(summary[f"{mode}-compiled_tok_s"]
                                                         / summary[f"{mode}_tok_s"], 3)
            summary[f"{mode}_compiled_matches_eager"] = sum(map(list.__eq__, ours, compiled)) / len(ours)
    if any(warm_up_s.values()):
        summary["warm_up_s"] = warm_up_s
    if args.json:
        print(json.dumps(summary))
    return summary


def report(questions: list[Question], results: dict[str, ModeResult], heads_note: str | None,
           tree: str) -> dict:
    if heads_note:
        print(f"medusa heads: {heads_note}; tree: {tree}")
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_cat[q.category].append(i)

    def tok_s(mode: str, idx: list[int]) -> float:
        res = results[mode]
        return sum(len(res.outputs[i]) for i in idx) / sum(res.seconds[i] for i in idx)

    def accepted(idx: list[int]) -> float:
        res = results["medusa"]
        return sum(len(res.outputs[i]) - 1 for i in idx) / max(1, sum(res.steps[i] for i in idx))

    header = "category".ljust(16) + "".join(f"{m + ' tok/s':>14}" for m in results)
    if "medusa" in results:
        header += f"{'accepted/step':>15}"
    print(header)
    for name, idx in [*sorted(by_cat.items()), ("overall", list(range(len(questions))))]:
        line = name.ljust(16) + "".join(f"{tok_s(m, idx):14.1f}" for m in results)
        if "medusa" in results:
            line += f"{accepted(idx):15.2f}"
        print(line)

    all_idx = list(range(len(questions)))
    summary: dict = {f"{m}_tok_s": round(tok_s(m, all_idx), 2) for m in results}
    if "medusa" in results:
        summary["mean_accepted_tokens"] = round(accepted(all_idx), 3)
        summary["new_tokens"] = sum(len(o) for o in results["medusa"].outputs)
        for base in ("plain", "hf"):
            if base in results:
                summary[f"speedup_vs_{base}"] = round(summary["medusa_tok_s"] / summary[f"{base}_tok_s"], 3)
        if "plain" in results:
            same = [results["medusa"].outputs[i] == results["plain"].outputs[i] for i in all_idx]
            summary["exact_match"] = sum(same) / len(same)
    if "plain" in results and "hf" in results:
        summary["plain_vs_hf"] = round(summary["plain_tok_s"] / summary["hf_tok_s"], 3)
        same = [results["plain"].outputs[i] == results["hf"].outputs[i] for i in all_idx]
        summary["plain_matches_hf"] = sum(same) / len(same)
    summary.setdefault("new_tokens", sum(len(o) for o in next(iter(results.values())).outputs))
    return summary


if __name__ == "__main__":
    main()
