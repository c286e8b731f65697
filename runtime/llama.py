"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a slot-based KV cache.

No I/O and no sampling here: `forward` maps new tokens of B sequences to hidden states, reading
and writing each sequence's own cache slot; `logits` applies the vocabulary projection. All
attention goes through `attention.attend`.

Legend: B batch, T new tokens per sequence, C hidden size, H query heads, Hkv KV heads,
D head dim, V vocabulary.
"""

from __future__ import annotations

import logging
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import attention
from runtime import cpu_kernels
from runtime.config import ModelConfig, RopeScaling
from runtime.kv_cache import KVCache, Scratch

PACK_ROWS = 16  # rows per product the CPU weight layout is tuned for (decoding: a few per sequence)
MEASURED_ROWS = (1, 4, 16, 64)  # product sizes timed at load: one token, small trees, a big tree
# sizes our kernel is timed at: a token, a few, CPU trees, batches of them and the draft layer's window.
# All SmolLM2 products, bf16, AMD EPYC (Zen 5), ms ours / oneDNN: 16 rows 10.8 / 14.6, 32 rows 15.9 /
# 19.4, 48 rows 22.9 / 25.3, 64 rows 29.4 / 30.3 (float32 from 48 rows: 47.3 / 45.9)
OWN_MEASURED_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
OWN_KERNEL_SLACK = 1.1  # our kernel keeps a size while at most 10% slower (`measure_own_kernel_rows`)
NEVER = sys.maxsize
CPU_ATTENTION_MAX_NEW = 64  # new tokens per sequence up to which serving on the CPU attends through ours
CPU_ATTENTION_MAX_HEAD_DIM = 256  # the most our CPU attention keeps in registers (kMaxD in cpu_attention.cpp)

log = logging.getLogger(__name__)


class Linear(nn.Linear):
    """nn.Linear that, once `pack`ed, multiplies a few rows (as many as the load measured it at most
    10% slower on, `measure_own_kernel_rows`) through our kernel (`runtime.cpu_kernels`) and more
    through oneDNN's blocked weight layout on the CPU.

    One row through 30 layers of SmolLM2-sized products, Intel Xeon with AMX (2 cores), same run: bf16
    ours 10.2 ms, oneDNN 16.3, MKL 22.0; fp32 ours 18.9, oneDNN 25.8, MKL 19.2 (scratch script; eager plain
    decoding, 8 dev prompts, engines taking turns: bf16 33.0 -> 40.9 tok/s, fp32 25.5 -> 27.0). Up to
    how many rows ours stays the faster depends on the CPU, so `measure_own_kernel_rows` times it at
    load: in bf16 on that Xeon ours won on 4 rows (13.9 against oneDNN's 17.1 ms) and lost on 8 (22.9
    against 18.4); since it multiplies with AMX tiles there, it is ahead to 32 rows (`rows_product.cpp`).
    On an AMD EPYC (Zen 5, AVX-512 BF16, 2 cores) the same scratch script had ours ahead at every size
    to 12 rows (1 / 8 / 12: 6.3 / 9.1 / 11.2 ms against 7.9 / 10.1 / 12.1), and
    the load's timing, through the modules, up to 4 (8 rows: 10.9 against 10.4 ms): the margins
    there are within the machine's noise, and on 8 dev prompts speed did not move with the choice
    (Medusa 111.6 / 113.9 tok/s with ours to 16 rows, 117.5 / 114.6 to 1). What moves is bf16
    exactness, once attention is ours too: a tree's rows then get a token's bits.

    On the AMD EPYC CPUs of this project's machines, MKL's fp32 GEMM (what nn.Linear calls) is
    2-4x slower than oneDNN's for the few-row products of decoding (measured: the 49k-word
    lm_head on 11 rows, 35 ms vs 9.4 ms; on 1 row, 11 ms vs 4.5 ms). The activations stay dense:
    `_linear_pointwise` takes them as they are (converting them to and from oneDNN's layout around
    each product cost 15% of a decoding step). The weights are reordered for a few rows at a time
    (`_reorder_linear_weight`): all SmolLM2 layers' products, measured here on 1 / 4 / 64 rows,
    22.9 / 27.5 / 98.4 ms in oneDNN's plain layout, 19.1 / 14.8 / 78.6 ms reordered. The packed
    copy is a snapshot outside autograd, so only serving packs (`Llama.prepare_for_serving`);
    unpacked, or for other dtypes and devices, this is a plain nn.Linear.

    Which library is faster depends on the CPU, so products of fewer than `packed_from_rows` rows
    keep MKL; `Llama.prepare_for_serving` measures where the packed copy starts to pay. On an Intel
    Xeon with AMX (2 cores), all SmolLM2 layers' products on 1 / 8 / 64 rows: float32 MKL 8.2 / 16.4 /
    48.7 ms, oneDNN 12.8 / 15.9 / 46.7 ms; bfloat16 MKL 11.5 / 12.1 / 18.6 ms, oneDNN (AMX) 7.9 / 8.2 /
    11.5 ms.
    """

    packed_weight: torch.Tensor | None = None
    packed_bias: torch.Tensor | None = None
    packed_from_rows: int = 1  # products of at least this many rows use the packed copy
    own_weight: torch.Tensor | None = None  # the weights in our kernel's order (`cpu_kernels.block_weight`)
    own_kernel_rows: int = 0  # products of at most this many rows use `cpu_kernels.rows_product`
    int8_weight: torch.Tensor | None = None  # a drafter's: every product through int8 (`round_to_int8`)
    int8_group: int = 0  # the k of x per scale (0: all of a row)

    @property
    def packable(self) -> bool:
        """CPU weights that oneDNN multiplies natively: fp32, or bf16 where the CPU has bf16 products."""
        w = self.weight
        native = w.dtype == torch.float32 or (w.dtype == torch.bfloat16
                                              and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return w.device.type == "cpu" and native and torch.backends.mkldnn.is_available()

    def pack(self, from_rows: int = 1, own_rows: int = 1) -> None:
        """Keep a oneDNN copy of the weights and multiply products of at least `from_rows` rows
        through it from now on (no-op unless `packable`); products of at most `own_rows` rows
        through our kernel where it is built, which reads a copy of its own (`own_weight`, the
        weights in its order). Serving on the CPU thus holds a model's linear weights up to three
        times: as loaded (autograd, the tied embedding), oneDNN's and ours."""
        # not packable: no copy, not even one taken before the weights changed dtype (a stale float32
        # copy of weights since cast to bfloat16 failed in oneDNN on a CPU without bf16 products)
        self.packed_weight = self.packed_bias = self.int8_weight = None
        if self.packable and from_rows != NEVER:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS)
            self.packed_bias = None if self.bias is None else self.bias.detach()
            self.packed_from_rows = from_rows
        w = self.weight
        own = (own_rows > 0 and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
               and cpu_kernels.built())
        self.own_weight = cpu_kernels.block_weight(w.detach()) if own else None
        self.own_kernel_rows = own_rows if own else 0

    def unpack(self) -> None:
        """Drop the copies: multiply through the weights themselves (MKL), with autograd."""
        self.packed_weight = self.packed_bias = self.own_weight = self.int8_weight = None
        self.own_kernel_rows = 0

    def round_to_int8(self, group: int = 0) -> bool:
        """Serving a drafter: multiply every product by the weights rounded to int8 and each row of x
        rounded per `group` of k, where the shape lets it (returns whether it does; `int8_product.cpp` says
        why, and what it measured). Drafts only propose: their rounding changes how many tokens a step
        keeps, never which."""
        w = self.weight
        if not (w.device.type == "cpu" and cpu_kernels.built() and cpu_kernels.int8_fits(w, group)):
            return False
        self.int8_weight, self.int8_group = cpu_kernels.quantize_weight(w.detach()), group
        return True

    def kernel_weight(self) -> torch.Tensor:
        """The weights as our one-call kernels read them: the int8 copy, else in our product's order."""
        if self.int8_weight is not None:
            return self.int8_weight
        if self.own_weight is not None:
            return self.own_weight
        return cpu_kernels.block_weight(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_weight is not None:  # x in any dtype; a compiled graph calls it as it is
            return cpu_kernels.int8_product(x, self.int8_weight, self.bias, self.int8_group)
        if self.own_weight is not None and x.numel() <= self.own_kernel_rows * x.shape[-1]:
            return cpu_kernels.rows_product(x, self.own_weight, self.bias)
        if self.packed_weight is None or x.numel() < self.packed_from_rows * x.shape[-1]:
            return super().forward(x)
        if torch.compiler.is_compiling():  # opaque: inductor lowers oneDNN products of its own weights only
            return packed_linear(x, self.packed_weight, self.packed_bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.packed_bias, "none", [], "")


# `Linear`'s oneDNN product as one operation a compiled graph calls as it is. Without it a compiled
# step multiplied through MKL: the compiled Medusa step (8-node tree, SmolLM2, Intel Xeon with AMX)
# was 0.88x the eager one, and with it 1.16x (10 Spec-Bench prompts, one run each). A bare library
# operation: `torch.library.custom_op` cost 57 us a call here, more than a bf16 product of one row.
_library = torch.library.Library("medusa", "DEF")
_library.define("packed_linear(Tensor x, Tensor weight, Tensor? bias, int out_features) -> Tensor")
_library.impl("packed_linear", lambda x, weight, bias, out_features: torch.ops.mkldnn._linear_pointwise(
    x, weight, bias, "none", [], ""), "CompositeExplicitAutograd")  # any layout: bf16 weights are MkldnnCPU


@torch.library.register_fake("medusa::packed_linear")
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


packed_linear = torch.ops.medusa.packed_linear


def _seconds(linear: Linear, rows: int, packed: bool, repeats: int = 5) -> float:
    """The best of `repeats` timings of one product of `rows` rows, MKL or the packed copy."""
    x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype)
    linear.packed_from_rows = 1 if packed else NEVER
    linear.own_kernel_rows = 0
    best = math.inf
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first one warms up
            start = time.perf_counter()
            linear(x)
            best = min(best, time.perf_counter() - start)
    return best


