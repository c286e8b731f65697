"""Fit the candidate tree to the heads' measured accuracy and to this machine's verification cost.

    python -m training calibrate --heads medusa/weights/smollm2-135m-instruct --out medusa/trees/cpu.json

1. From each head's held-out rank distribution (`training.json`, written by `python -m training fit`),
   the probability that a node's whole path is accepted is the product of its ranks' accuracies
   (heads treated as independent). Nodes are added greedily, best path probability first, each
   with its parent already in the tree; the expected tokens per step of a tree is
   1 + the sum of its nodes' path probabilities.
2. The cost of one step that verifies T tokens is measured on this device (base forward of T
   tokens against a cache of typical length, the lm_head on them, and the heads).
3. The budget that maximises expected tokens per second of step time wins. `--budget N` takes N
   nodes without measuring (a GPU, where verifying 64 tokens costs about what one does).

`--prompts FILE` (Spec-Bench jsonl) measures instead of estimating: greedy generation of `--limit`
prompts through the whole engine with each tree size, the best measured tokens per second winning.
The forward-only step cost of 2. leaves out drafting, acceptance and compaction, which grow with the
tree: in bfloat16 on an AMX Xeon it put the best tree at 12-16 nodes, generation at 8 (72.9 tok/s
against 67.8 at 16; `medusa/trees/cpu-bf16.calibration.json`).

`--out NAME.json` writes the tree there, and its estimates and measurements beside it in
NAME.calibration.json; `medusa.tree.get_tree` finds a tree written into `medusa/trees/` by its NAME.

`--dynamic` calibrates a dynamic tree (`medusa.dynamic`, `dynamic:N`) instead: each step grows
each sequence's tree from the drafter's confidence, so there is no estimate to make; with
`--prompts` the budget N is picked by measured generation speed, with `--budget` it is taken as
given. The written NAME.json is {"dynamic": N, "topk": k, "depth": D, "lookup": L} (depth 0: the
drafter's own), which `get_tree` reads.

`--lookup L` adds a prompt-lookup branch of L nodes (`medusa.lookup`) and counts them in the
budget and in the measured cost. What it gains depends on how much the text copies, so it is not
in the estimate. A measured dynamic calibration takes several (`--lookup 4 8`) and measures each
size with each; otherwise choose L by measuring with `python -m benchmarks.speculative --tree FILE`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.spec_bench import read_questions
from medusa.checkpoints import load_drafter
from medusa.draft import draft, window_size
from medusa.engine import Engine
from medusa.tree import DEFAULT_TOPK, DynamicTree, TreeBuffers, build_tree
from runtime.loading import cpu_name, load_model
from runtime.prompt import Prompter


def greedy_tree(rank_probs: list[list[float]], budget: int) -> tuple[list[tuple[int, ...]], list[float]]:
    """The `budget` choices with the highest path-acceptance probability, parents first.

    rank_probs[k][r]: probability that head k's rank-r guess is the right token. Returns the
    choices in the order they were added and each one's path probability.
    """
    K, R = len(rank_probs), len(rank_probs[0])
    frontier = {(r,): rank_probs[0][r] for r in range(R)}
    chosen: list[tuple[int, ...]] = []
    probs: list[float] = []
    while frontier and len(chosen) < budget:
        path = max(frontier, key=lambda p: (frontier[p], -len(p)))
        prob = frontier.pop(path)
        chosen.append(path)
        probs.append(prob)
        if len(path) < K:
            frontier.update({path + (r,): prob * rank_probs[len(path)][r] for r in range(R)})
    return chosen, probs


@torch.inference_mode()
def step_cost(loaded, heads, trees: dict[int, TreeBuffers], context: int, repeats: int) -> dict[int, float]:
    """Seconds for one speculative step with each tree (median of `repeats`): drafting + verification."""
    model = loaded.model
    device = model.embed.weight.device
    cache = model.new_cache(1, context + max(trees))
    slots = torch.tensor([0], device=device)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    model(prompt, torch.arange(context, device=device)[None], cache, slots)
    cache.advance(slots, context)
    W = window_size(heads)
    features = torch.randn(1, W, model.config.hidden_size, device=device, dtype=model.embed.weight.dtype)
    lens = torch.tensor([context], device=device)
    root = prompt[:, -1]
    costs = {}
    for T, tree in trees.items():
        positions = context + tree.depths.to(device)[None]  # [1, T]
        mask = tree.mask.to(device)
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            window = prompt[:, -W:]
            tokens = root[:, None] if T == 1 else draft(heads, model, features, window, lens, root, tree)
            model.logits(model(tokens, positions, cache, slots, mask if T > 1 else None, context + T))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        costs[T] = sorted(times[1:])[len(times[1:]) // 2]
    return costs


def measure_generation(loaded, drafter, trees: list[tuple[dict, TreeBuffers | DynamicTree]],
                       questions: list[str], max_new_tokens: int) -> tuple[dict, dict]:
    """Greedy generation of `questions`, one at a time, through the whole engine with each tree (each
    with the fields that name it in the record, e.g. {"nodes": 8}): prints tokens per second and per
    step for each; (the fastest one's row, a record of the runs)."""
    from benchmarks.speculative import engine_run, run_each

    prompter = Prompter(loaded.tokenizer, chat_template=True)
    prompts = [prompter.encode(q) for q in questions]
    runs = {}
    for i, (_, tree) in enumerate(trees):
        engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, max_batch_size=1,
                        max_total_tokens=max(map(len, prompts)) + max_new_tokens, heads=drafter, tree=tree)
        engine_run(engine, 8)(prompts[0])  # warms caches up, untimed
        runs[i] = engine_run(engine, max_new_tokens)
    rows = []
    for i, result in run_each(runs, prompts).items():  # the trees take turns prompt by prompt
        tokens = sum(map(len, result.outputs))
        rows.append(trees[i][0] | {"tokens_per_step": round(tokens / max(1, sum(result.steps)), 3),
                                   "tokens_per_s": round(tokens / sum(result.seconds), 1)})
    best = max(rows, key=lambda r: r["tokens_per_s"])
    for r in rows:
        lookup = f" ({r['lookup']} lookup)" if "lookup" in r else ""
        min_p = f"  min_p {r['min_p']}" if r.get("min_p") else ""
        print(f"{r['nodes']:4d} nodes{lookup}{min_p}  {r['tokens_per_step']:.2f} tokens/step  "
              f"{r['tokens_per_s']:7.1f} tok/s{'  <- best' if r is best else ''}")
    measured = f"greedy generation of {len(questions)} prompts, {max_new_tokens} new tokens"
    return best, {"dtype": loaded.dtype_name, "cpu": cpu_name(), "measured": measured, "measurements": rows}


