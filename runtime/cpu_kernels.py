"""Our CPU kernels for decoding, built for the machine they run on: `rows_product(x,
block_weight(weight), bias)` = `F.linear` for a few rows (`rows_product.cpp`: the kernel reads the
weights in its own order, a copy taken once); `attention.cpu.cpu_attend`, attention for a few new
tokens per sequence over its cache slot (`attention/cpu_attention.cpp`, called through
`attention.attend`); a decoder layer's small steps between its products, `rms_norm`, `rope` and
`silu_mul`, and the cache's `move_positions` (`layer_ops.cpp`, called by `runtime.llama` and
`runtime.kv_cache`); a dynamic tree's `top_logp`, `heads_draft` and `select_tree` (`tree_ops.cpp`,
called by `medusa.dynamic` and `medusa.draft`); sampling's `top_k_top_p_`, `probabilities`, `draw` and
`accept_lossless` (`sampling_ops.cpp`, called by `runtime.sampling`); and `int8_product`, the drafters'
products with their weights rounded to int8 (`int8_product.cpp`, called by `runtime.llama.Linear`,
`layer_ops.cpp` and `tree_ops.cpp`).

A decoding step multiplies one row (a token) or a few (a tree) by every weight matrix, so its time
is the time to read the weights. oneDNN and MKL read them well below the memory's rate on a few
rows, and oneDNN also spends ~15 us a call before it reads any; `rows_product.cpp` says how ours
reads them and what that measured.

The kernel is compiled with the machine's instruction set (`-march=native`) on first use, ~6 s,
and kept by torch's extension cache (keyed by this CPU's flags, so machines that share a home
folder keep one build each). Where it cannot be built (no C++ compiler) `built()` says so and the
model multiplies through oneDNN or MKL as before. It is registered as `medusa::rows_product`, an
operation that a compiled step calls as it is.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
import time
from pathlib import Path

import torch

import attention.cpu

SOURCE = Path(__file__).with_name("rows_product.cpp")
LAYER_SOURCE = Path(__file__).with_name("layer_ops.cpp")
TREE_SOURCE = Path(__file__).with_name("tree_ops.cpp")
SAMPLING_SOURCE = Path(__file__).with_name("sampling_ops.cpp")
INT8_SOURCE = Path(__file__).with_name("int8_product.cpp")

log = logging.getLogger(__name__)

_library = torch.library.Library("medusa", "FRAGMENT")
_library.define("block_weight(Tensor weight) -> Tensor")
_library.define("rows_product(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


@torch.library.register_fake("medusa::rows_product")
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


block_weight = torch.ops.medusa.block_weight  # weight [N, K] -> [N, K] in the order rows_product reads
rows_product = torch.ops.medusa.rows_product  # x [..., K], block_weight(weight), bias [N] or None -> [..., N]

_library.define("int8_product(Tensor x, Tensor weight, Tensor? bias, int group) -> Tensor")


@torch.library.register_fake("medusa::int8_product")
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# x [..., K] float32 / bf16, quantize_weight(weight), bias [N] or None, group (k per scale of x's rows; 0:
# K) -> [..., N]: `int8_linear` (int8_product.cpp)
int8_product = torch.ops.medusa.int8_product

_library.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_library.define("rope(Tensor x, Tensor cos, Tensor sin, int heads) -> Tensor")
_library.define("silu_mul(Tensor gate_up) -> Tensor")
_library.define("move_positions(Tensor(a!)[] caches, Tensor slots, Tensor src, Tensor dst) -> ()")
_library.define("argmax_rows(Tensor x) -> Tensor")
_library.define("logsumexp_at(Tensor x, Tensor path) -> Tensor")
_library.define("top_k_top_p_(Tensor(a!) logits, Tensor top_k, Tensor top_p) -> ()")
_library.define("probabilities(Tensor logits) -> Tensor")
_library.define("draw(Tensor weights, Tensor uniforms) -> Tensor")
_library.define("accept_lossless(Tensor candidates, Tensor probs, Tensor child_table, Tensor uniforms, "
                "int depth) -> (Tensor, Tensor, Tensor)")
_library.define("accept_greedy(Tensor candidates, Tensor best, Tensor parents, Tensor retrieve) "
                "-> (Tensor, Tensor, Tensor)")
_library.define("draft_layer(Tensor features, Tensor embeds, Tensor positions, Tensor mask, Tensor? past_k, "
                "Tensor? past_v, Tensor? at, Tensor fc_w, Tensor? fc_b, Tensor? attn_norm, Tensor qkv_w, "
                "Tensor o_w, Tensor mlp_norm, Tensor gate_up_w, Tensor down_w, Tensor inv_freq, float eps, "
                "int num_heads, int num_kv_heads, int queries) -> (Tensor, Tensor, Tensor)")
_library.define("heads_draft(Tensor hidden, Tensor roots, Tensor embed, Tensor[] fuse_w, Tensor[] fuse_b, "
                "Tensor[] block_w, Tensor[] block_b, Tensor proj_w, Tensor? draft_vocab, int topk, "
                "int depth) -> (Tensor, Tensor, Tensor, Tensor)")
_library.define("eagle_draft(Tensor features, Tensor tokens, Tensor lens, Tensor roots, Tensor embed, "
                "Tensor fc_w, Tensor? fc_b, Tensor? attn_norm, Tensor qkv_w, Tensor o_w, Tensor mlp_norm, "
                "Tensor gate_up_w, Tensor down_w, Tensor inv_freq, float eps, int num_heads, "
                "int num_kv_heads, Tensor proj_w, Tensor? draft_vocab, int topk, int depth) "
                "-> (Tensor, Tensor, Tensor, Tensor)")
_library.define("top_logp(Tensor logits, int k) -> (Tensor, Tensor)")
_library.define("select_tree(Tensor tokens, Tensor parents, Tensor scores, Tensor ranks, Tensor roots, "
                "Tensor lookup, int num_nodes, int topk, int depth) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_library.define("decoder_layers(Tensor x, Tensor[] attn_norm, Tensor[] qkv_w, Tensor?[] qkv_b, Tensor[] o_w, "
                "Tensor?[] o_b, Tensor[] mlp_norm, Tensor[] gate_up_w, Tensor?[] gate_up_b, Tensor[] down_w, "
                "Tensor?[] down_b, float eps, Tensor cos, Tensor sin, Tensor(a!)[] k_cache, "
                "Tensor(b!)[] v_cache, Tensor slots, Tensor cache_lens, Tensor? new_mask, int num_heads) "
                "-> Tensor")


@torch.library.register_fake("medusa::rms_norm")
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.register_fake("medusa::rope")
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:2], heads, x.shape[3])


@torch.library.register_fake("medusa::silu_mul")
def _(gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.register_fake("medusa::argmax_rows")
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.long)


@torch.library.register_fake("medusa::logsumexp_at")
def _(x: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    return x.new_empty(path.shape)


@torch.library.register_fake("medusa::probabilities")
def _(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape)


@torch.library.register_fake("medusa::draw")
def _(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    return weights.new_empty(weights.shape[0], dtype=torch.long)


@torch.library.register_fake("medusa::accept_lossless")
def _(candidates: torch.Tensor, probs: torch.Tensor, child_table: torch.Tensor, uniforms: torch.Tensor,
      depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B = candidates.shape[0]
    return candidates.new_empty(B), candidates.new_empty(B, depth + 1), candidates.new_empty(B)


@torch.library.register_fake("medusa::accept_greedy")
def _(candidates: torch.Tensor, best: torch.Tensor, parents: torch.Tensor, retrieve: torch.Tensor
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, P = retrieve.shape[0], retrieve.shape[2]
    return candidates.new_empty(B), candidates.new_empty(B, P), candidates.new_empty(B)


@torch.library.register_fake("medusa::draft_layer")
def _(features: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, *rest
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    past_k, num_heads, num_kv_heads = rest[0], rest[-2], rest[-1]
    B, S, C = features.shape
    K = S if past_k is None else past_k.shape[2]
    kv = features.new_empty(B, num_kv_heads, K, C // num_heads)
    return features.new_empty(features.shape), kv, kv.new_empty(kv.shape)


@torch.library.register_fake("medusa::heads_draft")
def _(hidden: torch.Tensor, roots: torch.Tensor, embed: torch.Tensor, *rest) -> tuple[torch.Tensor, ...]:
    topk, depth = rest[-2], rest[-1]
    M = topk + (depth - 1) * topk * topk
    B = hidden.shape[0]
    return (roots.new_empty(B, M), roots.new_empty(B, M), hidden.new_empty(B, M, dtype=torch.float32),
            roots.new_empty(B, M))


@torch.library.register_fake("medusa::eagle_draft")
def _(features: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor, roots: torch.Tensor, *rest
      ) -> tuple[torch.Tensor, ...]:
    topk, depth = rest[-2], rest[-1]
    M = topk + (depth - 1) * topk * topk
    B = features.shape[0]
    return (roots.new_empty(B, M), roots.new_empty(B, M), features.new_empty(B, M, dtype=torch.float32),
            roots.new_empty(B, M))


@torch.library.register_fake("medusa::top_logp")
def _(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape), logits.new_empty(shape, dtype=torch.long)


@torch.library.register_fake("medusa::select_tree")
def _(tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor, ranks: torch.Tensor,
      roots: torch.Tensor, lookup: torch.Tensor, num_nodes: int, topk: int, depth: int
      ) -> tuple[torch.Tensor, ...]:
    B, T, width = tokens.shape[0], num_nodes, topk + (lookup.shape[1] > 0)
    return (tokens.new_empty(B, T), tokens.new_empty(B, T), tokens.new_empty(B, T),
            tokens.new_empty(B, T, T, dtype=torch.bool), tokens.new_empty(B, T, depth + 1),
            tokens.new_empty(B, T, width))


rms_norm = torch.ops.medusa.rms_norm  # x [..., C], weight [C], eps -> [..., C]
rope = torch.ops.medusa.rope  # x [B, T, heads + ..., D], cos / sin [B, T, 1, D], heads -> [B, T, heads, D]
silu_mul = torch.ops.medusa.silu_mul  # gate_up [..., 2I] -> silu(gate) * up [..., I]
# caches: [N, Hkv, S_max, D] each; slots [B]; src, dst [B, P] int64: in place, sources read first
move_positions = torch.ops.medusa.move_positions
# x [B, T, C], each layer's weights as lists over the layers (`Block.kernel_operands`: its products'
# `block_weight` copies), eps, cos / sin [B, T, 1, D], the layers' caches, slots / cache_lens [B],
# new_mask [T, T] or [B, T, T] or None, num_heads -> [B, T, C]: every `Block.forward` in one call
decoder_layers = torch.ops.medusa.decoder_layers
# x [..., V] float32 -> argmax [...] int64, the first of equal maxima, NaN never
argmax_rows = torch.ops.medusa.argmax_rows
# x [B, T, V] float32, path [B, P] int64 -> x.logsumexp(-1).gather(1, path), NaN left out of the sums
logsumexp_at = torch.ops.medusa.logsumexp_at
# logits [M, V] float32 contiguous, top_k [M] int64 (0: off), top_p [M] float32 (1: off): in place, the
# logits top-k then top-p drop to -inf (`runtime.sampling._top_k_top_p`; sampling_ops.cpp)
top_k_top_p_ = torch.ops.medusa.top_k_top_p_
# logits [..., V] float32 -> `runtime.sampling.probabilities` (sampling_ops.cpp)
probabilities = torch.ops.medusa.probabilities
# weights [B, V] float32 / float64, uniforms [B] float64 -> [B] int64: `runtime.sampling.draw` in one call
draw = torch.ops.medusa.draw
# candidates [B, T], probs [B, T, V] float32, child_table [B, T, c], uniforms [B, T] float64, depth ->
# (accepted_len [B], path [B, depth + 1], next token [B]): `medusa.acceptance.accept_lossless` in one call
accept_lossless = torch.ops.medusa.accept_lossless
# candidates, best, parents [B, T], retrieve [B, R, P] int64 -> (accepted_len [B], path [B, P], next
# token [B]): `medusa.acceptance.accept_greedy` in one call
accept_greedy = torch.ops.medusa.accept_greedy
# `medusa.eagle.EagleDrafter.forward` in one call: features, embeds [B, S, C], positions [B, S], mask
# [B, S, K], past_k / past_v [B, Hkv, K, D] and at [S] (or None), the layer's `block_weight` copies,
# fc's bias, attn_norm's weight (or None), inv_freq, eps, heads, KV heads -> (out [B, S, C], keys, values)
draft_layer = torch.ops.medusa.draft_layer
# logits [..., V] float32, k -> (the k largest log_softmax values [..., k], best first; indices [..., k])
top_logp = torch.ops.medusa.top_logp
# `medusa.dynamic.grow` over path-input heads in one call: hidden [B, C], roots [B], embed [V, C], each
# head's fuse weight and bias, its blocks' (head-major), the scored lm_head rows (all `block_weight`
# copies), draft_vocab [V'] or None, topk, depth -> tokens, parents, scores (float32), ranks [B, M]
heads_draft = torch.ops.medusa.heads_draft
# `medusa.dynamic.grow` over the draft layer (`medusa.eagle.dynamic_logits`) in one call: features [B, W, C]
# and tokens [B, W] (the window), lens, roots [B], embed [V, C], the layer's operands as `draft_layer` takes
# them, the scored lm_head rows (`block_weight` copy), draft_vocab [V'] or None, topk, depth -> tokens,
# parents, scores (float32), ranks [B, M]
eagle_draft = torch.ops.medusa.eagle_draft
# `medusa.dynamic.select` and `rows_of` in one call: tokens, parents, ranks [B, M] int64, scores [B, M]
# float32, roots [B], lookup [B, L], T, k, depth -> candidates, depths, parents [B, T], mask [B, T, T],
# retrieve [B, T, P], child_table [B, T, k + (L > 0)]
select_tree = torch.ops.medusa.select_tree


def cpuinfo() -> str:
    """/proc/cpuinfo's text (what lscpu reads); "" where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_bf16_products() -> str:
    """How this CPU multiplies bfloat16, read from /proc/cpuinfo: "amx" (AMX tiles), "avx512" (AVX-512
    BF16's pairs) or "emulated" (widened to float32: slower than float32 products)."""
    flags = cpuinfo()
    return "amx" if " amx_bf16" in flags else "avx512" if " avx512_bf16" in flags else "emulated"


