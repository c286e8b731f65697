"""The slot cache: a write lands at each slot's scratch positions and nowhere else; `advance` and
`commit` keep what a step accepted; `free` empties a slot."""

from __future__ import annotations

import pytest
import torch

from runtime import cpu_kernels
from runtime.kv_cache import KVCache

L, N, Hkv, S, D = 2, 4, 2, 10, 3


def numbered_cache(lens: list[int]) -> KVCache:
    """A cache whose every K/V entry is distinct (V = -K), with slot n at length lens[n]."""
    cache = KVCache(L, N, Hkv, S, D)
    numbers = torch.arange(L * N * Hkv * S * D, dtype=torch.float32).view(L, N, Hkv, S, D)
    for layer in range(L):
        cache.k[layer].copy_(numbers[layer])
        cache.v[layer].copy_(-numbers[layer])
    cache.advance(torch.arange(N), torch.tensor(lens))
    return cache


def stacked(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's K and V, each [L, N, Hkv, S_max, D]."""
    return torch.stack(cache.k), torch.stack(cache.v)


@pytest.mark.parametrize("slots", [[2, 0], [2]], ids=["batched", "one"])
def test_write_fills_the_scratch_positions_of_its_slots_only(slots: list[int]) -> None:
    cache = KVCache(L, N, Hkv, S, D)
    for t in cache.k + cache.v:
        t.fill_(float("nan"))  # a stray write shows as a number where NaN should be, or the reverse
    lens = torch.tensor([2, 0, 5, 1])
    cache.advance(torch.arange(N), lens)
    B, T = len(slots), 3
    k_new = torch.randn(B, Hkv, T, D, generator=torch.Generator().manual_seed(0))
    v_new = torch.randn(B, Hkv, T, D, generator=torch.Generator().manual_seed(1))

    cache.write(1, cache.scratch(torch.tensor(slots), T), k_new, v_new)

    expected_k = torch.full((L, N, Hkv, S, D), float("nan"))  # [L, N, Hkv, S_max, D]
    expected_v = expected_k.clone()
    for b, slot in enumerate(slots):
        start = int(lens[slot])
        expected_k[1, slot, :, start:start + T] = k_new[b]
        expected_v[1, slot, :, start:start + T] = v_new[b]
    k, v = stacked(cache)
    torch.testing.assert_close(k, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v, expected_v, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(cache.lens, lens)  # scratch: kept only by advance or commit


def test_advance_keeps_the_scratch_entries_in_place() -> None:
    cache = numbered_cache([2, 0, 5, 1])
    k, v = stacked(cache)
    cache.advance(torch.tensor([2, 0]), torch.tensor([3, 1]))
    cache.advance(torch.tensor([3]), 4)
    assert cache.lens.tolist() == [3, 0, 8, 5]
    assert all(map(torch.equal, stacked(cache), (k, v)))


@pytest.mark.parametrize("ours", [True, False], ids=["our-cpu-kernel", "indexing"])
def test_commit_moves_the_accepted_nodes_to_contiguous_positions(ours: bool, monkeypatch) -> None:
    if ours:
        assert cpu_kernels.built()
    else:  # as where our kernels cannot be built (and in a compiled step, on any device)
        monkeypatch.setattr(cpu_kernels, "built", lambda: False)
    cache = numbered_cache([4, 2, 0, 0])
    k, v = stacked(cache)
    slots = torch.tensor([1, 0])  # [B]
    # slot 1 accepts nodes 0, 2, 1: nodes 1 and 2 swap places; node 5 is past its accepted_len.
    # slot 0 accepts nodes 0, 3; its zeros after them are past its accepted_len too.
    path = torch.tensor([[0, 2, 1, 5], [0, 3, 0, 0]])  # [B, P]
    accepted_len = torch.tensor([3, 2])  # [B]

    cache.commit(slots, path, accepted_len)

    for before in (k, v):  # [L, N, Hkv, S_max, D]
        before[:, 1, :, 2:5] = before[:, 1, :, [2, 4, 3]].clone()
        before[:, 0, :, 4:6] = before[:, 0, :, [4, 7]].clone()
    assert all(map(torch.equal, stacked(cache), (k, v)))
    assert cache.lens.tolist() == [6, 5, 0, 0]


def test_free_empties_one_slot_and_the_next_write_starts_at_zero() -> None:
    cache = numbered_cache([4, 2, 6, 1])
    cache.free(2)
    assert cache.lens.tolist() == [4, 2, 0, 1]
    k_new = torch.full((1, Hkv, 2, D), 0.5)  # [1, Hkv, T, D]
    cache.write(0, cache.scratch(torch.tensor([2]), 2), k_new, -k_new)
    assert torch.equal(cache.k[0][2, :, :2], k_new[0]) and torch.equal(cache.v[0][2, :, :2], -k_new[0])