def calibrate_dynamic(heads_path: Path, device: str, max_nodes: int, budget: int | None,
                      lookups: tuple[int, ...], topk: int, depth: int, dtype: str,
                      questions: list[str] | None, max_new_tokens: int,
                      min_ps: tuple[float, ...] = (0.0,)) -> dict:
    """The dynamic tree's budget (nodes, root and lookup branch included) and lookup branch: `budget`
    with the first of `lookups`, or the pair whose greedy generation of `questions` is fastest, each
    size tried with each of `lookups` and each of `min_ps` (`DynamicTree.min_p`: 0 verifies every node)."""
    result = {"topk": topk, "depth": depth, "device": device}
    if budget is not None:
        print(f"dynamic tree of {budget} nodes ({lookups[0]} lookup): budget given, cost not measured")
        return result | {"dynamic": budget - lookups[0], "lookup": lookups[0]}
    loaded = load_model(None, device=device, dtype=dtype)
    drafter = load_drafter(heads_path, loaded.model.config, loaded.model.lm_head, device=device,
                           dtype=loaded.model.embed.weight.dtype)
    # every size up to 8, where one row more can cost much: bf16 products emulated on AVX2 (Zen 3), the 30
    # layers and lm_head on 6 rows took 1.43x one row's time, on 7 1.90x (tiles of at most 6 rows)
    grid = {*range(3, 9), 12, 16, 24, 32, 48, 64}
    trees = [({"nodes": T, "lookup": L} | ({"min_p": p} if p else {}),
              DynamicTree(T - L, topk=topk, draft_depth=depth, lookup=L, min_p=p,
                          name=f"dynamic:{T - L},lookup={L}" + (f",min_p={p}" if p else "")))
             for L in lookups for T in sorted((grid & set(range(L + 2, max_nodes + 1))) | {max_nodes})
             for p in min_ps]
    best, record = measure_generation(loaded, drafter, trees, questions, max_new_tokens)
    chosen = {"dynamic": best["nodes"] - best["lookup"], "lookup": best["lookup"]}
    return result | chosen | ({"min_p": best["min_p"]} if best.get("min_p") else {}) | record


