"""Our CPU attention kernel (`attention/cpu_attention.cpp`): equal to the naive attention without
reading what a sequence may not see, and a query's bits independent of the other queries in its call,
so that a tree node gets exactly what its token gets decoded alone after its ancestors."""

import pytest
import torch

from attention import attend, plan
from attention.cpu import cpu_attend
from runtime import cpu_kernels
from tests.attention.conftest import SHAPES, TOLERANCE, cancelling, make_case, tree_mask

pytestmark = pytest.mark.skipif(not cpu_kernels.built(), reason="no C++ compiler to build our CPU kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_matches_naive_reading_only_what_each_sequence_sees(name, dtype):
    lens, T, H, Hkv, D, new_mask = SHAPES[name]
    case = make_case(lens, T, H, Hkv, D, new_mask, dtype=dtype)
    batch = plan(case.slots, case.cache_lens, T, new_mask, backend="cpu")
    k, v = case.poisoned_caches()  # NaN past each sequence's keys and in the other slots
    got = attend(case.q, k, v, batch)
    assert got.shape == case.q.shape and got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, case.expected(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cached", [90, 95, 1])  # the chain's keys cross a block of 16 keys, or do not
@pytest.mark.parametrize("head_dim", [64, 128, 48])  # code of its own for 64 and 128; any multiple of 16
@pytest.mark.parametrize("values", ["random", "cancelling"])
def test_a_chain_verified_together_gets_the_bits_of_its_tokens_one_by_one(dtype, cached, head_dim, values):
    case = make_case([cached], 8, 9, 3, head_dim, None, dtype=dtype, seed=cached)
    case = cancelling(case) if values == "cancelling" else case
    together = cpu_attend(case.q, case.k_cache, case.v_cache, case.slots, case.cache_lens, None)
    for t in range(8):
        alone = cpu_attend(case.q[:, :, t:t + 1], case.k_cache, case.v_cache, case.slots,
                           case.cache_lens + t, None)
        assert torch.equal(alone, together[:, :, t:t + 1]), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cached", [29, 28])  # bf16 values pair keys by list index: odd and even prefixes
@pytest.mark.parametrize("values", ["random", "cancelling"])
def test_a_tree_node_gets_the_bits_of_its_path_decoded_as_a_chain(dtype, cached, values):
    parents = [-1, 0, 0, 1, 1, 2, 3, 6, 4]  # node 7's path: 0, 1, 3, 6, 7
    mask = tree_mask(parents)
    tree = make_case([cached], len(parents), 9, 3, 64, mask, dtype=dtype, seed=5)
    tree = cancelling(tree) if values == "cancelling" else tree
    verified = cpu_attend(tree.q, tree.k_cache, tree.v_cache, tree.slots, tree.cache_lens, mask)
    for node in range(len(parents)):
        path = [j for j in range(len(parents)) if mask[node, j]]
        # the same tokens decoded as a chain: the path's K/V right after the prefix, in order
        k, v = tree.k_cache.clone(), tree.v_cache.clone()
        slot = int(tree.slots[0])
        k[slot, :, cached:cached + len(path)] = tree.k_cache[slot, :, [cached + j for j in path]]
        v[slot, :, cached:cached + len(path)] = tree.v_cache[slot, :, [cached + j for j in path]]
        alone = cpu_attend(tree.q[:, :, node:node + 1], k, v, tree.slots,
                           tree.cache_lens + len(path) - 1, None)
        assert torch.equal(alone, verified[:, :, node:node + 1]), node


def test_bad_operands_raise_clear_errors():
    case = make_case([5], 2, 4, 2, 16, None)
    q, k, v, slots, lens = case.q, case.k_cache, case.v_cache, case.slots, case.cache_lens
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_attend(q, k, v, slots, lens + k.shape[2], None)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_attend(q, k, v, slots + k.shape[0], lens, None)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_attend(q.bfloat16(), k, v, slots, lens, None)
    with pytest.raises(RuntimeError, match="new_mask"):
        cpu_attend(q, k, v, slots, lens, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_attend(q[..., :8], k[..., :8].contiguous(), v[..., :8].contiguous(), slots, lens, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_attend(q.half(), k.half(), v.half(), slots, lens, None)


def test_the_plan_hands_the_kernel_plain_arrays():
    """Slots as the step reads them (a column of its table) are strided: the plan makes them plain."""
    case = make_case([5, 9], 1, 4, 2, 16, None)
    table = torch.stack([case.slots, case.cache_lens], dim=1)  # [B, 2]
    batch = plan(table[:, 0], table[:, 1], 1, backend="cpu")
    assert not table[:, 0].is_contiguous()
    torch.testing.assert_close(attend(case.q, case.k_cache, case.v_cache, batch), case.expected(),
                               atol=2e-5, rtol=2e-5)
