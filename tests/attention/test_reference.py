"""The tiled online-softmax and split-KV references equal the naive definition; masks say who sees whom."""

import pytest
import torch

from attention.masks import dense_mask, pack_bits
from attention.reference import naive_attention, split_attention, tiled_attention
from tests.attention.conftest import make_case, random_tree_mask, random_tree_masks, tree_mask


@pytest.mark.parametrize("per_row", [False, True])
def test_dense_mask_matches_definition(per_row):
    cache_lens, T, S = torch.tensor([0, 3, 9]), 5, 16
    new_mask = random_tree_masks(3, T, seed=0) if per_row else random_tree_mask(T, seed=0)
    got = dense_mask(cache_lens, new_mask, T, S)
    for b, L in enumerate(cache_lens.tolist()):
        row_mask = new_mask[b] if per_row else new_mask
        for t in range(T):
            for s in range(S):
                visible = s < L or (L <= s < L + T and bool(row_mask[t, s - L]))
                assert bool(got[b, 0, t, s]) == visible
    causal = dense_mask(cache_lens, None, T, S)
    assert torch.equal(causal, dense_mask(cache_lens, torch.ones(T, T, dtype=torch.bool).tril(), T, S))


def test_tree_mask_sees_ancestors_only():
    #      0
    #    1   2
    #    3
    mask = tree_mask([-1, 0, 0, 1])
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]


@pytest.mark.parametrize("T", [1, 31, 32, 33, 63, 64])
def test_pack_bits_round_trip(T):
    mask = torch.rand(T, T, generator=torch.Generator().manual_seed(T)) < 0.5
    words = pack_bits(mask)  # [T, W] int32
    assert words.dtype == torch.int32 and words.shape == (T, -(-T // 32))
    j = torch.arange(T)
    unpacked = ((words[:, j // 32] >> (j % 32)) & 1).bool()
    assert torch.equal(unpacked, mask)
    per_row = torch.stack([mask, ~mask])  # [2, T, T]: one mask per sequence packs row by row
    assert torch.equal(pack_bits(per_row), torch.stack([words, pack_bits(~mask)]))


@pytest.mark.parametrize("new_mask", ["causal", "tree"])
@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
def test_tiled_and_split_equal_naive(new_mask, block_size):
    T = 9
    mask = None if new_mask == "causal" else random_tree_mask(T, seed=3)
    case = make_case([0, 21, 50], T, num_heads=6, num_kv_heads=2, head_dim=32, new_mask=mask)
    S = case.max_len
    visible = dense_mask(case.cache_lens, mask, T, S)
    k, v = case.k_cache[case.slots, :, :S], case.v_cache[case.slots, :, :S]
    expected = naive_attention(case.q, k, v, visible)
    got = tiled_attention(case.q, k, v, visible, block_size)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    for num_splits in (2, 5):
        got = split_attention(case.q, k, v, visible, num_splits, block_size)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