def calibrate(heads_path: Path, device: str, max_nodes: int, context: int, repeats: int,
              budget: int | None = None, lookup: int = 0, dtype: str = "float32",
              questions: list[str] | None = None, max_new_tokens: int = 64) -> dict:
    """The tree (head choices + a lookup branch of `lookup` nodes, root included in the node
    counts) that maximises expected tokens per second, or measured tokens per second of generating
    `questions`, or the best one of `budget` nodes."""
    report = json.loads((heads_path / "training.json").read_text())
    rank_probs = report["held_out"]["rank_probs"]
    choices, probs = greedy_tree(rank_probs, max_nodes - 1 - lookup)
    if budget is not None:  # cost known to be flat up to the budget (e.g. a GPU): no measurement
        n = budget - 1 - lookup
        expected = 1 + sum(probs[:n])
        print(f"{budget} nodes ({lookup} lookup)  E[tokens/step] {expected:.2f} from the heads "
              "(budget given, cost not measured)")
        return {"choices": [list(c) for c in choices[:n]], "lookup": lookup, "device": device,
                "expected_tokens": round(expected, 3)}
    loaded = load_model(None, device=device, dtype=dtype)
    heads = load_drafter(heads_path, loaded.model.config, loaded.model.lm_head, device=device,
                       dtype=loaded.model.embed.weight.dtype)
    sizes = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64} & set(range(lookup + 1, max_nodes + 1))
                   | {max_nodes})
    trees = {T: build_tree([list(c) for c in choices[:T - 1 - lookup]], lookup=lookup) for T in sizes}
    if questions is not None:  # measured through the engine, not estimated
        best, record = measure_generation(loaded, heads, [({"nodes": T}, tree) for T, tree in trees.items()],
                                          questions, max_new_tokens)
        choices = [list(c) for c in trees[best["nodes"]].choices]
        return {"choices": choices, "lookup": lookup, "device": device} | record
    costs = step_cost(loaded, heads, trees, context, repeats)
    rows = []
    for T in sizes:
        expected = 1 + sum(probs[:len(trees[T].choices)])
        rows.append({"nodes": T, "expected_tokens": round(expected, 3), "step_ms": round(1e3 * costs[T], 2),
                     "tokens_per_s": round(expected / costs[T], 1)})
    best = max(rows, key=lambda r: r["tokens_per_s"])
    for r in rows:
        print(f"{r['nodes']:4d} nodes  E[tokens/step] {r['expected_tokens']:.2f}  step {r['step_ms']:7.2f} ms"
              f"  {r['tokens_per_s']:7.1f} tok/s{'  <- best' if r is best else ''}")
    head_nodes = len(trees[best["nodes"]].choices)
    return {"choices": [list(c) for c in choices[:head_nodes]], "lookup": lookup,
            "device": device, "dtype": loaded.dtype_name, "measurements": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=Path, required=True,
                    help="heads or draft layer folder with training.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="the weights' dtype the tree is measured in (float32, "
                    "bfloat16, ...): verifying many tokens costs less, relative to one, where bf16 is native")
    ap.add_argument("--max-nodes", type=int, default=64)
    ap.add_argument("--context", type=int, default=256, help="cached tokens during the measured steps")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budget", type=int, help="use this many nodes without measuring (e.g. 64 on a GPU, "
                    "where verifying 64 tokens costs about what one does)")
    ap.add_argument("--lookup", type=int, nargs="+", default=[0], help="nodes of a prompt-lookup branch (in "
                    "the budget); with --dynamic and --prompts several, each size measured with each")
    ap.add_argument("--prompts", type=Path, help="Spec-Bench jsonl: pick the size by measured generation "
                    "speed on these prompts instead of the estimate")
    ap.add_argument("--limit", type=int, default=10, help="prompts measured with --prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt with --prompts")
    ap.add_argument("--dynamic", action="store_true", help="calibrate a dynamic tree's budget (needs "
                    "--prompts or --budget)")
    ap.add_argument("--topk", type=int, default=DEFAULT_TOPK,
                    help="with --dynamic: children per expanded node")
    ap.add_argument("--depth", type=int, default=0, help="with --dynamic: levels drafted (0: as deep as the "
                    "drafter goes, up to 6); each level is one more call of the drafter")
    ap.add_argument("--min-p", type=float, nargs="+", default=[0.0], help="with --dynamic and --prompts: "
                    "each size is measured with each of these min_p (drafted nodes below that probability "
                    "not verified, on eager CPU steps; 0: every node)")
    ap.add_argument("--out", type=Path, help="write the chosen tree's choices here (JSON)")
    args = ap.parse_args(argv)
    if not all(0 <= lookup < (args.budget or args.max_nodes) for lookup in args.lookup):
        ap.error("--lookup must be >= 0 and leave room for the root")
    if args.dynamic and args.prompts is None and args.budget is None:
        ap.error("--dynamic needs --prompts (to measure) or --budget: a dynamic tree has no estimate")
    measured_dynamic = args.dynamic and args.prompts is not None
    if len(args.lookup) > 1 and not measured_dynamic:
        ap.error("--lookup takes several sizes only with --dynamic and --prompts, which measure each")
    if not all(0 <= p < 1 for p in args.min_p) or (args.min_p != [0.0] and not measured_dynamic):
        ap.error("--min-p takes numbers in [0, 1), with --dynamic and --prompts")
    questions = None if args.prompts is None else [q.text for q in read_questions(args.prompts, args.limit)]
    if args.dynamic:
        result = calibrate_dynamic(args.heads, args.device, args.max_nodes, args.budget, tuple(args.lookup),
                                   args.topk, args.depth, args.dtype, questions, args.max_new_tokens,
                                   tuple(args.min_p))
        tree = {key: result[key] for key in ("dynamic", "topk", "depth", "lookup", "min_p") if key in result}
        nodes = result["dynamic"] + result["lookup"]
    else:
        lookup = args.lookup[0]
        result = calibrate(args.heads, args.device, args.max_nodes, args.context, args.repeats, args.budget,
                           lookup, args.dtype, questions, args.max_new_tokens)
        tree = {"choices": result["choices"], "lookup": lookup} if lookup else result["choices"]
        nodes = len(result["choices"]) + 1 + lookup
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(tree) + "\n")
        args.out.with_suffix(".calibration.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {nodes}-node tree to {args.out}")