def measure_packed_from_rows(model: Llama) -> int:
    """The fewest rows from which oneDNN's packed weights multiply this model's products faster than
    MKL on this machine (at every measured size from there up, by 5% or more); NEVER if they do not.
    Timed on layer 0's products (counted once per layer) and the lm_head: a few hundred ms at load."""
    layer = [m for m in model.layers[0].modules() if isinstance(m, Linear)]
    weighted = [(m, model.config.num_layers) for m in layer] + [(model.lm_head, 1)]
    if not all(m.packable for m, _ in weighted):
        return NEVER
    for m, _ in weighted:
        m.pack()
    times = {rows: [sum(n * _seconds(m, rows, packed) for m, n in weighted) for packed in (False, True)]
             for rows in MEASURED_ROWS}
    pays = [rows for rows, (mkl, packed) in times.items() if packed < 0.95 * mkl]
    start = next((r for i, r in enumerate(MEASURED_ROWS) if set(MEASURED_ROWS[i:]) <= set(pays)), NEVER)
    log.info("linear products (%s): oneDNN packed weights from %s rows; ms MKL / packed per size: %s",
             model.embed.weight.dtype, start if start != NEVER else "no",
             ", ".join(f"{r}: {1e3 * a:.1f} / {1e3 * b:.1f}" for r, (a, b) in times.items()))
    return start


