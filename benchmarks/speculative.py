"""Speculative decoding benchmark: transformers generate() vs our plain decoding vs Medusa, greedy.

    python -m benchmarks.speculative --prompts ../shared/data/spec_bench_dev.jsonl --limit 10 --json

Prompts are Spec-Bench questions (`benchmarks.spec_bench`), each wrapped in the model's chat
template when it has one, as the server wraps /generate inputs. Every mode runs on the same prompts
in this one process, one prompt at a time (batch 1), so the ratios printed are measured in one run;
the modes take turns prompt by prompt (`run_each`), so that the machine's drift slows them alike.
Greedy unless --temperature says otherwise: with it every mode samples (top-p as --top-p, top-k off,
each prompt seeded with --seed), speculation accepting losslessly; outputs then differ between modes,
so the summary gives no exact_match, and the llama.cpp anchor is skipped.
Medusa uses the heads shipped for the embedded model, or random heads for another model (engine
speed only: random heads rarely guess right); mode "eagle" drafts with the EAGLE-style draft layer
instead (`medusa.eagle`: the shipped one, or --eagle FOLDER), each with its own default tree.
Modes "plain-compiled", "medusa-compiled" and "eagle-compiled" run the same engines with their step
compiled (graphs built before timing), for a compiled-vs-eager ratio:

    python -m benchmarks.speculative --prompts ../shared/data/spec_bench_dev.jsonl --limit 10 \
        --modes plain,medusa,plain-compiled,medusa-compiled --json

Mode "llamacpp" is the anchor: llama.cpp (`llama-cpp-python`, the optional extra "llamacpp") on the
very GGUF file our model was converted from (the embedded model's, or --model's .gguf), fed the same
prompt token ids, greedy, as many threads as torch uses, batch 1, each prompt from an empty cache and
timed with its prefill. It multiplies the file's quantised weights whatever --dtype says, so its
output may differ from ours (`llamacpp_matches_plain` says how often it does not). It is skipped,
with a line saying why, when llama_cpp is not installed or --model is a folder rather than a GGUF file.

On CUDA, the summary's "syncs_per_step" counts each engine's host synchronisations per step over 8
steps of the first prompt, after the timed runs (one by design: the step's results).

On the CPU, with mode "plain" or "plain-compiled", the run also measures the read bound (`ReadBound`):
the tok/s that the bytes of the weights a token reads allow at the rate the machine reads memory,
measured beside each plain prompt; `plain_vs_read_bound` is plain decoding's share of it.

`--plot FILE.png` draws tok/s per Spec-Bench category, a bar per mode (`benchmarks.plots`, matplotlib:
the extra "plots"); the JSON's "per_category" holds the same figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmarks import engine as engine_benchmark
from benchmarks.spec_bench import Question, read_questions
from medusa.checkpoints import SHIPPED_HEADS, load_drafter, load_heads, shipped_drafter
from medusa.engine import Engine, use_compile
from medusa.heads import MedusaConfig, MedusaHeads, random_heads
from medusa.tree import default_tree, get_tree
from runtime.config import SamplingParams
from runtime.llama import Llama
from runtime.loading import LoadedModel, cpu_name, embedded_gguf_path, is_embedded, load_model
from runtime.prompt import Prompter


@dataclass
class ModeResult:
    outputs: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


# one mode on one prompt: (tokens, seconds, steps), timed from the prompt to the last token
Run = Callable[[list[int]], tuple[list[int], float, int]]


def run_each(runs: dict[str, Run], prompts: list[list[int]]) -> dict[str, ModeResult]:
    """Every prompt through every mode, prompt after prompt, each prompt's modes in an order that
    rotates. Run mode after mode instead, the ratios held the machine's drift: these CPUs' speed moves
    by 15% within minutes, and a mode timed in a slow minute came out slower than it is."""
    results = {mode: ModeResult() for mode in runs}
    modes = list(runs)
    for i, prompt in enumerate(prompts if modes else []):
        for mode in modes[i % len(modes):] + modes[:i % len(modes)]:
            tokens, seconds, steps = runs[mode](prompt)
            result = results[mode]
            result.outputs.append(tokens)
            result.seconds.append(seconds)
            result.steps.append(steps)
    return results


def hf_run(loaded: LoadedModel, max_new: int, sampling: SamplingParams | None = None) -> Run:
    """transformers' generate() on the model's own files: greedy, or sampling as `sampling` says (its
    temperature and top-p; top-k off, as ours)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=loaded.model.embed.weight.dtype)
    hf = hf.to(loaded.model.embed.weight.device).eval()
    eos = list(loaded.eos_token_ids)

    def run(prompt: list[int]) -> tuple[list[int], float, int]:
        ids = torch.tensor([prompt], device=hf.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                              eos_token_id=eos, pad_token_id=eos[0], **hf_sampling(sampling))
        tokens = out[0, len(prompt):].tolist()
        return tokens, time.perf_counter() - start, len(tokens)
    return run


