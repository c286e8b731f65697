"""`cpu_attend`: our C++ attention for a few new tokens per sequence on the CPU (`cpu_attention.cpp`,
where its reasons are), as `medusa::cpu_attend`. `runtime.cpu_kernels` builds it with our other CPU
kernels (`runtime.cpu_kernels.built()`), so it runs once that has said True; `attention.attend` calls
it for the "cpu" backend.
"""

from __future__ import annotations

from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_attention.cpp")

_library = torch.library.Library("medusa", "FRAGMENT")
_library.define("cpu_attend(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor cache_lens, "
                "Tensor? new_mask) -> Tensor")


@torch.library.register_fake("medusa::cpu_attend")
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
      cache_lens: torch.Tensor, new_mask: torch.Tensor | None) -> torch.Tensor:
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)  # as the kernel lays it out


# q [B, H, T, D], k_cache / v_cache [N, Hkv, S_max, D], slots / cache_lens [B] int64, new_mask [T, T] or
# [B, T, T] bool or None (causal) -> [B, H, T, D]
cpu_attend = torch.ops.medusa.cpu_attend