def measure_own_kernel_rows(model: Llama) -> int:
    """The most rows (of OWN_MEASURED_ROWS) up to which our kernel multiplies all of this model's
    products at most OWN_KERNEL_SLACK times as slowly as the libraries it is packed for, on this
    machine (NEVER, every size, where the libraries only emulate bf16 and ours keeps up at every
    size timed); 0 where it never does or is not built. Timed over every product in order, as a step
    reads them (the weights come from memory, not from the cache, as when decoding): about a second
    at load for SmolLM2.

    Why a slack: our kernel gives a row the same bits whatever rows share its call, and so does our
    attention (`attention`'s "cpu" backend), so where a tree's products are ours too, each tree node
    gets the bits its token gets decoded alone, and greedy speculation is token-exact in bfloat16 as
    in float32 (`benchmarks.divergence`: no operation differs, 8 tokens, either dtype, with ours to 16
    rows; oneDNN's products of 8 rows differ from one row's in layer 0). That is worth a little speed."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if model.lm_head.own_kernel_rows == 0:  # not built, or not our kernel's dtype / device
        return 0
    dtype = model.lm_head.weight.dtype

    def seconds(rows: int, own: bool) -> float:
        for m in linears:
            m.own_kernel_rows = rows if own else 0
        xs = {k: torch.randn(rows, k, dtype=dtype) for k in {m.in_features for m in linears}}
        start = time.perf_counter()
        for m in linears:
            m(xs[m.in_features])
        return time.perf_counter() - start

    own_rows = 0
    with torch.no_grad():
        for rows in OWN_MEASURED_ROWS:
            times = [seconds(rows, own) for _ in range(4) for own in (True, False)]  # taking turns
            ours, libraries = min(times[0::2]), min(times[1::2])
            log.info("linear products (%s), %d rows: ours %.1f ms, oneDNN / MKL %.1f ms",
                     dtype, rows, 1e3 * ours, 1e3 * libraries)
            if ours > OWN_KERNEL_SLACK * libraries:
                break
            own_rows = rows
    if own_rows == OWN_MEASURED_ROWS[-1] and dtype == torch.bfloat16 and not model.lm_head.packable:
        # bf16 the libraries only emulate (no oneDNN copy: a CPU without AVX-512): ours at every size,
        # a prefill too. All SmolLM2 products, AMD EPYC (Zen 3, AVX2), ms: MKL 17.4 on one row and 13.5
        # a row on 64, ours 14.4 and 3.2; a prompt of ~100 tokens took 924 ms of MKL's products to prefill
        own_rows = NEVER
    for m in linears:
        m.own_kernel_rows = own_rows
        if own_rows == 0:  # never used: its copy is not kept
            m.own_weight = None
    return own_rows


def measure_matmul(model: Llama) -> tuple[int, int]:
    """(packed_from_rows, own_kernel_rows) for this model on this machine, measured; the model is left
    packed with them."""
    packed_from_rows = measure_packed_from_rows(model)
    pack_linears(model, packed_from_rows)
    return packed_from_rows, measure_own_kernel_rows(model)


def pack_linears(module: nn.Module, from_rows: int, own_rows: int = 1) -> None:
    """Every `Linear` in `module` multiplies products of at least `from_rows` rows through a oneDNN
    copy of its weights, taken now (none for NEVER), and of at most `own_rows` through our kernel
    (`Linear.pack`); NEVER and 0 drop the copies (autograd again). Our kernel does not need oneDNN:
    where it cannot multiply bf16 (a CPU without AVX-512) ours still reads bf16 weights, half the bytes
    of float32 ones."""
    for m in module.modules():
        if isinstance(m, Linear):
            m.pack(from_rows, own_rows) if from_rows != NEVER or own_rows > 0 else m.unpack()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ours: bool = False) -> torch.Tensor:
        """ours: through our CPU kernel (serving on the CPU: see `Block.forward`)."""
        if ours:
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[D/2] inverse frequencies, with Llama-3 or linear scaling applied."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    scaling: RopeScaling = config.rope_scaling
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        ramp = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        between = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(between, ramp, scaled)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2): x * cos + (-x2, x1) * sin, with the sign folded into `signed_sin`
    = (-sin, sin). x: [B, T, H, D]; cos, signed_sin: [B, T, 1, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin


class Block(nn.Module):
    """Pre-norm decoder layer: grouped-query attention then a SwiGLU MLP, both residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, H, Hkv, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.attn_norm = RMSNorm(C, config.rms_norm_eps)
        self.qkv = Linear(C, (H + 2 * Hkv) * D, bias=config.qkv_bias)  # q, k, v fused
        self.o = Linear(H * D, C, bias=config.o_bias)
        self.mlp_norm = RMSNorm(C, config.rms_norm_eps)
        self.gate_up = Linear(C, 2 * config.intermediate_size, bias=config.mlp_bias)  # fused
        self.down = Linear(config.intermediate_size, C, bias=config.mlp_bias)

    def kernel_operands(self) -> tuple | None:
        """The layer's weights as `cpu_kernels.decoder_layers` takes each layer's (every layer in one
        call: `Llama.forward`), or None unless our kernel multiplies every product (`Linear.own_weight`)."""
        if any(m.own_weight is None for m in (self.qkv, self.o, self.gate_up, self.down)):
            return None
        return (self.attn_norm.weight, self.qkv.own_weight, self.qkv.bias, self.o.own_weight, self.o.bias,
                self.mlp_norm.weight, self.gate_up.own_weight, self.gate_up.bias, self.down.own_weight,
                self.down.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache, scratch: Scratch, batch: attention.AttentionBatch, ours: bool = False
                ) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; the new tokens' K/V written to the cache at `scratch`. ours: the
        small steps between the products through our kernels (`layer_ops.cpp`), one call each (serving
        on the CPU, `Llama.forward`); with our attention these lines are also the reference of the whole
        layer in one call."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(self.attn_norm(x, ours)).view(B, T, H + 2 * Hkv, D)
        if ours:
            qk = cpu_kernels.rope(qkv, cos, sin, H + Hkv)  # [B, T, H + Hkv, D]
        else:
            qk = apply_rope(qkv[:, :, :H + Hkv], cos, sin)  # [B, T, H + Hkv, D]: q and k rotated together
        q, k = qk[:, :, :H], qk[:, :, H:]  # [B, T, H, D], [B, T, Hkv, D]
        v = qkv[:, :, H + Hkv:]  # [B, T, Hkv, D]
        cache.write(layer, scratch, k.transpose(1, 2), v.transpose(1, 2))
        out = attention.attend(q.transpose(1, 2), cache.k[layer], cache.v[layer], batch)  # [B, H, T, D]
        x = x + self.o(out.transpose(1, 2).reshape(B, T, H * D))
        gate_up = self.gate_up(self.mlp_norm(x, ours))  # [B, T, 2 * intermediate]
        if ours:
            return x + self.down(cpu_kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # [D/2]
        self._rope_table: torch.Tensor | None = None  # [2, S, D]: `rope_table`
        self.cpu_attention = False  # our CPU kernel for a few new tokens (`prepare_for_serving`)
        # serving on the CPU where our kernels take every layer's products: the layers' operands for
        # one call, as lists over the layers (`Block.kernel_operands`), and the most rows a call takes
        # (`prepare_for_serving`)
        self.layer_kernels: tuple[list[list], int] | None = None

    def prepare_for_serving(self, packed_from_rows: int | None = None, own_kernel_rows: int = 1) -> Llama:
        """Inference from now on: the linear layers multiply through oneDNN copies of their weights
        where that is faster (CPU fp32, and bf16 where the CPU has it; see `Linear`), with or without
        autograd enabled: from `packed_from_rows` rows per product, and through our kernel up to
        `own_kernel_rows`; both measured here when `packed_from_rows` is None. Call once the weights
        are final and on their device: the copies do not follow later changes. On the CPU, a few new
        tokens per sequence attend through our kernel from now on (`attention`'s "cpu" backend)."""
        if packed_from_rows is None:
            measure_matmul(self)
        else:
            pack_linears(self, packed_from_rows, own_kernel_rows)
        w = self.embed.weight
        D = self.config.head_dim
        self.cpu_attention = (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
                              and D % 16 == 0 and D <= CPU_ATTENTION_MAX_HEAD_DIM and cpu_kernels.built())
        operands = [layer.kernel_operands() for layer in self.layers]
        rows = min(m.own_kernel_rows for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up,
                                                                           layer.down))
        ready = self.cpu_attention and rows > 0 and all(o is not None for o in operands)
        self.layer_kernels = ([list(o) for o in zip(*operands, strict=True)], rows) if ready else None
        return self

    @property
    def invariant_rows(self) -> int | None:
        """The most new tokens one forward of one sequence takes through our CPU kernels
        (`layer_kernels`), which give each row the same bits whatever rows come with it; None without
        them. A prompt fed in pieces of at most this many tokens thus has the K/V and hidden states,
        bit for bit, that any other chunking of it gives, and that decoding it token by token gives."""
        return None if self.layer_kernels is None else min(self.layer_kernels[1], CPU_ATTENTION_MAX_NEW)

    def prepare_for_training(self) -> Llama:
        """Autograd from now on (training, or evaluating what training computes): the linear layers
        multiply through their weights themselves; drops the copies `prepare_for_serving` made."""
        pack_linears(self, NEVER, 0)
        self.cpu_attention = False
        self.layer_kernels = None
        return self

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        c = self.config
        w = self.embed.weight
        self.rope_table(max_len)  # built here, before any compiled step reads it
        return KVCache(c.num_layers, num_slots, c.num_kv_heads, max_len, c.head_dim, w.dtype, w.device)

    def rope_table(self, max_len: int) -> torch.Tensor:
        """[2, S, D] in the weights' dtype, S >= max_len: the cos and signed sin (`apply_rope`) of every
        position below S, computed once (again where the weights' dtype or device changed, or a longer
        cache came). A step looks its positions up in one operation, not the six that computed them (0.13
        -> 0.03 ms of a CPU step, whose caches the streamed weights leave cold: SmolLM2 bf16, AMD EPYC
        (Zen 4)); the same operations on the same values, so the same bits."""
        w = self.embed.weight
        table = self._rope_table
        if table is None or table.shape[1] < max_len or table.dtype != w.dtype or table.device != w.device:
            freqs = torch.arange(max_len, device=w.device)[:, None].float() * self.inv_freq  # [S, D/2]
            cos, sin = freqs.cos(), freqs.sin()
            table = torch.stack([torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)]).to(w.dtype)
            self._rope_table = table
        return table

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                new_mask: torch.Tensor | None = None, max_len: int | None = None,
                attention_backend: attention.Backend | None = None, one_call_layers: bool = True
                ) -> torch.Tensor:
        """Hidden states (after the final norm) of T new tokens for each of B sequences.

        tokens, positions: [B, T] (positions drive RoPE: prefix length + depth for a tree);
        slots: [B] cache slots; new_mask: [T, T] or [B, T, T] bool over the new tokens (None = causal);
        max_len: max(cache lens) + T when the caller knows it; attention_backend: None = the
        default for the device (see `attention.plan`); one_call_layers: serving on the CPU, all the
        layers in one call to our kernels where they take all of them (`cpu_kernels.decoder_layers`),
        else step by step (`Block.forward`), as `benchmarks.divergence` watches them (the same kernels:
        the same bits). Returns [B, T, C].
        K/V of the new tokens land in the cache's scratch positions; the caller keeps them
        with `cache.advance` or `cache.commit`.
        """
        B, T = tokens.shape
        assert positions.shape == (B, T) and slots.shape == (B,)
        dtype = self.embed.weight.dtype
        # (not in a compiled step: inductor fuses the steps between the products itself; with ours
        # there, compiled plain decoding 84.0 against 84.9 tok/s, Medusa 106.2 against 109.1: 4 dev
        # prompts, SmolLM2 bf16, AMD EPYC Zen 5)
        if (attention_backend is None and self.cpu_attention and T <= CPU_ATTENTION_MAX_NEW
                and not torch.compiler.is_compiling()):
            attention_backend = "cpu"
        batch = attention.plan(slots, cache.lens[slots], T, new_mask, max_len, attention_backend, dtype=dtype,
                               groups=self.config.num_heads // self.config.num_kv_heads)
        cos, sin = self.rope_table(cache.max_len)[:, positions, None]  # [B, T, 1, D] each
        x = self.embed(tokens)  # [B, T, C]
        # serving on the CPU, the steps between the products go through our kernels, with our attention
        # (a few tokens) and on a prompt's chunk that attends through PyTorch's, where PyTorch's lines were
        # a quarter of a prefill: 96 tokens, SmolLM2 bf16, Intel Xeon (AMX), their float32 RMSNorm's
        # multiplications alone 4.4 of 39 ms
        ours = batch.backend == "cpu" or (self.cpu_attention and not torch.compiler.is_compiling())
        one_call = self.layer_kernels is not None and B * T <= self.layer_kernels[1]
        if batch.backend == "cpu" and one_call_layers and one_call:
            # straight to the kernel, not through the modules (their calls and attribute lookups took
            # ~30 us a layer): SmolLM2 bf16, a token over 400 keys, AMD EPYC (Zen 5), taking turns in
            # one process, a forward 6.98 ms through the modules, 6.13 ms straight. Every layer in
            # one call, not a call a layer (each passed its 20 operands in ~10 us): 30 layers over 300
            # keys, bf16, AMD EPYC (Zen 4), taking turns, 6.80 -> 6.51 ms
            x = cpu_kernels.decoder_layers(x, *self.layer_kernels[0], self.config.rms_norm_eps, cos, sin,
                                           cache.k, cache.v, batch.slots, batch.cache_lens, batch.new_mask,
                                           self.config.num_heads)
        else:
            scratch = cache.scratch(slots, T)
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, i, cache, scratch, batch, ours)
        return self.norm(x, ours)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., C] -> [..., V] in float32."""
        return self.lm_head(hidden).float()


def from_hf_state_dict(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and fuse) a Hugging Face Llama-family state dict into this module's layout."""
    out: dict[str, torch.Tensor] = {"embed.weight": hf["model.embed_tokens.weight"],
                                    "norm.weight": hf["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        q = f"layers.{i}."
        out[q + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[q + "mlp_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        attn = [p + f"self_attn.{n}_proj." for n in "qkv"]
        out[q + "qkv.weight"] = torch.cat([hf[a + "weight"] for a in attn])
        if config.qkv_bias:
            out[q + "qkv.bias"] = torch.cat([hf[a + "bias"] for a in attn])
        out[q + "o.weight"] = hf[p + "self_attn.o_proj.weight"]
        if config.o_bias:
            out[q + "o.bias"] = hf[p + "self_attn.o_proj.bias"]
        mlp = [p + "mlp.gate_proj.", p + "mlp.up_proj."]
        out[q + "gate_up.weight"] = torch.cat([hf[m + "weight"] for m in mlp])
        out[q + "down.weight"] = hf[p + "mlp.down_proj.weight"]
        if config.mlp_bias:
            out[q + "gate_up.bias"] = torch.cat([hf[m + "bias"] for m in mlp])
            out[q + "down.bias"] = hf[p + "mlp.down_proj.bias"]
    return out