def cpu_has_bf16_products() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16); elsewhere bf16 products
    are emulated and slower than float32 ones."""
    return cpu_bf16_products() != "emulated"


def cpu_int8_products() -> bool:
    """Whether this CPU multiplies int8 in AMX tiles, where the drafters' weights are read as int8
    (`int8_product.cpp`); elsewhere `int8_product` runs a portable loop, for tests."""
    return " amx_int8" in cpuinfo()


def int8_fits(weight: torch.Tensor, group: int = 0) -> bool:
    """Whether `quantize_weight` takes weight [N, K]: N a multiple of 16, K and group multiples of 64."""
    N, K = weight.shape
    group = group or K
    return N % 16 == 0 and group % 64 == 0 and K % group == 0


def _row_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (x rounded to int8 by its largest |x| / 127, float32; that scale [..., 1]), float32 as
    `int8_product.cpp` rounds: the same operations in the same order."""
    x = x.float()
    most = x.abs().amax(-1, keepdim=True)
    inv = torch.where(most > 0, most.new_full((), 127.0) / most, 0.0)  # (`127.0 / most` is 127 x (1 / most))
    return torch.round(x * inv), most / 127.0


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> int8 [N, K + 4] as `int8_product` reads it: each row rounded to int8 by its own
    scale; each block of 16 rows its int8 weights four k of each row side by side ([K / 4][16][4], the
    order of AMX's int8 tiles), then the 16 rows' scales as float32."""
    N, K = weight.shape
    assert int8_fits(weight), "quantize_weight: N must be a multiple of 16 and K of 64"
    q, scale = _row_scales(weight)
    blocks = q.to(torch.int8).view(N // 16, 16, K // 4, 4).transpose(1, 2).reshape(N // 16, 16 * K)
    scales = scale.view(N // 16, 16).contiguous().view(torch.int8)  # [N / 16, 64]
    return torch.cat([blocks, scales], dim=1).view(N, K + 4)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int = 0
                ) -> torch.Tensor:
    """`int8_product`'s reference: F.linear(x, weight, bias) with weight's rows and each `group` of x's k
    rounded to int8 by their own scales (float32 [N, K] weight, as `quantize_weight` takes it); the integer
    sums exact, then float32 as the kernel: sum over groups of (sum * x's scale), times weight's, + bias."""
    K = weight.shape[1]
    G = K // (group or K)
    xq, xs = _row_scales(x.unflatten(-1, (G, K // G)))  # [..., G, K / G], [..., G, 1]
    wq, ws = _row_scales(weight)
    sums = torch.einsum("...gk,ngk->...gn", xq.double(), wq.view(-1, G, K // G).double()).float()  # exact
    acc = torch.zeros_like(sums[..., 0, :])
    for g in range(G):
        acc = acc + sums[..., g, :] * xs[..., g, :]
    y = acc * ws[:, 0]
    return (y if bias is None else y + bias.float()).to(x.dtype)


def eager_cpu(t: torch.Tensor) -> bool:
    """Whether a step's work on t goes through our kernels: t is on the CPU, no graph is being
    compiled (a compiled step keeps the PyTorch lines, which the compiler fuses), and they are built."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and built()


@functools.cache
def built() -> bool:
    """Whether our kernels run here: builds them the first time on this machine (~10 s), loads them
    after; False, with a warning, where they cannot be built."""
    from torch.utils import cpp_extension  # 0.3 s to import; only serving on a CPU needs it

    flags = next((line for line in cpuinfo().splitlines() if line.startswith("flags")), "")
    machine = hashlib.sha256(flags.encode()).hexdigest()[:12]
    start = time.perf_counter()
    try:
        sources = [str(path) for path in (SOURCE, attention.cpu.SOURCE, LAYER_SOURCE, TREE_SOURCE,
                                          SAMPLING_SOURCE, INT8_SOURCE)]
        cpp_extension.load(f"medusa_cpu_kernels_{machine}", sources, is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           extra_include_paths=[str(SOURCE.parent)])
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        log.warning("cannot build our CPU kernels; products go through oneDNN / MKL, attention through "
                    "SDPA: %s", e)
        return False
    log.info("our CPU kernels ready in %.1f s", time.perf_counter() - start)
    return True
