"""Attention over a batched, slot-based KV cache, with an optional tree mask over the new tokens.

The model runtime calls `plan` once per forward and `attend` once per layer. Each of the B
sequences in a batch owns one cache slot and has its own cached length; its T new query tokens
see that sequence's cached prefix `[0, cache_lens[b])` and the new tokens that `new_mask` allows
(causal when None: prefill and plain decoding; the Medusa tree mask when verifying a tree). The
new tokens' K/V have already been written to the cache at positions `cache_lens[b] .. + T`.

Three backends behind the one `attend`:
- "triton" (the default for CUDA tensors): `attention.triton_kernels`, FlashAttention kernels
  that read K/V straight from the cache slots. Triton is imported on first use only.
- "cpu": our C++ kernel for a few new tokens per sequence (`attention/cpu.py`, built by
  `runtime.cpu_kernels`), which the model picks when it serves on the CPU (`Llama.prepare_for_serving`).
  A query's result depends only on the keys it sees, not on how many queries share the call, so a
  tree node gets the bits its token gets decoded alone (SDPA's do not: in bfloat16, greedy
  speculation drifted from plain decoding there). Faster than SDPA too: SmolLM2's 9 / 3 heads, 400
  cached keys, AMD EPYC Zen 5, 2 threads, bf16: one token 17.4 against 35.7 us, an 8-node tree 69.1
  against 88.1 us (float32: 18.2 / 27.9, 68.5 / 79.0).
- "torch" (the default otherwise): PyTorch SDPA with an additive mask. Measured on the CPU at
  SmolLM2 shapes (9 heads, 3 KV heads, D 64, 512 cached tokens): reading K/V as views instead of
  gathering them from the slots is 2.4-2.8x faster for 4 sequences decoding (consecutive slots:
  one batched call; scattered slots: one call per sequence over exactly its keys, which needs no
  mask when T = 1); folding each KV head's query heads into rows (GQA without repeating K/V) is
  up to 15% faster than SDPA's enable_gqa when T > 1, and 4.8x for one bf16 token; a float mask is
  ~3% faster than a boolean one; one sequence decoding one token needs no mask at all. In a
  compiled CPU step, one new token per sequence attends through plain sums and a softmax
  (`_one_query`), not SDPA.

Legend: B batch, T new tokens, S max_len (cached + new of the longest sequence), H query heads,
Hkv KV heads, G = H / Hkv, D head dim, N cache slots, S_max positions per slot, W = ceil(T / 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from attention.cpu import cpu_attend
from attention.masks import dense_mask, pack_bits

Backend = Literal["torch", "triton", "cpu"]


@dataclass(frozen=True)
class AttentionBatch:
    """Where each sequence's new tokens sit in the cache; built once per forward, shared by layers."""

    slots: torch.Tensor  # [B] int64: cache slot of each sequence
    cache_lens: torch.Tensor  # [B] int64: cached tokens before the new ones
    new_mask: torch.Tensor | None  # [T, T] or [B, T, T] bool: new token i may see new token j; None = causal
    num_new: int  # T
    max_len: int  # S = max(cache_lens) + T, a host int
    backend: Backend
    # backend "torch"
    first_slot: int | None = None  # slots are first_slot, first_slot + 1, ...: K/V read as views
    seq_views: tuple[tuple[int, int], ...] | None = None  # else, on the CPU: (slot, cache_len + T) each
    bias: torch.Tensor | None = None  # [B, 1, G * T, S] in the queries' dtype, 0 or -inf; None: no mask
    # backend "triton"
    packed_mask: torch.Tensor | None = None  # [T, W] or [B, T, W] int32 bit-packed new_mask; None = causal
    num_splits: int | None = None  # split-KV programs per sequence; None = chosen from the shape


