"""Which keys each new token may see, in the two forms the attention paths consume.

A sequence with `L` cached tokens and `T` new ones has keys `0 .. L + T`: the cached prefix
`[0, L)` is visible to every new token; new key `L + j` is visible to new token `i` when
`new_mask[i, j]` (the tree's ancestor mask; causal `j <= i` when there is no tree). A static tree
gives one [T, T] mask for the whole batch; a dynamic tree (`medusa.dynamic`) one per sequence,
[B, T, T].

Legend: B batch, T new tokens, S max_len (keys of the longest sequence), W = ceil(T / 32).
"""

from __future__ import annotations

import torch


def dense_mask(cache_lens: torch.Tensor, new_mask: torch.Tensor | None, num_new: int,
               max_len: int) -> torch.Tensor:
    """[B, 1, T, S] bool: key s is visible to new token t of sequence b (False past its length).

    cache_lens: [B]; new_mask: [T, T] or [B, T, T] bool, or None (causal).
    """
    T = num_new
    device = cache_lens.device
    key = torch.arange(max_len, device=device)  # [S]
    lens = cache_lens[:, None, None]  # [B, 1, 1]
    offset = key - lens  # [B, 1, S]: index of the key among the new tokens (< 0: cached)
    query = torch.arange(T, device=device)[:, None]  # [T, 1]
    in_new = (offset >= 0) & (offset < T)  # [B, 1, S]
    if new_mask is None:
        new_visible = offset <= query  # [B, T, S]
    else:
        # column T of the padded mask is all False: where the key is not a new token
        rows = new_mask.expand(cache_lens.shape[0], T, T)  # [B, T, T]
        padded = torch.cat([rows, rows.new_zeros(rows.shape[0], T, 1)], dim=2)  # [B, T, T + 1]
        column = torch.where(in_new, offset, T).expand(-1, T, -1)  # [B, T, S]
        new_visible = padded.gather(2, column)  # [B, T, S]
    return ((offset < 0) | (in_new & new_visible))[:, None]  # [B, 1, T, S]


def pack_bits(new_mask: torch.Tensor) -> torch.Tensor:
    """[..., T, T] bool -> [..., T, W] int32: bit j % 32 of word j // 32 of row i is new_mask[..., i, j]."""
    T = new_mask.shape[-1]
    W = -(-T // 32)
    bits = torch.zeros(*new_mask.shape[:-1], W * 32, dtype=torch.int64, device=new_mask.device)
    bits[..., :T] = new_mask.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=new_mask.device) << torch.arange(
        32, device=new_mask.device)  # [32]
    words = (bits.view(*new_mask.shape[:-1], W, 32) * weights).sum(-1)  # [..., T, W], in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits, as a signed int
    return words.to(torch.int32).contiguous()
