"""Attention over a batched, slot-based KV cache, with an optional tree mask over the new tokens.

The model runtime calls `attend` only. Each of the B sequences in a batch owns one cache slot
and has its own cached length; its T new query tokens see that sequence's cached prefix
`[0, cache_lens[b])` and the new tokens that `new_mask` allows (causal when None: prefill and
plain decoding; the Medusa tree mask when verifying a tree). The new tokens' K/V have already
been written to the cache at positions `cache_lens[b] .. cache_lens[b] + T`.

Legend: B batch, T new tokens, S cached+new length, H query heads, Hkv KV heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionBatch:
    """Where each sequence's new tokens sit in the cache; built once per forward, shared by layers."""

    slots: torch.Tensor  # [B] long: cache slot of each sequence
    cache_lens: torch.Tensor  # [B] long: cached tokens before the new ones
    new_mask: torch.Tensor | None  # [T, T] bool: new token i may see new token j; None = causal
    num_new: int  # T
    max_len: int  # S = max(cache_lens) + T, a host int
    dense_mask: torch.Tensor  # [B, 1, T, S] bool: the full visibility mask (PyTorch path)


def plan(slots: torch.Tensor, cache_lens: torch.Tensor, num_new: int,
         new_mask: torch.Tensor | None = None, max_len: int | None = None) -> AttentionBatch:
    """Prepare one forward's attention metadata. `max_len` saves a host sync when the caller knows it."""
    assert slots.dim() == 1 and cache_lens.shape == slots.shape
    T = num_new
    if max_len is None:
        max_len = int(cache_lens.max()) + T
    if new_mask is None:
        new_mask = torch.ones(T, T, dtype=torch.bool, device=slots.device).tril()
    assert new_mask.shape == (T, T) and new_mask.dtype == torch.bool
    dense = _dense_mask(cache_lens, new_mask, max_len)
    return AttentionBatch(slots, cache_lens, new_mask, T, max_len, dense)


def _dense_mask(cache_lens: torch.Tensor, new_mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, 1, T, S] bool: key j is visible to new token t of sequence b."""
    T = new_mask.shape[0]
    key = torch.arange(max_len, device=cache_lens.device)  # [S]
    lens = cache_lens[:, None, None]  # [B, 1, 1]
    prefix = key[None, None, :] < lens  # [B, 1, S]
    offset = key[None, None, :] - lens  # [B, 1, S]: index among the new tokens
    in_new = (offset >= 0) & (offset < T)
    padded = torch.cat([new_mask, new_mask.new_zeros(T, 1)], dim=1)  # column T = "not new"
    new_visible = padded[torch.arange(T, device=new_mask.device)[None, :, None],
                         torch.where(in_new, offset, T)]  # [B, T, S]
    return (prefix | (in_new & new_visible))[:, None]  # [B, 1, T, S]


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           batch: AttentionBatch) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v for each sequence against its own cache slot.

    q: [B, H, T, D]; k_cache, v_cache: [slots, Hkv, S_max, D] (one layer). Returns [B, H, T, D].
    """
    B, H, T, D = q.shape
    S = batch.max_len
    if B == 1:
        slot = int(batch.slots[0]) if batch.slots.device.type == "cpu" else None
    else:
        slot = None
    if slot is not None:
        k = k_cache[slot:slot + 1, :, :S]  # [1, Hkv, S, D] (a view)
        v = v_cache[slot:slot + 1, :, :S]
    else:
        k = k_cache[batch.slots, :, :S]  # [B, Hkv, S, D]
        v = v_cache[batch.slots, :, :S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=batch.dense_mask,
                                          enable_gqa=k.shape[1] != H)