def plan(slots: torch.Tensor, cache_lens: torch.Tensor, num_new: int,
         new_mask: torch.Tensor | None = None, max_len: int | None = None,
         backend: Backend | None = None, num_splits: int | None = None,
         dtype: torch.dtype = torch.float32, groups: int = 1) -> AttentionBatch:
    """Prepare one forward's attention metadata.

    slots, cache_lens: [B]; new_mask: [T, T] bool (one tree for the batch), [B, T, T] (one per
    sequence) or None (causal). `max_len` saves a host sync
    when the caller knows it. backend: None = "triton" for CUDA tensors, else "torch".
    num_splits forces the split-KV variant of the Triton kernel (tests, tuning).
    dtype, groups: the queries' dtype and query heads per KV head (G), for the "torch" backend's
    mask, built once here for every layer: cast and folded in each layer instead, a 12-node tree's
    attention cost 71 us a layer against 54 (bf16, 312 keys).
    """
    assert slots.dim() == 1 and cache_lens.shape == slots.shape
    T = num_new
    if max_len is None:
        max_len = int(cache_lens.max()) + T
    if new_mask is not None:
        assert new_mask.shape in ((T, T), (slots.shape[0], T, T)) and new_mask.dtype == torch.bool
    if backend is None:
        backend = "triton" if slots.is_cuda else "torch"
    slots, cache_lens = slots.long(), cache_lens.long()
    if backend == "triton":
        packed = None if new_mask is None else pack_bits(new_mask.to(slots.device))
        return AttentionBatch(slots, cache_lens, new_mask, T, max_len, backend,
                              packed_mask=packed, num_splits=num_splits)
    if backend == "cpu":  # (the kernel reads slots and lengths as plain arrays)
        return AttentionBatch(slots.contiguous(), cache_lens.contiguous(), new_mask, T, max_len, backend)
    assert backend == "torch", backend
    first_slot, seq_views = None, None
    needs_mask = True
    if slots.device.type == "cpu" and not torch.compiler.is_compiling():  # host values are free here
        slot_list, len_list = slots.tolist(), cache_lens.tolist()
        if slot_list == list(range(slot_list[0], slot_list[0] + len(slot_list))):
            first_slot = slot_list[0]
            needs_mask = T > 1 or any(n + 1 != max_len for n in len_list)
        else:  # one sequence at a time, each over exactly its own keys
            seq_views = tuple((slot, n + T) for slot, n in zip(slot_list, len_list, strict=True))
            needs_mask = T > 1
    bias = None
    if needs_mask:
        visible = dense_mask(cache_lens, new_mask, T, max_len)  # [B, 1, T, S]
        if T > 1 and groups > 1:  # rows as `_sdpa` folds the queries: G * T, head-major
            visible = visible.expand(-1, groups, -1, -1).reshape(visible.shape[0], 1, groups * T, max_len)
        bias = torch.zeros(visible.shape, dtype=dtype, device=slots.device).masked_fill_(~visible, -math.inf)
    return AttentionBatch(slots, cache_lens, new_mask, T, max_len, backend, first_slot=first_slot,
                          seq_views=seq_views, bias=bias)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           batch: AttentionBatch) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for each sequence against its own cache slot.

    q: [B, H, T, D]; k_cache, v_cache: [N, Hkv, S_max, D] (one layer). Returns [B, H, T, D].
    """
    B, H, T, D = q.shape
    assert T == batch.num_new and batch.slots.shape == (B,)
    if batch.backend == "triton":
        from attention import triton_kernels

        return triton_kernels.attend(q, k_cache, v_cache, batch.slots, batch.cache_lens, batch.packed_mask,
                                     batch.max_len, batch.num_splits)
    if batch.backend == "cpu":
        return cpu_attend(q, k_cache, v_cache, batch.slots, batch.cache_lens, batch.new_mask)
    return _attend_torch(q, k_cache, v_cache, batch)


def _attend_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  batch: AttentionBatch) -> torch.Tensor:
    B = q.shape[0]
    S = batch.max_len
    bias = None if batch.bias is None else batch.bias.to(q.dtype)  # [B, 1, G * T or T, S]
    if batch.seq_views is not None:  # scattered slots: views per sequence beat one gather (2.4x at T = 1)
        return torch.cat([
            _sdpa(q[b:b + 1], k_cache[slot:slot + 1, :, :n], v_cache[slot:slot + 1, :, :n],
                  None if bias is None else bias[b:b + 1, :, :, :n])
            for b, (slot, n) in enumerate(batch.seq_views)])
    if batch.first_slot is not None:
        rows = slice(batch.first_slot, batch.first_slot + B)
        k, v = k_cache[rows, :, :S], v_cache[rows, :, :S]  # [B, Hkv, S, D] views
    else:
        k, v = k_cache[batch.slots, :, :S], v_cache[batch.slots, :, :S]  # [B, Hkv, S, D] copies
    return _sdpa(q, k, v, bias)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, Hkv, S, D]; bias: [B, 1, T, S], folded [B, 1, G * T, S] (`plan`), or
    None. Returns [B, H, T, D]."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    if T == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
        return _one_query(q, k, v, bias)
    if G == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    # GQA by folding: the G query heads of a KV head become G * T rows against that one head. Also for
    # one query: SDPA's enable_gqa took 176 us for a bf16 token against 400 keys (SmolLM2's 9 / 3
    # heads, AMD EPYC Zen 5), folded 37 us, the same bits (float32: 25.7 against 27.9 us)
    q_rows = q.reshape(B, Hkv, G * T, D)  # [B, Hkv, G * T, D], rows head-major
    if bias is not None and bias.shape[2] == T:  # not folded by `plan`
        bias = bias.expand(B, G, T, S).reshape(B, 1, G * T, S)
    return F.scaled_dot_product_attention(q_rows, k, v, attn_mask=bias).view(B, H, T, D)


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`_sdpa` for one new token per sequence in a compiled CPU step, written as two sums and a
    softmax (in float32) that inductor fuses into the layer's own loops: SDPA is a call of its own,
    with its own buffers. Compiled plain decoding, SmolLM2 bf16, AMX Xeon (2 cores), same process,
    engines taking turns, 8 dev prompts: 23.0 ms a step with SDPA, 19.9 with this. Not for a tree's
    queries: the 8-node tree's through these sums (G * T rows) made the compiled Medusa step slower
    (AMD EPYC Zen 5, 2 cores, 4 prompts, runs taking turns: 16.2-16.4 ms against SDPA's 15.1-15.2).
    q: [B, H, 1, D]; k, v: [B, Hkv, S, D]; bias: [B, 1, 1, S] or None. Returns [B, H, 1, D]."""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    rows = q.float().reshape(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]: a KV head's G query heads together
    scores = (rows.unsqueeze(-2) * k.float().unsqueeze(2)).sum(-1) / math.sqrt(D)  # [B, Hkv, G, S]
    if bias is not None:
        scores = scores + bias.float()  # [B, 1, 1, S] broadcast over heads
    p = torch.softmax(scores, dim=-1)
    out = (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # [B, Hkv, G, D]
    return out.reshape(B, H, 1, D).to(q.dtype)
