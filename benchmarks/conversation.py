"""Conversations through the prefix cache: each turn after the first, its time to first token and its
output, with the cache and without, the two engines taking turns in one process.

    python -m benchmarks.conversation --prompts ../shared/data/spec_bench_dev.jsonl [--limit 10] \
        [--max-new-tokens 128] [--dtype auto] [--drafter heads|eagle|none] [--medusa-heads DIR] \
        [--eagle DIR] [--json]

Each question with several turns (Spec-Bench's mt_bench ones) is a conversation: turn k's prompt is
the chat template over the turns before it with the model's answers to them, then turn k. Both
engines (`Engine(prefix_caching=...)`, the same weights and drafter) run the whole conversation, one
then the other, the order alternating from one conversation to the next. `ttft_ms` is the time
`Engine.add` took for turns after the first (prefill and first token: what a client waits for);
`same_output` the share of conversations whose every turn's tokens the two engines agreed on (the
cache reuses only K/V with a prefill's bits: 1.0 expected); `cached_share` the share of those turns'
prompt tokens the cache held.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.spec_bench import read_conversations
from benchmarks.speculative import get_heads
from medusa.checkpoints import load_drafter, shipped_drafter
from medusa.engine import Engine
from medusa.tree import default_tree, get_tree
from runtime.config import SamplingParams
from runtime.loading import LoadedModel, cpu_name, load_model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=10, help="conversations")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model", help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--drafter", choices=("heads", "eagle", "none"), default="heads")
    ap.add_argument("--medusa-heads", help="heads folder for --drafter heads (default: the shipped heads for "
                                           "the embedded model, random heads for another)")
    ap.add_argument("--eagle", help="draft layer folder for --drafter eagle (default: the shipped one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.limit < 1 or args.max_new_tokens < 1:
        ap.error("--limit and --max-new-tokens must be at least 1")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model = loaded.model
    drafter = tree = None
    if args.drafter == "heads":
        drafter, _ = get_heads(loaded, args.medusa_heads, args.model)
    elif args.drafter == "eagle":
        folder = args.eagle or shipped_drafter("eagle", loaded.dtype_name)
        drafter = load_drafter(folder, model.config, model.lm_head, device=model.embed.weight.device,
                               dtype=model.embed.weight.dtype)
    if drafter is not None:
        tree = get_tree(default_tree(args.device, loaded.dtype_name, args.drafter))
    where = cpu_name() if args.device == "cpu" else args.device
    print(f"{where}, {loaded.dtype_name}, drafter {args.drafter}, {args.max_new_tokens} new tokens a turn")
    with torch.no_grad():
        conversations = read_conversations(args.prompts, args.limit)
        summary = measure(loaded, drafter, tree, conversations, args.max_new_tokens)
    summary |= {"device": where, "dtype": loaded.dtype_name, "drafter": args.drafter}
    if args.json:
        print(json.dumps(summary))
    return summary


def measure(loaded: LoadedModel, drafter, tree, conversations: list[list[str]], max_new: int) -> dict:
    """Run every conversation through an engine with the prefix cache and one without (module doc)."""
    tokenizer = loaded.tokenizer
    params = SamplingParams(max_new_tokens=max_new)
    longest = max(len(tokenizer.encode("".join(turns))) for turns in conversations)
    max_total = min(loaded.model.config.max_position_embeddings,
                    2 * longest + max(map(len, conversations)) * (max_new + 64))
    engines = {cached: Engine(loaded.model, tokenizer, loaded.eos_token_ids, max_batch_size=1,
                              max_total_tokens=max_total, heads=drafter, tree=tree, prefix_caching=cached)
               for cached in (True, False)}
    later: dict[bool, list[tuple[float, int, int]]] = {True: [], False: []}  # (seconds, cached, prompt)
    same = 0
    for i, turns in enumerate(conversations):
        outputs = {}
        for cached in ((True, False) if i % 2 == 0 else (False, True)):
            outputs[cached], timed = converse(engines[cached], tokenizer, turns, params, i)
            later[cached] += timed
        same += outputs[True] == outputs[False]
        ms = {c: 1000 * sum(t[0] for t in later[c][1 - len(turns):]) for c in (True, False)}
        print(f"conversation {i}: {len(turns)} turns, the last one's prompt {timed[-1][2]} tokens; later "
              f"turns' first token {ms[True]:.1f} ms cached, {ms[False]:.1f} ms not; same output "
              f"{outputs[True] == outputs[False]}", flush=True)
    seconds = {c: [t[0] for t in later[c]] for c in (True, False)}
    cached_tokens, prompt_tokens = (sum(t[k] for t in later[True]) for k in (1, 2))
    summary = {"conversations": len(conversations),
               "ttft_ms": {"cached": round(1000 * statistics.median(seconds[True]), 1),
                           "uncached": round(1000 * statistics.median(seconds[False]), 1)},
               "ttft_cached_vs_uncached": round(sum(seconds[True]) / sum(seconds[False]), 3),
               "same_output": round(same / len(conversations), 3),
               "cached_share": round(cached_tokens / prompt_tokens, 3)}
    print(f"later turns' first token, medians: {summary['ttft_ms']['cached']} ms cached, "
          f"{summary['ttft_ms']['uncached']} ms not (sums: {summary['ttft_cached_vs_uncached']}x); "
          f"{cached_tokens} of their {prompt_tokens} prompt tokens cached; "
          f"same_output {summary['same_output']}")
    return summary


def converse(engine: Engine, tokenizer, turns: list[str], params: SamplingParams, i: int
             ) -> tuple[list[list[int]], list[tuple[float, int, int]]]:
    """One conversation, turn after turn, each answer in the next prompt: every turn's tokens, and for
    each turn after the first the seconds `add` took, the prompt tokens the cache held, the prompt's."""
    messages, outputs, timed = [], [], []
    for k, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        began = time.perf_counter()
        first = engine.add((i, k), prompt, params)
        seconds = time.perf_counter() - began
        tokens = list(first.token_ids)
        while engine.running:
            tokens += engine.step()[0].token_ids
        outputs.append(tokens)
        messages.append({"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)})
        if k > 0:
            timed.append((seconds, first.cached_tokens, len(prompt)))
    return outputs, timed


if __name__ == "__main__":
    main()
