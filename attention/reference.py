"""Readable reference attention: the definition, and the FlashAttention algorithm in PyTorch.

`naive_attention` is the definition, softmax(q k^T / sqrt(D) + mask) v: the reference the tests and
`benchmarks.attention --check` hold the fast paths to; the model never runs it.

`tiled_attention` computes the same thing the way the Triton kernels do (FlashAttention, Dao et
al. 2022, "online softmax"): K/V are read in tiles of `block_size` keys; each query row keeps
  m   the running maximum of its scores so far,
  l   the running sum of exp(score - m),
  acc the running sum of exp(score - m) * v,
and when a tile raises the maximum from m to m', the old l and acc are rescaled by exp(m - m').
One division acc / l at the end gives the softmax-weighted sum, without ever holding a whole
row of scores.

`split_attention` is the flash-decoding variant (Dao et al. 2023): the keys are cut into splits
processed independently (on a GPU: in parallel, when the batch alone cannot fill it); each split
returns its normalised partial output and the log-sum-exp of its scores, and the splits are
merged with weights exp(lse_split - lse_total).

Legend: B batch, H query heads, Hkv KV heads, T query tokens, S keys, D head dim.
"""

from __future__ import annotations

import math

import torch


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, in float32.

    q: [B, H, T, D]; k, v: [B, Hkv, S, D]; mask: [B, 1, T, S] bool (True = visible).
    Returns [B, H, T, D] in q's dtype.
    """
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # [B, H, S, D]
    v = v.float().repeat_interleave(group, dim=1)
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(D)  # [B, H, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


def _online_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiled loop: returns acc [B, H, T, D], m [B, H, T] and l [B, H, T], all float32."""
    B, H, T, D = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    q = q.float() / math.sqrt(D)
    m = torch.full((B, H, T), float("-inf"), device=q.device)  # running max of the scores
    denom = torch.zeros(B, H, T, device=q.device)  # l: running sum of exp(score - m)
    acc = torch.zeros(B, H, T, D, device=q.device)  # running sum of exp(score - m) * v
    for start in range(0, S, block_size):
        end = min(start + block_size, S)
        k_tile = k[:, :, start:end].float().repeat_interleave(group, dim=1)  # [B, H, n, D]
        v_tile = v[:, :, start:end].float().repeat_interleave(group, dim=1)
        scores = q @ k_tile.transpose(-1, -2)  # [B, H, T, n]
        scores = scores.masked_fill(~mask[..., start:end], float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1))  # [B, H, T]
        # a row that has seen nothing yet keeps m = -inf; subtract 0 there instead of -inf
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        rescale = torch.exp(m - m_safe)  # [B, H, T]: exp(old max - new max), 0 for an empty row
        p = torch.exp(scores - m_safe[..., None])  # [B, H, T, n]
        denom = denom * rescale + p.sum(dim=-1)
        acc = acc * rescale[..., None] + p @ v_tile
        m = m_new
    return acc, m, denom


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    block_size: int = 16) -> torch.Tensor:
    """Same inputs and result as `naive_attention`, computed tile by tile with an online softmax."""
    acc, _, denom = _online_softmax(q, k, v, mask, block_size)
    return (acc / denom[..., None]).to(q.dtype)  # the one division


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    num_splits: int, block_size: int = 16) -> torch.Tensor:
    """Same result again, with the keys cut into `num_splits` independent splits then merged."""
    S = k.shape[2]
    split_len = -(-S // num_splits)
    outs, lses = [], []
    for start in range(0, S, split_len):
        part = slice(start, start + split_len)
        acc, m, denom = _online_softmax(q, k[:, :, part], v[:, :, part], mask[..., part], block_size)
        outs.append(acc / denom.clamp_min(1e-30)[..., None])  # [B, H, T, D]; 0 for a split that saw nothing
        lses.append(m + torch.log(denom))  # [B, H, T]: log sum exp of this split's scores (-inf if none)
    lse = torch.stack(lses)  # [splits, B, H, T]
    weights = torch.softmax(lse, dim=0)  # exp(lse_split - lse_total)
    return (weights[..., None] * torch.stack(outs)).sum(0).to(q.dtype)