def hf_sampling(sampling: SamplingParams | None) -> dict:
    """generate()'s arguments for our sampling parameters (greedy without them)."""
    if sampling is None or sampling.greedy:
        return {"do_sample": False}
    torch.manual_seed(sampling.seed or 0)
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}


def engine_run(engine: Engine, max_new: int, sampling: SamplingParams | None = None) -> Run:
    """Our engine, one prompt at a time, greedy or with `sampling`'s parameters; its steps are the
    Emitted after the prefill's."""
    params = dataclasses.replace(sampling or SamplingParams(), max_new_tokens=max_new)
    ids = itertools.count()

    def run(prompt: list[int]) -> tuple[list[int], float, int]:
        start = time.perf_counter()
        emitted = list(engine.run([(next(ids), prompt, params)]))
        seconds = time.perf_counter() - start
        return [token for e in emitted for token in e.token_ids], seconds, len(emitted) - 1
    return run


def syncs_per_step(engine: Engine, prompt: list[int], max_new: int, steps: int = 8) -> float:
    """Host synchronisations per step of one sequence's decoding, as CUDA's sync debug mode reports
    them (CUDA only): one by design, the copy of the step's results to the host."""
    engine.add("syncs", prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True))  # prefilled
    per_step = engine_benchmark.syncs_per_step(engine, steps)
    while engine.running:
        engine.step()
    return per_step


def run_engine(engine: Engine, prompts: list[list[int]], max_new: int) -> ModeResult:
    return run_each({"engine": engine_run(engine, max_new)}, prompts)["engine"]


