"""Readable reference attention, used by tests to check the fast paths."""

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
