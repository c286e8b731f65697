"""Where speculation stops paying as requests share a step: greedy throughput of plain and of
speculative decoding at each batch size, the two taking turns in one process.

    python -m benchmarks.crossover --prompts ../shared/data/spec_bench_dev.jsonl --batches 1,2,3,4 \
        [--dtype auto] [--drafter heads|eagle] [--tree NAME] [--rounds 4] [--json]

A step verifies B trees of T nodes: B * T rows through every product, where plain decoding reads the
weights for B rows. On a GPU those rows cost little more than one; on a few CPU cores the products
turn compute-bound as they grow, so past some B a speculative step costs more than the tokens it
saves. For each batch size B, two engines on the same weights -- plain, and the drafter with its
tree (the one shipped for the device and dtype unless --tree names one) -- generate the same 2B
prompts with at most B running at once (`Engine.generate`), round after round, each round another
2B prompts, the two engines in turns whose order alternates; tok/s is all tokens over all seconds.
`spec_vs_plain` below 1: speculation costs throughput at that batch. `largest_paying_batch`, the
largest B measured before the first ratio below 1 (0 if the first is), is what
`--max-speculative-batch` should be on this machine; the server's CPU default is such a measurement
(`server.settings.CPU_SPECULATIVE_BATCH`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.spec_bench import read_questions
from benchmarks.speculative import get_heads
from medusa.checkpoints import load_drafter, shipped_drafter
from medusa.engine import Engine
from medusa.tree import default_tree, get_tree
from runtime.config import SamplingParams
from runtime.loading import cpu_name, load_model
from runtime.prompt import Prompter


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--batches", default="1,2,3,4", help="batch sizes, separated by commas")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of 2B prompts per batch size and engine")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--model", help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--drafter", choices=("heads", "eagle"), default="heads",
                    help="the shipped Medusa heads or the shipped draft layer (for the embedded model)")
    ap.add_argument("--tree", help="tree name or spec (default: the drafter's for the device and dtype)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        args.batches = []
    if not args.batches or min(args.batches) < 1 or args.rounds < 1 or args.max_new_tokens < 1:
        ap.error("--batches takes positive integers separated by commas; --rounds and --max-new-tokens "
                 "must be at least 1")
    with torch.no_grad():
        summary = crossover(args)
    if args.json:
        print(json.dumps(summary))
    return summary


def crossover(args: argparse.Namespace) -> dict:
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model = loaded.model
    prompter = Prompter(loaded.tokenizer, chat_template=True)
    prompts = [prompter.encode(q.text) for q in read_questions(args.prompts)]
    if args.drafter == "heads":
        drafter, _ = get_heads(loaded, None, args.model)
    else:
        drafter = load_drafter(shipped_drafter("eagle", loaded.dtype_name), model.config, model.lm_head,
                               device=model.embed.weight.device, dtype=model.embed.weight.dtype)
    tree_name = args.tree or default_tree(args.device, loaded.dtype_name, args.drafter)
    tree = get_tree(tree_name)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    max_total = max(len(p) for p in prompts) + args.max_new_tokens
    where = cpu_name() if args.device == "cpu" else args.device
    print(f"{where}, {loaded.dtype_name}, drafter {args.drafter}, tree {tree_name} ({tree.num_nodes} nodes), "
          f"{args.max_new_tokens} new tokens")
    rows = []
    for B in args.batches:
        engines = {"plain": Engine(model, loaded.tokenizer, loaded.eos_token_ids, max_batch_size=B,
                                   max_total_tokens=max_total),
                   "spec": Engine(model, loaded.tokenizer, loaded.eos_token_ids, max_batch_size=B,
                                  max_total_tokens=max_total, heads=drafter, tree=tree)}
        for engine in engines.values():
            engine.warm_up()
        tokens, seconds = dict.fromkeys(engines, 0), dict.fromkeys(engines, 0.0)
        for r in range(args.rounds):
            start = r * 2 * B % len(prompts)
            batch = (prompts + prompts)[start:start + 2 * B]
            for name in (("plain", "spec") if r % 2 == 0 else ("spec", "plain")):
                began = time.perf_counter()
                outputs = engines[name].generate(batch, params)
                seconds[name] += time.perf_counter() - began
                tokens[name] += sum(map(len, outputs))
        plain, spec = (tokens[name] / seconds[name] for name in ("plain", "spec"))
        ratio = spec / plain
        rows.append({"batch": B, "plain_tok_s": round(plain, 1), "spec_tok_s": round(spec, 1),
                     "spec_vs_plain": round(ratio, 3)})
        print(f"batch {B}: plain {plain:.1f} tok/s, speculative {spec:.1f} tok/s, spec_vs_plain {ratio:.2f}",
              flush=True)
    largest = largest_paying(rows)
    print(f"largest_paying_batch: {largest}")
    return {"device": args.device, "dtype": loaded.dtype_name, "drafter": args.drafter, "tree": tree_name,
            "rows": rows, "largest_paying_batch": largest}


def largest_paying(rows: list[dict]) -> int:
    """The batch measured last before the first whose speculation lost (`spec_vs_plain` < 1), in the
    order measured; 0 if the first lost."""
    largest = 0
    for row in rows:
        if row["spec_vs_plain"] < 1:
            break
        largest = row["batch"]
    return largest


if __name__ == "__main__":
    main()
