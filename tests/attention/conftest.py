"""Helpers for the attention tests: random caches, tree masks, and the naive answer.

The Triton kernels run under Triton's interpreter on the CPU: TRITON_INTERPRET is set in
tests/conftest.py, before anything imports torch (which may import Triton).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention.masks import dense_mask
from attention.reference import naive_attention

TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # atol = rtol


def tree_mask(parents: list[int]) -> torch.Tensor:
    """[T, T] bool ancestor mask of a tree given each node's parent (-1 for the root, parents first)."""
    T = len(parents)
    mask = torch.eye(T, dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            assert parent < node
            mask[node] |= mask[parent]
    return mask


def random_tree_mask(num_nodes: int, seed: int = 0) -> torch.Tensor:
    """[T, T] ancestor mask of a random tree: node i's parent drawn from nodes 0 .. i - 1."""
    gen = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, node, (1,), generator=gen)) for node in range(1, num_nodes)]
    return tree_mask(parents)


def random_tree_masks(batch: int, num_nodes: int, seed: int = 0) -> torch.Tensor:
    """[B, T, T]: a different random tree per sequence, as a dynamic tree gives."""
    return torch.stack([random_tree_mask(num_nodes, seed=seed + b) for b in range(batch)])


@dataclass
class Case:
    q: torch.Tensor  # [B, H, T, D]
    k_cache: torch.Tensor  # [N, Hkv, S_max, D]
    v_cache: torch.Tensor
    slots: torch.Tensor  # [B]
    cache_lens: torch.Tensor  # [B]
    new_mask: torch.Tensor | None  # [T, T] or [B, T, T]

    @property
    def max_len(self) -> int:
        return int(self.cache_lens.max()) + self.q.shape[2]

    def expected(self) -> torch.Tensor:
        """The naive answer, [B, H, T, D]."""
        S = self.max_len
        mask = dense_mask(self.cache_lens, self.new_mask, self.q.shape[2], S)
        k = self.k_cache[self.slots, :, :S]
        v = self.v_cache[self.slots, :, :S]
        return naive_attention(self.q, k, v, mask)

    def poisoned_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the caches with NaN wherever no sequence of the batch may read."""
        k, v = self.k_cache.clone(), self.v_cache.clone()
        readable = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool)  # [N, S_max]
        for slot, length in zip(self.slots.tolist(), self.cache_lens.tolist(), strict=True):
            readable[slot, :length + self.q.shape[2]] = True
        k[~readable[:, None, :, None].expand_as(k)] = float("nan")
        v[~readable[:, None, :, None].expand_as(v)] = float("nan")
        return k, v


def make_case(cache_lens: list[int], num_new: int, num_heads: int, num_kv_heads: int, head_dim: int,
              new_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
              slots: list[int] | None = None, num_slots: int | None = None, seed: int = 0) -> Case:
    """A cache of random K/V, with the sequences in `slots` (default: scattered, reversed)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(cache_lens)
    num_slots = num_slots or 2 * B + 1
    slots = slots if slots is not None else [num_slots - 1 - 2 * b for b in range(B)]
    S_max = max(cache_lens) + num_new + 3
    shape = (num_slots, num_kv_heads, S_max, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(B, num_new, num_heads, head_dim, generator=gen).to(dtype)
    q = q.transpose(1, 2)  # [B, H, T, D], a view: the runtime's layout
    return Case(q, k_cache, v_cache, torch.tensor(slots), torch.tensor(cache_lens), new_mask)


def cancelling(case: Case) -> Case:
    """The case with each odd position's key equal to the even one's before it and its value negated:
    every such pair of keys gets equal weights and adds up to 0, so the output is little more than the
    rounding of its sums and changes with their order. A bfloat16 output keeps the bits of an order
    change that random values round away."""
    k, v = case.k_cache.clone(), case.v_cache.clone()
    odd = torch.arange(1, k.shape[2], 2)
    k[:, :, odd] = k[:, :, odd - 1]
    v[:, :, odd] = -v[:, :, odd - 1]
    return Case(case.q, k, v, case.slots, case.cache_lens, case.new_mask)


# (cache_lens, T, H, Hkv, D, new_mask): ragged lengths, 0, and lengths around the 64-key tile
SHAPES = {
    "decode": ([0, 1, 17, 100], 1, 4, 4, 64, None),
    "decode-gqa3": ([5, 130], 1, 9, 3, 64, None),
    "chain-d128": ([0, 63, 64, 65], 4, 8, 2, 128, None),
    "tree63": ([0, 45], 63, 4, 2, 64, random_tree_mask(63)),
    "tree63-gqa3": ([70], 63, 6, 2, 64, random_tree_mask(63, seed=1)),  # 189 rows: two query tiles
    "tree16-d128": ([3, 129], 16, 8, 2, 128, random_tree_mask(16, seed=2)),
    "tree8-d32": ([20, 33], 8, 4, 2, 32, random_tree_mask(8, seed=3)),  # a head dim without its own code
    "tree-per-row": ([3, 0, 64, 70], 24, 6, 2, 64, random_tree_masks(4, 24, seed=7)),  # dynamic trees
    "prefill": ([0], 150, 2, 1, 64, None),  # 300 rows: three query tiles, causal early exit
    "prefill-chunk": ([37], 100, 4, 2, 64, None),
    "chain72": ([31, 95], 72, 9, 3, 64, None),  # past the AMX path's 64 new tokens, after 31 keys
}
