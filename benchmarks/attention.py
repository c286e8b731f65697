"""Attention benchmark: our dispatch against SDPA with an explicit mask and against the naive version.

    python -m benchmarks.attention [--tiny] [--device cuda|cpu] [--dtype bfloat16|float16|float32] [--json]
    python -m benchmarks.attention --device cpu --backend cpu --dtype bfloat16   # our CPU kernel
    python -m benchmarks.attention --check    # correctness of our kernels vs naive; exit status 1 on a FAIL
    python -m benchmarks.attention --sweep    # launch configurations of the Triton kernel

Each case: B sequences, each with `context` cached tokens in its own slot, verifying T new tokens
(T = 1: plain decoding, causal; T > 1: a random tree mask). Implementations:
  ours   attention.attend (Triton on CUDA, the PyTorch path on the CPU, or `--backend cpu`: our CPU
         kernel, what serving on a CPU attends with); like sdpa's mask, the plan is built once per
         forward for all layers, so it is outside the timing
  sdpa   F.scaled_dot_product_attention with a dense boolean mask [B, 1, T, S], K/V as views of
         consecutive slots (its best case: no gather)
  naive  attention.reference.naive_attention (float32)
Bandwidth counts the K/V bytes a sequence must read, B * (context + T) * Hkv * D * 2 * itemsize,
over the time; `of_peak` is that against the H200's 4.3 TB/s. Each result also carries the max
difference from the naive output, absolute and relative (where |x| > 1). Output: a table, or JSON
lines with --json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attention import attend, plan
from attention.masks import dense_mask
from attention.reference import naive_attention
from runtime import cpu_kernels
from runtime.loading import DTYPES, torch_dtype

PEAK_BYTES_PER_S = 4.3e12  # H200 HBM3e
# --check: the largest relative difference from the naive float32 output that passes
TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}
# name: (query heads, KV heads, head dim)
MODELS = {"llama2-7b": (32, 32, 128), "smollm2-135m": (9, 3, 64)}
TINY_MODELS = {"smollm2-135m": (9, 3, 64)}


@dataclass
class Case:
    model: str
    batch: int
    context: int  # cached tokens per sequence (ragged: the last sequence has none)
    num_new: int  # T
    dtype: str
    mask: str = "tree"  # of the T > 1 new tokens: "tree" (random) or "causal"
    ragged: bool = False  # lengths context, ~2/3 of it, ..., 0 in scattered slots (else all equal, in order)


def tree_mask(num_nodes: int, gen: torch.Generator) -> torch.Tensor:
    """[T, T] ancestor mask of a random tree (node i's parent among nodes 0 .. i - 1)."""
    mask = torch.eye(num_nodes, dtype=torch.bool)
    for node in range(1, num_nodes):
        mask[node] |= mask[int(torch.randint(0, node, (1,), generator=gen))]
    return mask


def make_inputs(case: Case, device: str, seed: int = 0):
    """q [B, H, T, D]; caches [N, Hkv, S_max, D]; slots, cache_lens [B]; new_mask [T, T] or None."""
    H, Hkv, D = MODELS[case.model]
    B, T = case.batch, case.num_new
    gen = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(case.dtype)
    S_max = case.context + T
    N = 2 * B if case.ragged else B
    k_cache = torch.randn(N, Hkv, S_max, D, dtype=dtype, device=device)
    v_cache = torch.randn(N, Hkv, S_max, D, dtype=dtype, device=device)
    q = torch.randn(B, T, H, D, dtype=dtype, device=device).transpose(1, 2)  # the runtime's layout
    if case.ragged:
        slots = torch.arange(N - 1, 0, -2, device=device)
        lens = [case.context * (B - 1 - b) // max(B - 1, 1) for b in range(B)]
        cache_lens = torch.tensor(lens, device=device)
    else:
        slots = torch.arange(B, device=device)
        cache_lens = torch.full((B,), case.context, device=device)
    new_mask = None if T == 1 or case.mask == "causal" else tree_mask(T, gen).to(device)
    return q, k_cache, v_cache, slots, cache_lens, new_mask


def timed(fn: Callable[[], torch.Tensor], device: str, budget_s: float = 0.05) -> float:
    """Median seconds per call: warm up, then repeat within about budget_s."""
    fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start
    reps = max(3, min(100, int(budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_case(case: Case, device: str, impls: tuple[str, ...] = ("ours", "sdpa", "naive"),
             time_it: bool = True, **kernel_args):
    """One result row per implementation: time, bandwidth, and max abs difference from naive."""
    q, k_cache, v_cache, slots, cache_lens, new_mask = make_inputs(case, device)
    B, H, T, D = q.shape
    Hkv = k_cache.shape[1]
    S = int(cache_lens.max()) + T
    visible = dense_mask(cache_lens, new_mask, T, S)  # [B, 1, T, S]

    batch = plan(slots, cache_lens, T, new_mask, S, **kernel_args)  # once per forward, like sdpa's mask

    def ours():
        return attend(q, k_cache, v_cache, batch)

    def sdpa():
        assert not case.ragged  # K/V as views of slots 0 .. B - 1
        return F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], attn_mask=visible,
                                              enable_gqa=Hkv != H)

    def naive():
        return naive_attention(q, k_cache[slots, :, :S], v_cache[slots, :, :S], visible)

    fns = {"ours": ours, "sdpa": sdpa, "naive": naive}
    expected = naive().float()
    kv_bytes = int((cache_lens + T).sum()) * Hkv * D * 2 * q.element_size()
    for impl in impls:
        row = dict(asdict(case), impl=impl, **kernel_args)
        if impl == "ours":
            row["backend"] = batch.backend
        else:
            row.pop("backend", None)
        if time_it:
            seconds = timed(fns[impl], device)
            row.update(ms=round(seconds * 1e3, 4), gb_per_s=round(kv_bytes / seconds / 1e9, 1),
                       of_peak=round(kv_bytes / seconds / PEAK_BYTES_PER_S, 3))
        error = (fns[impl]().float() - expected).abs()
        row["max_err"] = float(error.max())
        row["max_rel_err"] = float((error / expected.abs().clamp_min(1.0)).max())  # relative where |x| > 1
        yield row


def bench_cases(tiny: bool, dtype: str, backend: str | None = None) -> list[Case]:
    if tiny:
        shapes = itertools.product(TINY_MODELS, (1, 2), (64,), (1, 4))
        return [Case(m, b, c, t, dtype) for m, b, c, t in shapes]
    if backend == "cpu":  # what a CPU serves: the embedded model, a token or a CPU tree, a few sequences
        return [Case("smollm2-135m", b, c, t, dtype)
                for b, c, t in itertools.product((1, 4), (300, 1000, 2000), (1, 8))]
    return [Case(m, b, c, t, dtype)
            for m, b, c, t in itertools.product(MODELS, (1, 8, 32), (512, 2048, 8192), (1, 16, 64))]


def check_cases(tiny: bool, backend: str | None = None, dtype: str | None = None) -> list[tuple[Case, dict]]:
    """Correctness on the device: dtypes (all, or `dtype`), head dims, GQA, tree and causal masks,
    ragged lengths (0 included) in scattered slots, forced splits (Triton's), and a prefill of many
    query tiles. Our CPU kernel takes float32 and bfloat16 only."""
    contexts = (77,) if tiny else (77, 1000)
    dtypes = (dtype,) if dtype else ("float32", "bfloat16") if backend == "cpu" else DTYPES
    cases = []
    for dtype, model, context, T in itertools.product(dtypes, MODELS, contexts, (1, 7, 63)):
        for mask in ("tree", "causal") if T > 1 else ("causal",):
            cases.append((Case(model, 3, context, T, dtype, mask, ragged=True), {}))
        if backend != "cpu":
            cases.append((Case(model, 3, context, T, dtype, ragged=True), {"num_splits": 3}))
    for dtype in dtypes:
        cases.append((Case("smollm2-135m", 1, 0, 130 if tiny else 1000, dtype, "causal"), {}))
        cases.append((Case("llama2-7b", 2, 40, 130 if tiny else 1000, dtype, "causal"), {}))
    return cases


def sweep_cases(tiny: bool, dtype: str) -> list[tuple[Case, dict]]:
    """Launch configurations (and split counts) at the shapes that matter most."""
    out = []
    if tiny:
        shapes = [Case("smollm2-135m", 1, 100, 1, dtype), Case("smollm2-135m", 2, 50, 8, dtype)]
        configs, splits = [(16, 4, 2), (32, 8, 3)], (1, 2)
    else:
        shapes = [Case("llama2-7b", 1, 8192, 1, dtype), Case("llama2-7b", 8, 8192, 1, dtype),
                  Case("llama2-7b", 8, 2048, 64, dtype)]
        configs, splits = list(itertools.product((32, 64, 128), (4, 8), (2, 3))), (1, 4, 8, 16, 32)
    for case in shapes:
        for block_n, num_warps, num_stages in configs:
            out.append((case, dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages)))
        if case.num_new == 1:
            out.extend((case, dict(num_splits=s)) for s in splits)
    return out


def run_tuned(case: Case, device: str, block_n: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None, num_splits: int | None = None) -> dict:
    """Our Triton kernel alone with an explicit launch configuration."""
    from attention import triton_kernels

    q, k_cache, v_cache, slots, cache_lens, new_mask = make_inputs(case, device)
    B, H, T, D = q.shape
    S = case.context + T  # slots in order, all of the same length
    batch = plan(slots, cache_lens, T, new_mask, S, backend="triton")

    def ours():
        return triton_kernels.attend(q, k_cache, v_cache, batch.slots, batch.cache_lens, batch.packed_mask, S,
                                     num_splits, block_n, num_warps, num_stages)

    seconds = timed(ours, device)
    kv_bytes = B * S * k_cache.shape[1] * D * 2 * q.element_size()
    expected = naive_attention(q, k_cache, v_cache, dense_mask(cache_lens, new_mask, T, S)).float()
    return dict(asdict(case), impl="ours-tuned", block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                num_splits=num_splits, ms=round(seconds * 1e3, 4),
                of_peak=round(kv_bytes / seconds / PEAK_BYTES_PER_S, 3),
                max_err=float((ours().float() - expected).abs().max()))


def main(argv: list[str] | None = None) -> int:
    """The exit status: 1 when --check found a result out of tolerance, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="default: bfloat16 on cuda, float32 on cpu; --check: every dtype unless given")
    parser.add_argument("--tiny", action="store_true", help="a few small shapes: a dry run in seconds")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--backend", choices=("torch", "triton", "cpu"), default=None,
                        help="ours: default triton on cuda, torch on cpu (triton on cpu: TRITON_INTERPRET=1; "
                             "cpu: our CPU kernel)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="correctness vs naive on the device")
    mode.add_argument("--sweep", action="store_true",
                      help="Triton launch configurations (cuda; on the cpu only under TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.backend == "cpu" and args.dtype == "float16":
        parser.error("--backend cpu takes float32 and bfloat16")
    if args.backend == "cpu" and not cpu_kernels.built():  # (built on first use, ~1 min)
        parser.error("--backend cpu: our CPU kernels could not be built on this machine")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    torch.manual_seed(0)

    def emit(row: dict) -> None:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items() if v is not None), flush=True)

    if args.check:
        failed = 0
        for case, kernel_args in check_cases(args.tiny, args.backend, args.dtype):
            rows = run_case(case, args.device, ("ours",), time_it=False, backend=args.backend, **kernel_args)
            for row in rows:
                passed = row["max_rel_err"] <= TOLERANCE[case.dtype]  # False for NaN too
                failed += not passed
                emit(dict(row, check="pass" if passed else "FAIL"))
        if failed:
            print(f"{failed} check(s) FAIL", file=sys.stderr)
            return 1
    elif args.sweep:
        for case, kernel_args in sweep_cases(args.tiny, dtype):
            emit(run_tuned(case, args.device, **kernel_args))
    else:
        for case in bench_cases(args.tiny, dtype, args.backend):
            rows = list(run_case(case, args.device, backend=args.backend))
            for row in rows:
                emit(row)
            if not args.json:
                ours, sdpa = rows[0]["ms"], rows[1]["ms"]
                print(f"  -> ours is {sdpa / ours:.2f}x sdpa", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
