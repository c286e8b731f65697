"""A KV cache with a fixed number of slots: one sequence per slot, each with its own length.

A forward writes its T new tokens' K/V at `lens[slot] .. lens[slot] + T` (scratch positions) and
does not move `lens`. The engine then calls `advance` (prefill, plain decoding: every new token
is kept) or `commit` (speculation: only the accepted tree nodes are kept, moved to contiguous
positions). Rejected scratch entries are overwritten by the next step.

Legend: L layers, N slots, Hkv KV heads, S_max positions per slot, D head dim, B batch.
"""

from __future__ import annotations

import torch

from runtime import cpu_kernels

# where a forward's new tokens go (`KVCache.scratch`): (slot, first position) as host ints, or slot rows
# [B, 1] and positions [B, T]
Scratch = tuple[int, int] | tuple[torch.Tensor, torch.Tensor]


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        # L x [N, Hkv, S_max, D]: one tensor per layer, which a compiled step writes in place (views
        # of one [L, ...] tensor were copied whole by every write under torch.compile, aot_eager:
        # 700 ms per SmolLM2 token against 55 ms with a tensor per layer)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lens = torch.zeros(num_slots, dtype=torch.long, device=device)  # [N]
        self.max_len = max_len
        self.num_slots = num_slots

    def scratch(self, slots: torch.Tensor, num_new: int) -> Scratch:
        """Where a forward's `num_new` tokens per sequence go, the positions after each slot's length,
        found once per forward for every layer's `write`: for one sequence on the CPU, its slot and first
        position as host ints, which a slice write takes; otherwise slot rows [B, 1] and positions
        [B, T]. (Found in each of SmolLM2's 30 layers instead, they cost 5% of a step: bf16, 12
        Spec-Bench prompts, same process, alternating, Intel Xeon with AMX: plain 28.31 against 26.88
        ms a step, the draft layer 44.49 against 42.47.)"""
        lens = self.lens[slots]  # [B]
        if slots.shape[0] == 1 and lens.device.type == "cpu" and not torch.compiler.is_compiling():
            return int(slots[0]), int(lens[0])
        return slots[:, None], lens[:, None] + torch.arange(num_new, device=lens.device)

    def write(self, layer: int, at: Scratch, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Store new K/V of one layer at the scratch positions `at` (`scratch`).

        k_new, v_new: [B, Hkv, T, D].
        """
        rows, pos = at
        if isinstance(rows, int):
            T = k_new.shape[2]
            self.k[layer][rows, :, pos:pos + T] = k_new[0]
            self.v[layer][rows, :, pos:pos + T] = v_new[0]
            return
        # advanced indices around a slice put their broadcast dims first: [B, T, Hkv, D]
        self.k[layer][rows, :, pos] = k_new.transpose(1, 2)
        self.v[layer][rows, :, pos] = v_new.transpose(1, 2)

    def advance(self, slots: torch.Tensor, num_new: torch.Tensor | int) -> None:
        """Keep the first `num_new` scratch entries of each slot as they are (no move)."""
        self.lens[slots] += num_new

    def commit(self, slots: torch.Tensor, path: torch.Tensor, accepted_len: torch.Tensor) -> None:
        """Keep each sequence's accepted tree nodes, moved to contiguous positions.

        slots: [B]; path: [B, P] indices of accepted nodes among the T new tokens, in order
        (entries at and after accepted_len[b] are ignored); accepted_len: [B].
        """
        B, P = path.shape
        lens = self.lens[slots]  # [B]
        step = torch.arange(P, device=path.device)  # [P]
        keep = step[None, :] < accepted_len[:, None]  # [B, P]
        src = torch.where(keep, lens[:, None] + path, lens[:, None] + step)  # [B, P]
        dst = lens[:, None] + step  # [B, P]
        if cpu_kernels.eager_cpu(self.lens):
            cpu_kernels.move_positions(self.k + self.v, slots.long().contiguous(), src, dst)  # one call
            self.lens[slots] = lens + accepted_len
            return
        rows = slots[:, None]  # [B, 1]
        # gather all sources before writing: a node may move onto another accepted node's place
        for k, v in zip(self.k, self.v, strict=True):
            k_moved, v_moved = k[rows, :, src], v[rows, :, src]  # [B, P, Hkv, D]
            k[rows, :, dst] = k_moved
            v[rows, :, dst] = v_moved
        self.lens[slots] = lens + accepted_len

    def free(self, slot: int) -> None:
        self.lens[slot] = 0

    def reuse(self, slot: int, source: int, n: int) -> None:
        """Start a slot from the first n positions of slot `source` (itself: nothing moves)."""
        if source != slot:
            for k, v in zip(self.k, self.v, strict=True):
                k[slot, :, :n] = k[source, :, :n]
                v[slot, :, :n] = v[source, :, :n]
        self.lens[slot] = n
