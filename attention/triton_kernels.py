"""Triton kernels: FlashAttention over the slot-based KV cache, for prefill, decoding and trees.

One kernel serves every case. A program owns one sequence b, one KV head, and a tile of
BLOCK_M query rows; the rows are the (new token t, query head g) pairs of that KV head's group,
token-major (row = t * GROUP + g), so the GROUP query heads that share a KV head read each K/V
tile once (grouped-query attention without copying K/V). The program walks
  1. the cached prefix, keys [0, cache_lens[b]) of slot slots[b], all visible, then
  2. the T new tokens, keys cache_lens[b] + j, visible when new_mask[t, j] (bit-packed; shared by
     the batch, or one per sequence for dynamic trees) or j <= t (causal: prefill and plain decoding),
with the online softmax of `attention.reference.tiled_attention` (scores in base 2: the
1/sqrt(D) scale is folded with log2(e), so exp becomes exp2).

Decoding (T = 1, or a small tree) gives few programs: B x Hkv. When that cannot fill the GPU and
the context is long, the prefix is cut into splits run as separate programs (flash-decoding,
`attention.reference.split_attention`); each writes a normalised partial output and its
log-sum-exp, and `_combine_kernel` merges them. The new tokens go to the last split.

Prefill is the same kernel with a causal mask and T up to thousands: T is tiled over programs,
and a tile stops at the last key its last token can see.

Importing this module imports Triton; `attention` imports it only when the Triton backend is
used. Legend: B batch, H query heads, Hkv KV heads, T new tokens, D head dim, N cache slots,
S_max positions per slot, W = ceil(T / 32) mask words per row.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

MIN_SPLIT_LEN = 256  # fewest cached keys worth a split of their own
MAX_SPLITS = 64


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b accumulated in float32. DOT_UPCAST (bf16 under the interpreter, whose dot does not
    know bf16) multiplies in float32 ("ieee") instead: the same products, bf16 x bf16 is exact in fp32."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, scores, v, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Fold one tile of base-2 scores [M, N] (-inf where hidden) and its values [N, D] in."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))  # m_i starts at -1e30, so m_new is finite
    rescale = tl.exp2(m_i - m_new)  # [M]
    p = tl.exp2(scores - m_new[:, None])  # [M, N]: 0 where hidden
    l_i = l_i * rescale + tl.sum(p, 1)
    acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return acc, m_new, l_i


@triton.jit
def _attend_kernel(
    q_ptr,  # [B, H, T, D]
    k_ptr, v_ptr,  # [N, Hkv, S_max, D]: one layer of the cache
    out_ptr,  # [B, H, T, D] out dtype; split mode: [splits, B, H, T, D] float32 partial outputs
    lse_ptr,  # split mode: [splits, B, H, T] float32 base-2 log-sum-exp of each split (else unused)
    slots_ptr, lens_ptr,  # [B] int64: cache slot and cached length of each sequence
    mask_ptr,  # [T, W] or [B, T, W] int32 bit-packed new_mask (unused when CAUSAL)
    stride_qb, stride_qh, stride_qt,
    stride_kn, stride_kh, stride_ks,
    stride_vn, stride_vh, stride_vs,
    stride_os, stride_ob, stride_oh, stride_ot,
    stride_ls, stride_lb, stride_lh,
    stride_mb,  # 0 when the batch shares one mask
    num_kv_heads, num_new, mask_words, split_len, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile passes a Python float as fp64, Triton as fp32
    tile = tl.program_id(0)
    b = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    cache_len = tl.load(lens_ptr + b).to(tl.int32)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [M]
    t = rows // GROUP  # new token of each row
    head = kv_head * GROUP + rows % GROUP  # query head of each row
    row_ok = t < num_new
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :],
                mask=row_ok[:, None], other=0.0)  # [M, D]
    k_base = k_ptr + slot * stride_kn + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vn + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row that saw nothing yet gives no NaN
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # 1. the cached prefix (this split's part of it), visible to every row
    if SPLIT:
        lo = split * split_len
        hi = tl.minimum(lo + split_len, cache_len)
    else:
        lo = 0
        hi = cache_len
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)  # [N]
        key_ok = keys < hi
        k = tl.load(k_base + keys[None, :] * stride_ks + d[:, None],
                    mask=key_ok[None, :], other=0.0)  # [D, N]: K^T
        scores = _dot(q, k, DOT_PRECISION, DOT_UPCAST) * qk_scale  # [M, N]
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        v = tl.load(v_base + keys[:, None] * stride_vs + d[None, :],
                    mask=key_ok[:, None], other=0.0)  # [N, D]
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, scores, v, DOT_PRECISION, DOT_UPCAST)

    # 2. the new tokens, under the tree (or causal) mask; in split mode, by the last split only
    if split == tl.num_programs(2) - 1:
        if CAUSAL:  # the tile's last token sees new tokens up to itself
            new_hi = tl.minimum(num_new, ((tile + 1) * BLOCK_M - 1) // GROUP + 1)
        else:
            new_hi = num_new
        for first in range(0, new_hi, BLOCK_N):  # (not `start`: its type may differ from the loop's above)
            j = first + tl.arange(0, BLOCK_N)  # [N]: index among the new tokens
            j_ok = j < num_new
            keys = cache_len + j
            k = tl.load(k_base + keys[None, :] * stride_ks + d[:, None], mask=j_ok[None, :], other=0.0)
            scores = _dot(q, k, DOT_PRECISION, DOT_UPCAST) * qk_scale
            if CAUSAL:
                visible = (j[None, :] <= t[:, None]) & j_ok[None, :]
            else:
                words = tl.load(mask_ptr + b * stride_mb + t[:, None] * mask_words + (j[None, :] >> 5),
                                mask=row_ok[:, None] & j_ok[None, :], other=0)  # [M, N] int32
                visible = ((words >> (j[None, :] & 31)) & 1) != 0
            scores = tl.where(visible, scores, float("-inf"))
            v = tl.load(v_base + keys[:, None] * stride_vs + d[None, :], mask=j_ok[:, None], other=0.0)
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, scores, v, DOT_PRECISION, DOT_UPCAST)

    # the one division (a split that saw nothing writes zeros and lse = -inf)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_offsets = b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + d[None, :]
    if SPLIT:
        tl.store(out_ptr + split * stride_os + out_offsets, out, mask=row_ok[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + split * stride_ls + b * stride_lb + head * stride_lh + t, lse, mask=row_ok)
    else:
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_kernel(
    part_ptr,  # [splits, B, H, T, D] float32, contiguous
    lse_ptr,  # [splits, B, H, T] float32, contiguous
    out_ptr,  # [B, H, T, D]
    num_splits, num_heads, num_new,
    stride_ps, stride_ls, stride_ob, stride_oh, stride_ot,
    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Merge the splits of one (b, h, t) row: weights exp2(lse_split - max lse), normalised."""
    row = tl.program_id(0)  # (b * H + h) * T + t
    t = row % num_new
    h = (row // num_new) % num_heads
    b = row // (num_new * num_heads)
    s = tl.arange(0, SPLITS)
    s_ok = s < num_splits
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + s * stride_ls + row, mask=s_ok, other=float("-inf"))  # [SPLITS]
    weights = tl.exp2(lse - tl.max(lse, 0))  # the last split always saw the token itself
    parts = tl.load(part_ptr + s[:, None] * stride_ps + row * HEAD_DIM + d[None, :],
                    mask=s_ok[:, None], other=0.0)  # [SPLITS, D]
    out = tl.sum(weights[:, None] * parts, 0) / tl.sum(weights, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + t * stride_ot + d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: no parallelism to fill
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_programs: int, max_cached: int, num_sms: int) -> int:
    """Enough splits for about two programs per SM, each split at least MIN_SPLIT_LEN keys."""
    if num_programs >= num_sms:
        return 1
    return max(1, min(-(-2 * num_sms // num_programs), max_cached // MIN_SPLIT_LEN, MAX_SPLITS))


def _launch_config(block_m: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a tile of block_m query rows."""
    num_warps = 4 if block_m <= 64 else 8
    big = dtype == torch.float32 or block_m * head_dim >= 128 * 128
    return 64, num_warps, 2 if big else 3


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
           cache_lens: torch.Tensor, packed_mask: torch.Tensor | None, max_len: int,
           num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
           num_stages: int | None = None) -> torch.Tensor:
    """Attention of T new tokens per sequence over its cache slot; see the module docstring.

    q: [B, H, T, D]; k_cache, v_cache: [N, Hkv, S_max, D] with the new tokens' K/V already at
    cache_lens[b] ..; slots, cache_lens: [B] int64; packed_mask: [T, W] int32, or [B, T, W] for one
    tree per sequence (None = causal);
    max_len: max(cache_lens) + T. num_splits: None picks one from the shape; block_n, num_warps,
    num_stages override the launch configuration (for tuning). Returns [B, H, T, D] in q's dtype
    (a view of a [B, T, H, D] tensor, the layout the output projection wants).
    """
    B, H, T, D = q.shape
    N, Hkv, S_max, _ = k_cache.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == D and H % Hkv == 0
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert q.stride(3) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert D >= 16 and D & (D - 1) == 0, "head dim must be a power of two >= 16"
    assert slots.shape == (B,) and cache_lens.shape == (B,) and slots.dtype == cache_lens.dtype == torch.int64
    assert max_len <= S_max
    group = H // Hkv
    block_m = min(128, max(16, triton.next_power_of_2(group * T)))
    config_n, config_warps, config_stages = _launch_config(block_m, D, q.dtype)
    block_n = block_n or config_n
    num_tiles = triton.cdiv(group * T, block_m)
    max_cached = max_len - T
    if num_splits is None:
        num_splits = choose_num_splits(num_tiles * B * Hkv, max_cached, _num_sms(q.device))
    split_len = triton.cdiv(triton.cdiv(max(max_cached, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(max_cached, split_len))  # no split left without keys

    out = q.new_empty(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
    if num_splits > 1:
        dest = torch.empty(num_splits, B, H, T, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_splits, B, H, T, dtype=torch.float32, device=q.device)
        dest_strides = dest.stride()[:4]
        lse_strides = lse.stride()[:3]
    else:
        dest, lse = out, out  # lse unused
        dest_strides = (0, *out.stride()[:3])
        lse_strides = (0, 0, 0)
    mask = cache_lens if packed_mask is None else packed_mask  # a placeholder pointer when causal
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"  # CPU tensors: the interpreter
    grid = (num_tiles, B * Hkv, num_splits)
    _attend_kernel[grid](
        q, k_cache, v_cache, dest, lse, slots, cache_lens, mask,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *dest_strides, *lse_strides,
        packed_mask.stride(0) if packed_mask is not None and packed_mask.dim() == 3 else 0,
        Hkv, T, 0 if packed_mask is None else packed_mask.shape[-1], split_len,
        math.log2(math.e) / math.sqrt(D),
        GROUP=group, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=packed_mask is None, SPLIT=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        DOT_UPCAST=upcast,
        num_warps=num_warps or config_warps, num_stages=num_stages or config_stages,
    )
    if num_splits > 1:
        _combine_kernel[(B * H * T,)](
            dest, lse, out, num_splits, H, T,
            dest.stride(0), lse.stride(0), out.stride(0), out.stride(1), out.stride(2),
            SPLITS=triton.next_power_of_2(num_splits), HEAD_DIM=D,
        )
    return out
