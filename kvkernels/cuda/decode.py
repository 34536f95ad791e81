"""CUDA decode: torch.ops.kvkernels_C.decode (csrc/kernels/decode.cuh).

What the kernels take (anything else gets a reason from `unsupported`, and auto selection gives
the call to Triton):
  * q float16 / bfloat16; the cache q's dtype, float8_e4m3fn or float8_e5m2 (per-head fp32 scales; one
    kernel reads both fp8 formats);
  * head dims 64, 128 and 256, any GQA group (Hq % Hkv == 0), contiguous or paged caches with any
    page size;
  * any strides, as long as q, k_cache and v_cache start 16-byte aligned, their last dimension is
    contiguous and every other stride of a dimension longer than 1 is a multiple of 16 bytes (K/V
    rows travel as 16-byte copies).

This wrapper plans the KV splits from shapes and the SM count (kvkernels.decode_plan, never tensor
values) and allocates out, lse and the split workspace from shapes, so a call is CUDA-graph
capturable and the raw op allocates nothing.
"""

from __future__ import annotations

import torch

from .. import decode_plan
from . import EMULATOR_SM_COUNT, device_reason, emulated, layout_reason, ops

_DTYPES = (torch.float16, torch.bfloat16)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_HEAD_DIMS = (64, 128, 256)
_MAX_CAPACITY = 2**30  # positions per sequence (kMaxCapacity in csrc/ops/decode.cpp)


def tile_tokens(head_dim: int) -> int:
    """KV rows per kernel tile (decode_tile_tokens in csrc/launch/decode.h): splits are multiples of it."""
    return 32 if head_dim == 256 else 64


def head_chunks(group: int, head_dim: int) -> int:
    """Blocks per KV head along the query heads: one block serves up to 64 heads of a group (32 at
    D = 256; decode_max_heads_per_block in csrc/launch/decode.h)."""
    per_block = 32 if head_dim == 256 else 64
    return -(-group // per_block)


def attended_capacity(capacity: int, window_left: int) -> int:
    """The most positions one sequence can attend: the cache's capacity, or the window."""
    return capacity if window_left < 0 else min(capacity, window_left + 1)


def plan(batch: int, kv_heads: int, group: int, head_dim: int, capacity: int, window_left: int, *,
         num_splits: int = 0, batch_invariant: bool = False, num_sms: int = 132) -> decode_plan.SplitPlan:
    """The split plan of one call. Splits cut the attended positions (counted from the window's first
    position), in multiples of the kernel's tile."""
    return decode_plan.plan_splits(batch, kv_heads * head_chunks(group, head_dim),
                                   attended_capacity(capacity, window_left), num_splits=num_splits,
                                   batch_invariant=batch_invariant, num_sms=num_sms, granule=tile_tokens(head_dim))


def workspace_shapes(split_plan: decode_plan.SplitPlan, batch: int, heads: int, head_dim: int):
    """Shapes of the fp32 split workspace (per-split outputs, per-split LSE); empty with one split."""
    if split_plan.num_splits == 1:
        return (0,), (0,)
    s = split_plan.num_splits
    return (s, batch, heads, head_dim), (s, batch, heads)


def config_reason(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None = None,
                  paged: bool = False, block_table: torch.Tensor | None = None) -> str | None:
    """Why the kernels cannot take these tensors (dtype, head dim, layout), device aside; None if they can."""
    if q.dtype not in _DTYPES:
        return f"the CUDA decode kernels take float16/bfloat16 queries, not {str(q.dtype).replace('torch.', '')}"
    if k_cache.dtype != q.dtype and k_cache.dtype not in _FP8:
        return f"cache dtype {k_cache.dtype} must be q's dtype {q.dtype}, float8_e4m3fn or float8_e5m2"
    d = q.shape[-1]
    if d not in _HEAD_DIMS:
        return f"head dim {d} is not one of {_HEAD_DIMS} (the CUDA decode kernels' template head dims)"
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    if (not paged or block_table is not None) and capacity >= _MAX_CAPACITY:
        return f"a cache of {capacity} positions per sequence is too large"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        reason = None if t is None else layout_reason(name, t)
        if reason:
            return reason
    return None


def unsupported(op: str, *, q, k_cache, v_cache=None, paged=False, block_table=None, **_) -> str | None:
    reason = device_reason("decode", {"q": q, "k_cache": k_cache, "v_cache": v_cache})
    if reason:
        return reason
    return config_reason(q, k_cache, v_cache, paged, block_table)


def decode(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, window_left, softcap, k_scale, v_scale,
           num_splits, batch_invariant, alibi_slopes=None):
    """Normalised entry point (see kvkernels.api) -> out [B, Hq, D] q.dtype, lse [B, Hq] fp32.
    alibi_slopes: fp32 [B, Hq] (batch stride may be 0) or None.

    q [B, Hq, D]; caches [B, S_max, Hkv, D], or [num_pages, page_size, Hkv, D] with block_table int32
    [B, max_pages]; cache_seqlens int32 [B]; k_scale/v_scale fp32 [Hkv] (fp8 caches, stride may be 0).
    """
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    out = torch.empty((B, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, hq), dtype=torch.float32, device=q.device)
    if B == 0 or hq == 0:
        return out, lse
    window_left = min(window_left, capacity)  # longer windows change nothing; keeps the int small
    split_plan = plan(B, hkv, hq // hkv, d, capacity, window_left, num_splits=num_splits,
                      batch_invariant=batch_invariant, num_sms=EMULATOR_SM_COUNT if emulated(q) else decode_plan.sm_count(q.device.index))
    ws_out_shape, ws_lse_shape = workspace_shapes(split_plan, B, hq, d)
    ws_out = torch.empty(ws_out_shape, dtype=torch.float32, device=q.device)
    ws_lse = torch.empty(ws_lse_shape, dtype=torch.float32, device=q.device)
    ops(q.device).decode(q, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, out, lse,
                         ws_out, ws_lse, float(softmax_scale), int(window_left), float(softcap),
                         split_plan.num_splits, split_plan.split_tokens, alibi_slopes)
    return out, lse