class ReadBound:
    """The tok/s that decoding one sequence cannot pass on this CPU: the bytes of the weights each
    token's products read (every linear layer's, the lm_head's) over the rate the machine reads
    memory at, measured by one float32 dot product of a buffer of as many bytes with itself (more
    than the caches hold). Not a bf16 sum: converting each element bounds that one, not memory (AMX
    Xeon, 2 cores, 269 MB, same run: bf16 sum 17.0 GB/s, fp32 sum 24.0, fp32 dot 28.0; a bound
    taken with the sum let a decoder that reads at 20 GB/s look as if it beat it). These machines'
    rate moves by a third from minute to minute (17-31 GB/s on that CPU over two sessions), so
    `after` measures it beside each run of a mode, and the bound is their median."""

    def __init__(self, model: Llama) -> None:
        self.bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                         if isinstance(m, nn.Linear))
        self.buffer = torch.ones(self.bytes // 4)  # float32, paged in now, not when timed
        self.rates: list[float] = []  # bytes per second, one per reading

    def after(self, run: Run) -> Run:
        """`run`, then a reading of the read rate (not in the run's time)."""
        def timed(prompt: list[int]) -> tuple[list[int], float, int]:
            result = run(prompt)
            best = math.inf
            with torch.inference_mode():
                for _ in range(3):
                    start = time.perf_counter()
                    torch.dot(self.buffer, self.buffer)
                    best = min(best, time.perf_counter() - start)
            self.rates.append(self.bytes / best)
            return result
        return timed

    def summary(self, tok_s: dict) -> dict:
        """The bound and each plain mode's share of it (`tok_s`: the run's summary so far); printed too."""
        rate = statistics.median(self.rates)
        bound = rate / self.bytes
        out = {"read_bound_tok_s": round(bound, 2), "read_gb_s": round(rate / 1e9, 2),
               "weight_mb_per_token": round(self.bytes / 1e6, 1)}
        shares = {mode: round(tok_s[f"{mode}_tok_s"] / bound, 3) for mode in ("plain", "plain-compiled")
                  if f"{mode}_tok_s" in tok_s}
        out |= {f"{mode.replace('-', '_')}_vs_read_bound": share for mode, share in shares.items()}
        print(f"read bound: {bound:.1f} tok/s ({out['weight_mb_per_token']} MB of weights a token at "
              f"{out['read_gb_s']} GB/s, the median of {len(self.rates)} readings beside the plain runs); "
              + ", ".join(f"{mode} at {share}" for mode, share in shares.items()))
        return out


# our engine: plain decoding, Medusa heads, the EAGLE-style layer; "-compiled": the same with compile on,
# whatever --compile says
ENGINE_MODES = ("plain", "medusa", "eagle", "plain-compiled", "medusa-compiled", "eagle-compiled")
SPECULATIVE = ("medusa", "eagle")  # the modes with a drafter: accepted tokens per step, exact match
MODES = ("hf", *ENGINE_MODES, "llamacpp")
LLAMACPP_INSTALL = ("pip install -e '.[llamacpp]'; README, Benchmarks: the CMAKE_ARGS for a CPU where "
                    "the default native build crashes")


def gguf_file(model: str | None) -> Path | None:
    """The GGUF file a model spec is converted from (the file llama.cpp runs); None for a folder."""
    if is_embedded(model):
        return embedded_gguf_path()
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" else None


def llamacpp_skip_reason(model: str | None, sampled: bool = False) -> str | None:
    """Why mode "llamacpp" cannot run for this model spec here, or None when it can."""
    if sampled:
        return "the anchor decodes greedily only (--temperature 0)"
    try:
        import llama_cpp  # noqa: F401  (only asked whether it imports)
    except ImportError:
        return f"llama-cpp-python is not installed ({LLAMACPP_INSTALL})"
    if gguf_file(model) is None:
        return f"llama.cpp runs GGUF files and --model {model} is not one"
    return None


def llamacpp_run(gguf: Path, max_new: int, eos_token_ids: tuple[int, ...], max_total_tokens: int,
                 first_prompt: list[int]) -> Run:
    """llama.cpp on `gguf`, fed our prompt ids (no tokenizer of its own between), greedy, with torch's
    number of threads; each prompt timed from an empty cache, its prefill included."""
    from llama_cpp import Llama  # the optional extra "llamacpp": llamacpp_skip_reason checked it imports

    threads = torch.get_num_threads()
    llm = Llama(model_path=str(gguf), n_ctx=max_total_tokens, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    llamacpp_generate(llm, first_prompt, 1, eos_token_ids)  # not timed: pages the mapped weights in

    def run(prompt: list[int]) -> tuple[list[int], float, int]:
        start = time.perf_counter()
        output = llamacpp_generate(llm, prompt, max_new, eos_token_ids)
        return output, time.perf_counter() - start, len(output) - 1  # one prefill, then a decode per token
    return run


def run_llamacpp(gguf: Path, prompts: list[list[int]], max_new: int, eos_token_ids: tuple[int, ...],
                 max_total_tokens: int) -> ModeResult:
    run = llamacpp_run(gguf, max_new, eos_token_ids, max_total_tokens, prompts[0])
    return run_each({"llamacpp": run}, prompts)["llamacpp"]


def llamacpp_generate(llm, prompt: list[int], max_new: int, eos_token_ids: tuple[int, ...]) -> list[int]:
    """Greedy tokens of `llm` (a llama_cpp.Llama) after `prompt`, to the first EOS (kept, as our engine
    keeps it) or `max_new`."""
    llm.reset()  # else generate() reuses the cache of the previous prompt's common prefix (system prompt)
    output = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        output.append(token)
        if token in eos_token_ids or len(output) == max_new:
            break
    return output


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
    ap.add_argument("--eagle", help="draft layer folder for mode eagle (default: the shipped one)")
    ap.add_argument("--tree", help="tree name, JSON file or dynamic:N[,topk=K,depth=D,lookup=L] (default: "
                    "the one shipped for the drafter, device and dtype, `medusa.tree.default_tree`)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="our engine's step through torch.compile, its graphs built before timing "
                         "(auto: on for CUDA, off on the CPU)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (0: greedy); the llama.cpp anchor decodes greedily only")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass, with --temperature")
    ap.add_argument("--seed", type=int, default=0, help="each prompt's sampling seed, the same in every mode")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", type=Path, help="write a chart of tok/s per category and mode to this PNG")
    args = ap.parse_args(argv)
    if not (0 <= args.temperature < math.inf and 0 < args.top_p <= 1):
        ap.error("--temperature must be a finite number >= 0 and --top-p in (0, 1]")
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        ap.error(f"unknown mode {', '.join(unknown)} (choose from {', '.join(MODES)})")
    if args.plot:
        from benchmarks import plots  # now: where matplotlib is missing, this stops before the run, not after
    with torch.no_grad():  # (not set globally: tests call main in their own process)
        summary = benchmark(args)
    if args.plot and "per_category" in summary:
        plots.speculative_chart(summary, args.plot, chart_title(summary, args, cpu_name()))
    elif args.plot:
        print(f"no chart written to {args.plot}: no mode ran")
    if args.json:
        print(json.dumps(summary))
    return summary


def benchmark(args: argparse.Namespace) -> dict:
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    questions = read_questions(args.prompts, args.limit)
    prompter = Prompter(loaded.tokenizer, chat_template=True)
    prompts = [prompter.encode(q.text) for q in questions]
    max_total = max(len(p) for p in prompts) + args.max_new_tokens
    runs: dict[str, Run] = {}
    engines: dict[str, Engine] = {}
    skipped: dict[str, str] = {}
    notes: dict[str, str] = {}  # drafter mode -> its weights and tree
    warm_up_s: dict[str, float] = {}
    compile = use_compile(args.compile, args.device)
    model = loaded.model
    sampling = (SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
                if args.temperature > 0 else None)
    for mode in args.modes.split(","):
        if mode == "hf":
            runs[mode] = hf_run(loaded, args.max_new_tokens, sampling)
        elif mode in ENGINE_MODES:
            heads = tree = None
            drafter = mode.removesuffix("-compiled")
            if drafter in SPECULATIVE:
                kind = "eagle" if drafter == "eagle" else "heads"
                tree_name = args.tree or default_tree(args.device, loaded.dtype_name, kind)
                if drafter == "medusa":
                    heads, note = get_heads(loaded, args.medusa_heads, args.model)
                else:
                    note = args.eagle or str(shipped_drafter("eagle", loaded.dtype_name))
                    heads = load_drafter(note, model.config, model.lm_head, device=model.embed.weight.device,
                                         dtype=model.embed.weight.dtype)
                notes[drafter] = f"{note}; tree: {tree_name}"
                tree = get_tree(tree_name)
            engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, max_batch_size=1,
                            max_total_tokens=max_total, heads=heads, tree=tree,
                            compile=compile or mode.endswith("-compiled"))
            started = time.perf_counter()
            engine.warm_up()  # not timed: a server does it before it listens
            warm_up_s[mode] = round(time.perf_counter() - started, 1)
            runs[mode] = engine_run(engine, args.max_new_tokens, sampling)
            engines[mode] = engine
        else:  # "llamacpp" (main checked the modes)
            skip_reason = llamacpp_skip_reason(args.model, sampled=sampling is not None)
            if skip_reason is None:
                runs[mode] = llamacpp_run(gguf_file(args.model), args.max_new_tokens, loaded.eos_token_ids,
                                          max_total, prompts[0])
            else:
                print(f"{mode} skipped: {skip_reason}")
                skipped[mode] = skip_reason
    bound = None
    plain_modes = [mode for mode in ("plain", "plain-compiled") if mode in runs]
    if args.device == "cpu" and plain_modes:
        bound = ReadBound(model)
        for mode in plain_modes:
            runs[mode] = bound.after(runs[mode])
    results = run_each(runs, prompts)

    summary = report(questions, results, notes)
    summary["prompts"] = len(questions)
    summary |= {"model": loaded.model_id, "dtype": loaded.dtype_name, "max_new_tokens": args.max_new_tokens}
    if sampling is not None:  # outputs differ from mode to mode: each spends its uniforms its own way
        summary = {k: v for k, v in summary.items() if not k.endswith(("exact_match", "matches_hf"))}
        summary |= {"temperature": args.temperature, "top_p": args.top_p}
    summary["compile"] = compile
    if bound is not None:  # plain decoding against what this CPU's memory allows, in this run
        summary |= bound.summary(summary)
    for mode in ("plain", *SPECULATIVE):  # the same engine compiled, in this run
        if mode in results and f"{mode}-compiled" in results:
            summary[f"{mode}_compiled_vs_eager"] = round(summary[f"{mode}-compiled_tok_s"]
                                                         / summary[f"{mode}_tok_s"], 3)
            summary[f"{mode}_compiled_matches_eager"] = same_share(results[mode], results[f"{mode}-compiled"])
    if any(warm_up_s.values()):
        summary["warm_up_s"] = warm_up_s
    if args.device.startswith("cuda"):
        summary["syncs_per_step"] = {mode: syncs_per_step(engine, prompts[0], args.max_new_tokens)
                                     for mode, engine in engines.items()}
    if skipped:
        summary["skipped"] = skipped
    return summary


def chart_title(summary: dict, args: argparse.Namespace, cpu_name: str) -> str:
    """What the run measured: the model, its dtype, the processor, the prompts and the tokens asked for."""
    if args.device.startswith("cuda"):
        processor = torch.cuda.get_device_name(args.device)
    else:
        processor = f"{cpu_name}, {torch.get_num_threads()} threads"
    return (f"{summary['model']}, {summary['dtype']}, {processor}\n{summary['prompts']} Spec-Bench prompts, "
            f"greedy, batch 1, up to {summary['max_new_tokens']} new tokens each")


def same_share(a: ModeResult, b: ModeResult) -> float:
    """The share of prompts on which two modes output the same tokens."""
    return sum(map(list.__eq__, a.outputs, b.outputs)) / len(a.outputs)


def report(questions: list[Question], results: dict[str, ModeResult], notes: dict[str, str]) -> dict:
    for drafter, note in notes.items():
        print(f"{drafter}: {note}")
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_cat[q.category].append(i)

    def tok_s(mode: str, idx: list[int]) -> float:
        res = results[mode]
        return sum(len(res.outputs[i]) for i in idx) / sum(res.seconds[i] for i in idx)

    def accepted(mode: str, idx: list[int]) -> float:
        res = results[mode]
        return sum(len(res.outputs[i]) - 1 for i in idx) / max(1, sum(res.steps[i] for i in idx))

    def prefix(mode: str) -> str:  # Medusa's keys keep their first names; the draft layer's say "eagle_"
        return "" if mode == "medusa" else f"{mode}_"

    if not results:  # every mode asked for was skipped
        return {}
    drafters = [m for m in SPECULATIVE if m in results]
    width = {m: max(14, len(m) + 8) for m in results}  # a column per mode, its name + " tok/s" and a gap
    header = "category".ljust(16) + "".join(f"{m + ' tok/s':>{width[m]}}" for m in results)
    header += "".join(f"{m + ' accepted/step':>{len(m) + 16}}" for m in drafters)
    print(header)
    for name, idx in [*sorted(by_cat.items()), ("overall", list(range(len(questions))))]:
        line = name.ljust(16) + "".join(f"{tok_s(m, idx):{width[m]}.1f}" for m in results)
        line += "".join(f"{accepted(m, idx):{len(m) + 16}.2f}" for m in drafters)
        print(line)

    all_idx = list(range(len(questions)))
    summary: dict = {f"{m}_tok_s": round(tok_s(m, all_idx), 2) for m in results}
    summary["per_category"] = {
        name: {"prompts": len(idx), "tok_s": {m: round(tok_s(m, idx), 2) for m in results}}
        | {f"{prefix(m)}mean_accepted_tokens": round(accepted(m, idx), 3) for m in drafters}
        for name, idx in sorted(by_cat.items())}
    for mode in drafters:
        summary[f"{prefix(mode)}mean_accepted_tokens"] = round(accepted(mode, all_idx), 3)
        summary.setdefault("new_tokens", sum(len(o) for o in results[mode].outputs))
        for base in ("plain", "hf"):
            if base in results:
                summary[f"{prefix(mode)}speedup_vs_{base}"] = round(summary[f"{mode}_tok_s"]
                                                                    / summary[f"{base}_tok_s"], 3)
        if "plain" in results:
            summary[f"{prefix(mode)}exact_match"] = same_share(results[mode], results["plain"])
    if "plain" in results and "hf" in results:
        summary["plain_vs_hf"] = round(summary["plain_tok_s"] / summary["hf_tok_s"], 3)
        summary["plain_matches_hf"] = same_share(results["plain"], results["hf"])
    if "llamacpp" in results:
        for ours in (*SPECULATIVE, "plain"):
            if ours in results:
                summary[f"{ours}_vs_llamacpp"] = round(summary[f"{ours}_tok_s"]
                                                       / summary["llamacpp_tok_s"], 3)
        if "plain" in results:  # informative: llama.cpp multiplies quantised weights, ours de-quantised ones
            summary["llamacpp_matches_plain"] = same_share(results["llamacpp"], results["plain"])
    summary.setdefault("new_tokens", sum(len(o) for o in next(iter(results.values())).outputs))
    return summary


if __name__ == "__main__":
    main()
