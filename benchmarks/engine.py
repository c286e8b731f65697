"""Engine benchmark: the whole decoding step against transformers `generate()`, on random weights.

    python -m benchmarks.engine [--parts decode,verify,syncs] [--shapes llama2-7b,llama3-8b]
                                [--device cuda|cpu] [--dtype bfloat16] [--compile off,on] [--tiny] [--json]

Parts; every case is guarded (a failure prints its row with "error" and the part goes on):
  decode  tok/s of plain greedy decoding at batch 1, 8, 32 (64-token prompts, 128 new tokens, EOS
          ignored; the wall time of the whole call, prefill included) for each shape, all on the same
          weights in one process: transformers `generate()` eager (`hf`), our engine with compile off
          (`ours`) and on (`ours_compiled`), and `generate()` with a static cache whose one-token
          step transformers compiles (`hf_compiled`: torch.compile fullgraph, mode reduce-overhead,
          prefill eager: the gpt-fast style); then one `decode_ratio` row per batch
  verify  ms of one verification of T = 1, 16, 64 tree nodes (the first T - 1 choices of
          `mc_sim_7b_63`) after 512 cached tokens, batch 1, first shape: our model's forward and logits
          alone (`forward`), and a whole engine step with random heads drafting the tree (`step`, per
          compile setting); `vs_T1`: against T = 1 of the same kind
  syncs   host synchronisations per engine step of the same engines, counted on CUDA by
          `torch.cuda.set_sync_debug_mode("warn")`; "n/a" on the CPU

Weights: transformers' LlamaForCausalLM of the shape with its random initialisation, converted into
ours by `runtime.llama.from_hf_state_dict` (tensors shared where the layouts agree); speed does not
depend on the values. Cases run cheap and important first. The exit status is 1 if a case failed;
on SIGTERM (`timeout`) the case under way prints "error", the `decode_ratio` rows of what was
measured are printed, and the exit status is 1 too.
On the CPU, `hf_compiled` is traced by dynamo with the eager backend (the graph is checked, nothing is
built), and our engine runs compile off only unless --compile asks (building its graphs takes minutes).
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch
import transformers
from accelerate import init_empty_weights

from benchmarks.attention import timed
from medusa.engine import Engine
from medusa.heads import MedusaConfig, MedusaHeads, random_heads
from medusa.tree import MC_SIM_7B_63, TreeBuffers, build_tree
from runtime.config import ModelConfig, SamplingParams
from runtime.llama import Llama, from_hf_state_dict
from runtime.loading import DTYPES, torch_dtype

SHAPES = {
    "llama2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, num_kv_heads=32, head_dim=128),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                             num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                             max_position_embeddings=8192),
}
TINY_SHAPES = {  # the same families at 2 layers, hidden 64: a dry run in seconds
    "llama2-7b": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
                             num_kv_heads=4, head_dim=16),
    "llama3-8b": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, rope_theta=500000.0),
}
PROMPT_TOKENS, NEW_TOKENS, BATCHES = 64, 128, (1, 8, 32)
TINY_PROMPT_TOKENS, TINY_NEW_TOKENS, TINY_BATCHES = 8, 8, (1, 2)
CONTEXT, TINY_CONTEXT = 512, 32  # cached tokens before a verification
TREE_SIZES = (1, 16, 64)  # T
STEPS, TINY_STEPS = 10, 3  # engine steps timed, and counted for syncs, per case
WARM_UP_TOKENS = 8
Built = TypeVar("Built")


class OutOfTime(BaseException):
    """SIGTERM arrived (the script's `timeout`): not an Exception, so no case guard swallows it."""


def out_of_time(signum, frame) -> None:
    raise OutOfTime


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_seconds(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def hf_llama(config: ModelConfig, device: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """transformers' Llama of this shape with its random initialisation, made on the device."""
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    hf.generation_config.eos_token_id = None  # random weights: every row runs to max_new_tokens
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def hf_and_ours(config: ModelConfig, device: str, dtype: torch.dtype
                ) -> tuple[transformers.PreTrainedModel, Llama]:
    """transformers' model and ours on the same weights (ours made on the meta device, then given
    the converted tensors: no second random initialisation)."""
    hf = hf_llama(config, device, dtype)
    with init_empty_weights():
        ours = Llama(config)
    ours.load_state_dict(from_hf_state_dict(config, hf.state_dict()), assign=True)
    return hf, ours.to(device).eval().prepare_for_serving()


def hf_compile_config(device: str) -> transformers.CompileConfig:
    """How `generate` compiles its one-token step with a static cache: on CUDA, inductor with CUDA
    graphs; on the CPU (a dry run), dynamo's trace alone, which transformers skips unless told."""
    if device == "cuda":
        return transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    config = transformers.CompileConfig(fullgraph=True, mode=None, backend="eager")
    config._compile_all_devices = True  # transformers' own switch for compiling off CUDA (its tests)
    return config


def hf_tok_s(hf: transformers.PreTrainedModel, prompts: torch.Tensor, new_tokens: int,
             compiled: bool) -> dict:
    """tok/s of transformers' `generate()`, greedy, for prompts [B, S] on the model's device."""
    B, S = prompts.shape
    kwargs = dict(attention_mask=torch.ones_like(prompts), do_sample=False)
    if compiled:
        kwargs.update(cache_implementation="static", compile_config=hf_compile_config(prompts.device.type))
    # the compiled warm-up runs the timed length, so the static cache is reused, not rebuilt and recompiled
    warm_up_s = wall_seconds(lambda: hf.generate(prompts, max_new_tokens=new_tokens if compiled else
                                                 WARM_UP_TOKENS, **kwargs), prompts.device.type)
    out = []
    seconds = wall_seconds(lambda: out.append(hf.generate(prompts, max_new_tokens=new_tokens, **kwargs)),
                           prompts.device.type)
    generated = B * (out[0].shape[1] - S)
    return dict(tok_s=round(generated / seconds, 2), new_tokens=generated, seconds=round(seconds, 3),
                warm_up_s=round(warm_up_s, 2))


def ours_tok_s(engine: Engine, prompts: list[list[int]], new_tokens: int, device: str) -> dict:
    """tok/s of our engine's `generate()`, greedy, for B prompts (all in the engine at once)."""
    warm_up_s = wall_seconds(lambda: engine.generate(
        prompts, SamplingParams(max_new_tokens=WARM_UP_TOKENS, ignore_eos=True)), device)
    out = []
    seconds = wall_seconds(lambda: out.append(engine.generate(
        prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))), device)
    generated = sum(len(tokens) for tokens in out[0])
    return dict(tok_s=round(generated / seconds, 2), new_tokens=generated, seconds=round(seconds, 3),
                warm_up_s=round(warm_up_s, 2))


class Runner:
    """Prints rows; runs each case guarded."""

    def __init__(self, device: str, as_json: bool) -> None:
        self.device = device
        self.as_json = as_json
        self.failed = 0  # cases that raised

    def emit(self, row: dict) -> None:
        row = {k: v for k, v in row.items() if v is not None}
        if self.as_json:
            print(json.dumps(row), flush=True)
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    def case(self, row: dict, fn: Callable[[], dict]) -> dict | None:
        """Print `row` with fn's results, or with "error" if fn raised; return the results or None."""
        try:
            result = fn()
        except OutOfTime:
            self.emit({**row, "error": "out of time (SIGTERM)"})
            raise
        except Exception as e:  # one failing case must not end its part
            traceback.print_exc(file=sys.stderr)
            self.emit({**row, "error": f"{type(e).__name__}: {e}"})
            self.failed += 1
            return None
        self.emit({**row, **result})
        return result

    def build(self, row: dict, make: Callable[[], Built]) -> Built | None:
        """Models or an engine (warmed up) made as a case of its own, whose row says how long that took."""
        made: list[Built] = []

        def timed_make() -> dict:
            return dict(seconds=round(wall_seconds(lambda: made.append(make()), self.device), 2))

        return made[0] if self.case(row, timed_make) is not None else None


def free_memory() -> None:
    """Drop what earlier cases compiled (graphs, CUDA graph pools, and dynamo's count of recompilations
    per function, which the steps of all engines share) and return cached memory to the device."""
    gc.collect()
    torch.compiler.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def new_engine(model: Llama, compile: bool, max_batch_size: int, max_total_tokens: int,
               heads: MedusaHeads | None = None, tree: TreeBuffers | None = None) -> Engine:
    """An engine with its graphs built (`warm_up`), as a server starts one."""
    if compile:
        free_memory()
    engine = Engine(model, None, [], max_batch_size=max_batch_size, max_total_tokens=max_total_tokens,
                    heads=heads, tree=tree, compile=compile)
    engine.warm_up()
    return engine


def decode_part(name: str, config: ModelConfig, args, runner: Runner) -> None:
    """Plain decoding tok/s by batch: transformers eager, ours (per compile setting), transformers
    compiled; then ours against transformers, per batch."""
    batches, prompt_len, new_tokens = ((TINY_BATCHES, TINY_PROMPT_TOKENS, TINY_NEW_TOKENS) if args.tiny
                                       else (BATCHES, PROMPT_TOKENS, NEW_TOKENS))
    device = args.device
    base = dict(part="decode", shape=name, dtype=args.dtype)
    models = runner.build(dict(base, event="models"),
                          partial(hf_and_ours, config, device, torch_dtype(args.dtype)))
    if models is None:
        return
    hf, ours = models
    prompts = torch.randint(1, config.vocab_size, (max(batches), prompt_len),
                            generator=torch.Generator().manual_seed(0))  # [B, S]
    impls = ["hf"] + [{False: "ours", True: "ours_compiled"}[c] for c in args.compile] + ["hf_compiled"]
    tok_s: dict[tuple[str, int], float] = {}
    try:
        for impl in impls:  # transformers' compilation goes last: the slowest to start
            if impl.startswith("ours"):  # one engine for every batch, as a server runs
                engine = runner.build(dict(base, impl=impl, event="engine_warm_up"), partial(
                    new_engine, ours, impl == "ours_compiled", max(batches), prompt_len + new_tokens))
                if engine is None:
                    continue
                measure = partial(ours_tok_s, engine, new_tokens=new_tokens, device=device)
                as_input = torch.Tensor.tolist
            else:
                measure = partial(hf_tok_s, hf, new_tokens=new_tokens, compiled=impl == "hf_compiled")
                as_input = partial(torch.Tensor.to, device=device)
            for B in batches:
                result = runner.case(dict(base, batch=B, impl=impl), partial(measure, as_input(prompts[:B])))
                if result is not None:
                    tok_s[impl, B] = result["tok_s"]
    finally:
        pairs = [(a, b) for a in impls if a.startswith("ours") for b in ("hf", "hf_compiled")]
        pairs += [("ours_compiled", "ours")] if "ours_compiled" in impls else []
        for B in batches:
            runner.emit(dict(part="decode_ratio", shape=name, batch=B, **{
                f"{a}_vs_{b}": round(tok_s[a, B] / tok_s[b, B], 3) for a, b in pairs
                if (a, B) in tok_s and (b, B) in tok_s}))


def tree_of(num_nodes: int) -> TreeBuffers:
    """A tree of T nodes: the root and the first T - 1 choices of Medusa's mc_sim_7b_63 (in its
    order, most likely first, so that every prefix is a tree)."""
    return build_tree(MC_SIM_7B_63[:num_nodes - 1], name=f"mc_sim_7b_63[:{num_nodes - 1}]")


def forward_ms(model: Llama, num_nodes: int, context: int, device: str) -> float:
    """One forward, and its logits, of T tree nodes of one sequence after `context` cached tokens."""
    V = model.config.vocab_size
    tree = tree_of(num_nodes).to(device)
    cache = model.new_cache(1, context + num_nodes)
    slots = torch.zeros(1, dtype=torch.long, device=device)  # [1]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(V, (1, context), generator=gen).to(device)  # [1, S]
    model(prompt, torch.arange(context, device=device)[None], cache, slots, None, context)
    cache.advance(slots, context)
    tokens = torch.randint(V, (1, num_nodes), generator=gen).to(device)  # [1, T]
    positions = context + tree.depths[None]  # [1, T]
    mask = tree.mask if num_nodes > 1 else None  # [T, T]
    S = context + num_nodes
    return 1e3 * timed(lambda: model.logits(model(tokens, positions, cache, slots, mask, S)), device,
                       budget_s=0.2)


def step_engine(model: Llama, heads: MedusaHeads, num_nodes: int, compile: bool, prompt: list[int],
                steps: int) -> Engine:
    """An engine that verifies a tree of T nodes a step (drafted by `heads`; T = 1: plain decoding),
    with one running request that `steps` steps, four times over, do not end."""
    tree = tree_of(num_nodes)
    new_tokens = 1 + (tree.depth + 1) * 4 * steps  # a step emits at most depth + 1 tokens
    speculative = dict(heads=heads, tree=tree) if num_nodes > 1 else {}
    engine = new_engine(model, compile, 1, len(prompt) + new_tokens, **speculative)
    engine.add(0, prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    for _ in range(steps):
        engine.step()
    return engine


def step_ms(engine: Engine, steps: int, device: str) -> float:
    return 1e3 * wall_seconds(lambda: [engine.step() for _ in range(steps)], device) / steps


def syncs_per_step(engine: Engine, steps: int) -> float:
    """Host synchronisations per engine step, as CUDA's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return round(sum("synchroniz" in str(w.message) for w in caught) / steps, 2)


def with_ratio(ms: float, num_nodes: int, by_size: dict[int, float]) -> dict:
    """{"ms", "vs_T1"}; remembers ms for the ratios of the sizes after it."""
    by_size[num_nodes] = ms
    return dict(ms=round(ms, 3), vs_T1=round(ms / by_size[1], 3) if 1 in by_size else None)


def step_parts(name: str, config: ModelConfig, parts: list[str], args, runner: Runner) -> None:
    """verify (forward and engine step ms by tree size) and syncs (per engine step), on one model."""
    device = args.device
    context, steps = (TINY_CONTEXT, TINY_STEPS) if args.tiny else (CONTEXT, STEPS)
    base = dict(shape=name, batch=1, context=context, dtype=args.dtype)
    models = runner.build(dict(part=parts[0], event="models", **base),
                          partial(hf_and_ours, config, device, torch_dtype(args.dtype)))
    if models is None:
        return
    model = models[1]
    del models  # transformers' model: the tensors ours shares stay
    if "verify" in parts:
        forward: dict[int, float] = {}
        for T in TREE_SIZES:
            runner.case(dict(part="verify", level="forward", T=T, **base),
                        lambda T=T: with_ratio(forward_ms(model, T, context, device), T, forward))
    heads = random_heads(MedusaConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size), seed=0)
    heads = heads.to(device, model.embed.weight.dtype)
    prompt = torch.randint(config.vocab_size, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    for compile in args.compile:
        by_size: dict[int, float] = {}
        for T in TREE_SIZES:
            row = dict(T=T, compile=compile, **base)
            engine = runner.build(dict(part=parts[0], level="step", event="engine_warm_up", **row),
                                  partial(step_engine, model, heads, T, compile, prompt, steps))
            if engine is None:
                continue
            if "verify" in parts:
                runner.case(dict(part="verify", level="step", **row), lambda e=engine, T=T, sizes=by_size:
                            with_ratio(step_ms(e, steps, device), T, sizes))
            if "syncs" in parts:
                runner.case(dict(part="syncs", **row), lambda e=engine: dict(
                    steps=steps, syncs_per_step=syncs_per_step(e, steps) if device == "cuda" else "n/a"))


def main(argv: list[str] | None = None) -> int:
    """The exit status: 1 when a case failed or SIGTERM cut the run short, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="decode,verify,syncs",
                        help="comma-separated: decode, verify, syncs")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated, of {', '.join(SHAPES)}; verify and syncs use the first")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--compile", choices=("off", "on", "off,on"), default=None,
                        help="our engine's compile settings to measure (default: off,on on cuda, off on cpu)")
    parser.add_argument("--tiny", action="store_true", help="2-layer hidden-64 shapes, few tokens: a dry run")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.compile = [mode == "on" for mode in (args.compile or ("off,on" if args.device == "cuda" else "off"))
                    .split(",")]
    parts, names = args.parts.split(","), args.shapes.split(",")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    unknown = sorted(set(parts) - {"decode", "verify", "syncs"}) + sorted(set(names) - set(shapes))
    if unknown:
        parser.error(f"unknown part or shape: {', '.join(unknown)}")
    previous_handler = signal.signal(signal.SIGTERM, out_of_time)
    runner = Runner(args.device, args.json)
    try:
        with torch.no_grad():  # (not set globally: tests call main in their own process)
            if "decode" in parts:
                for name in names:
                    decode_part(name, shapes[name], args, runner)
                    free_memory()
            step = [part for part in parts if part in ("verify", "syncs")]
            if step:
                step_parts(names[0], shapes[names[0]], step, args, runner)
    except OutOfTime:
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
