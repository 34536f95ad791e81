"""CUDA cache attention: torch.ops.kvkernels_C.cache_attention, the decode kernel template of
csrc/kernels/decode.cuh with several query tokens per sequence (kCacheAttn).

The rows of a block are (query token, head of the GQA group) pairs, token-major, up to 64 of them
(32 at D = 256): a speculative step (a few tokens x a group) is one block per (sequence, KV head)
and reads each K/V byte once, as decode does. Longer query runs (chunked prefill) are cut into row
tiles, one block each, that stop at their last row's causal limit. Long contexts are split along
the KV axis (kvkernels.decode_plan) and merged by decode's merge kernel in split order.

What the kernels take: as decode (kvkernels/cuda/decode.py: fp16/bf16 q, the cache q's dtype or
fp8 e4m3 / e5m2, head dims 64/128/256, 16-byte aligned layouts with a contiguous last dimension); anything
else gets a reason from `unsupported` and auto selection gives the call to Triton.

Nothing here reads tensor values: the plan and every allocation come from shapes and max_seqlen_q,
so a call is CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from .. import decode_plan
from . import EMULATOR_SM_COUNT, device_reason, emulated, ops
from .decode import config_reason, tile_tokens


def rows_per_block(rows: int, head_dim: int) -> int:
    """MMA rows of one block for a sequence of `rows` (token, head) rows: 16 x the smallest power of
    two covering them, at most 64 (32 at D = 256). Mirrors decode_rows_per_block (csrc/launch/decode.h)."""
    most = 32 if head_dim == 256 else 64
    per_block = 16
    while per_block < rows and per_block < most:
        per_block *= 2
    return per_block


def row_tiles(max_seqlen_q: int, group: int, head_dim: int) -> int:
    rows = max(1, max_seqlen_q) * group
    return -(-rows // rows_per_block(rows, head_dim))


def attended_span(capacity: int, window_left: int, causal: bool, max_seqlen_q: int, group: int,
                  head_dim: int) -> int:
    """The most positions one row tile attends (cache_attention_span in csrc/launch/decode.h): the
    capacity, or with a window its length plus the tile's query tokens (causal) or all of a
    sequence's query tokens (not causal: each row sees to the end of the sequence)."""
    if window_left < 0:
        return capacity
    max_q = max(1, max_seqlen_q)
    tile_tokens_q = (rows_per_block(max_q * group, head_dim) - 1) // group + 2
    tokens = min(tile_tokens_q, max_q) if causal else max_q
    return min(capacity, window_left + tokens)


def plan(batch: int, kv_heads: int, group: int, head_dim: int, capacity: int, window_left: int, causal: bool,
         max_seqlen_q: int, *, num_splits: int = 0, batch_invariant: bool = False,
         num_sms: int = 132) -> decode_plan.SplitPlan:
    """The split plan of one call: decode's, with row tiles counted as programs and the span a row
    tile may attend in place of decode's window."""
    span = attended_span(capacity, window_left, causal, max_seqlen_q, group, head_dim)
    return decode_plan.plan_splits(batch, kv_heads * row_tiles(max_seqlen_q, group, head_dim), span,
                                   num_splits=num_splits, batch_invariant=batch_invariant, num_sms=num_sms,
                                   granule=tile_tokens(head_dim))


def unsupported(op: str, *, q, k_cache, v_cache=None, paged=False, block_table=None, **_) -> str | None:
    reason = device_reason("cache_attention", {"q": q, "k_cache": k_cache, "v_cache": v_cache})
    if reason:
        return reason
    return config_reason(q, k_cache, v_cache, paged, block_table)


def cache_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, block_table, causal,
                    softmax_scale, window_left, softcap, k_scale, v_scale, num_splits, batch_invariant,
                    alibi_slopes=None):
    """Normalised entry point (see kvkernels.api) -> out like q (q.dtype), lse [B, Hq, Sq] or [Hq, Tq] fp32.
    alibi_slopes: fp32 [B, Hq] (batch stride may be 0) or None.

    q dense [B, Sq, Hq, D] or ragged [Tq, Hq, D] with cu_seqlens_q int32 [B+1] and max_seqlen_q >= every
    n_b; caches [B, S_max, Hkv, D], or [num_pages, page_size, Hkv, D] with block_table int32 [B, max_pages];
    cache_seqlens int32 [B] counting the new tokens; k_scale/v_scale fp32 [Hkv] (fp8 caches).
    """
    ragged = cu_seqlens_q is not None
    hq, d = q.shape[-2], q.shape[-1]
    B = cache_seqlens.shape[0]
    hkv = k_cache.shape[2]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    if ragged:
        tokens, max_q = q.shape[0], min(int(max_seqlen_q), q.shape[0])
        lse = torch.empty((hq, tokens), dtype=torch.float32, device=q.device)
    else:
        tokens, max_q = B * q.shape[1], q.shape[1]
        lse = torch.empty((B, hq, q.shape[1]), dtype=torch.float32, device=q.device)
    if B == 0 or tokens == 0 or hq == 0 or max_q == 0:
        return torch.zeros_like(q), lse.fill_(float("-inf"))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    window_left = -1 if window_left >= capacity else window_left  # reaches past the cache: no window
    num_sms = EMULATOR_SM_COUNT if emulated(q) else decode_plan.sm_count(q.device.index)
    split_plan = plan(B, hkv, hq // hkv, d, capacity, window_left, causal, max_q, num_splits=num_splits,
                      batch_invariant=batch_invariant, num_sms=num_sms)
    s = split_plan.num_splits
    ws_out = torch.empty((s, tokens, hq, d) if s > 1 else (0,), dtype=torch.float32, device=q.device)
    ws_lse = torch.empty((s, tokens, hq) if s > 1 else (0,), dtype=torch.float32, device=q.device)
    ops(q.device).cache_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, block_table, k_scale, v_scale,
                                  out, lse, ws_out, ws_lse, max_q if ragged else q.shape[1], bool(causal),
                                  float(softmax_scale), int(window_left), float(softcap), s, split_plan.split_tokens,
                                  alibi_slopes)
    return out, lse
