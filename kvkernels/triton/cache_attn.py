"""Cache attention in Triton: several new query tokens per sequence against a contiguous or paged KV
cache (chunked prefill, speculative verification, prefix reuse, mixed decode/prefill batches).

The cache already holds the new tokens' keys and values: sequence b has L_b = cache_seqlens[b]
tokens, of which its n_b queries are the last, so query i sits at position p_i = L_b - n_b + i and
sees [0, p_i] (causal) or [0, L_b), and with window_left >= 0 only positions >= p_i - window_left.

One kernel, _cache_attention_kernel, one program per (sequence b, KV head h, row tile m, split s).
The rows of a tile are (query token, query head of h's group) pairs, token-major: row r is token
r // GROUP, head h * GROUP + r % GROUP. So the queries of a sequence and the heads sharing a KV head
share every K/V tile: a few queries (speculative decoding: 4 tokens x 8 heads = 32 rows) fit one
tile and read each K/V byte once per (sequence, KV head, split), as decode does; thousands of
queries (chunked prefill) are cut into row tiles, each of which stops at its own last row's causal
limit, so tiles above the diagonal are never visited. Long contexts with few rows are split along
the KV axis like decode and merged by the decode merge kernel, in a fixed order (deterministic).

Nothing reads tensor values on the host and every allocation is sized from shapes (max_seqlen_q
for ragged q), so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import decode_plan
from . import KernelConfig, Launch, Target, device_target
from .decode import (FP8_FORMAT, LN2_C, LOG2E, MAX_HEAD_DIM, NEG_2LOG2E_C, NO_FP8, SUPPORTED_DTYPES,
                     _interpreted_bf16, _next_pow2, cache_dtype_reason, dequant_fp8, fp8_storage, fp8_target_reason,
                     merge_launch, page_size_reason)


# ------------------------------------------------------------------------------------- kernel


@triton.jit
def _cache_attention_kernel(
    Q,            # dense [B, Sq, Hq, D] | ragged [Tq, Hq, D]; fp16/bf16 (fp32 when bf16 is interpreted)
    K,            # contiguous [B, S_max, Hkv, D] | paged [num_pages, page_size, Hkv, D]; q's dtype, fp8 e4m3
                  # (float8e4nv) or e5m2 (its bytes, uint8: dequant_fp8)
    V,            # same layout and dtype as K
    SEQLENS,      # [B] int32: L_b, sequence b's tokens in the cache including its n_b new ones
    CU_Q,         # [B + 1] int32 (RAGGED only): sequence b's queries are tokens [CU_Q[b], CU_Q[b+1]) of Q
    BLOCK_TABLE,  # [B, max_pages] int32 (PAGED only)
    K_SCALE,      # [Hkv] fp32, stride may be 0 (fp8, or HAS_SCALE): key = stored * K_SCALE[h]
    V_SCALE,      # [Hkv] fp32, stride may be 0 (with K_SCALE)
    ALIBI,        # [B, Hq] fp32 ALiBi slopes, batch stride stride_ab (may be 0) (HAS_ALIBI only)
    OUT,          # final: like Q (q's dtype) | partial: [B, Sq, Hq, splits, D] or [Tq, Hq, splits, D] fp32
    LSE,          # final: [B, Hq, Sq] or [Hq, Tq] fp32 natural log | partial: [B, Sq, Hq, splits] or [Tq, Hq, splits], log2
    stride_qb, stride_qt, stride_qh,          # stride_qb = 0 when RAGGED (tokens are indexed globally)
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btb, stride_btp,
    stride_ksc, stride_vsc,
    stride_ab,
    stride_ob, stride_ot, stride_oh, stride_os,
    stride_lb, stride_lt, stride_lh, stride_ls,
    num_kv_heads,        # Hkv
    num_row_tiles,       # cdiv(max_seqlen_q * GROUP, BLOCK_M)
    dense_sq,            # Sq (dense q only)
    capacity,            # S_max, or max_pages * page_size
    num_pages,           # pages in the paged cache (entries outside [0, num_pages) are skipped)
    split_tokens,        # tokens per split, a multiple of BLOCK_N
    window_left,         # -1: unbounded; else only positions >= p_i - window_left
    qk_scale,            # softmax_scale * log2(e), or softmax_scale / softcap with HAS_SOFTCAP
    cap_log2,            # softcap * log2(e) (HAS_SOFTCAP only)
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, PAGE_ALIGNED: tl.constexpr, RAGGED: tl.constexpr, CAUSAL: tl.constexpr,
    FP8: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FINAL: tl.constexpr, HAS_ALIBI: tl.constexpr = False,
):
    """For each row r = (token i, head g) of the tile, over the split's visible positions n, in base 2:

        s2[r, n] = log2(e) * score(q[i, g] . k[n] * softmax_scale * k_scale)     (score = softcap or identity)
                   - log2(e) * slope[g] * |p_i - n|                              (HAS_ALIBI)
        m = max_n s2,  l = sum_n 2^(s2 - m),  out[r] = v_scale * sum_n 2^(s2 - m) v[n] / l,  lse2 = m + log2(l)

    computed online tile by tile. Position n is visible to row r iff lo_i <= n < hi_i with
    hi_i = p_i + 1 (causal) or L_b, lo_i = max(p_i - window_left, 0) (window) or 0, intersected with
    the split. Positions outside every row's range of the tile, and rows of pages outside
    [0, num_pages), are masked out of every load: never read. A row that sees nothing gets out 0 and
    lse -inf.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tile = pid % num_row_tiles
    bh = pid // num_row_tiles
    h = bh % num_kv_heads
    b = bh // num_kv_heads
    b64 = b.to(tl.int64)

    seqlen = tl.load(SEQLENS + b64)
    seqlen = tl.minimum(tl.maximum(seqlen, 0), capacity)
    if RAGGED:
        q_first = tl.load(CU_Q + b64)
        n_q = tl.load(CU_Q + b64 + 1) - q_first
        tok0_64 = q_first.to(tl.int64)
    else:
        n_q = dense_sq
        tok0_64 = b64 * 0

    offs_r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    r_mask = offs_r < n_q * GROUP
    d_mask = offs_d < HEAD_DIM
    tok = offs_r // GROUP                  # query token of each row, within the sequence
    heads = h * GROUP + offs_r % GROUP     # query head of each row
    tok64 = tok0_64 + tok.to(tl.int64)

    # Each row's visible positions [row_lo, row_hi); rows past n_q see nothing.
    pos_q = seqlen - n_q + tok
    if CAUSAL:
        row_hi = tl.minimum(pos_q + 1, seqlen)
    else:
        row_hi = tl.zeros([BLOCK_M], tl.int32) + seqlen
    row_hi = tl.where(r_mask, row_hi, 0)
    row_lo = tl.where(window_left >= 0, tl.maximum(pos_q - window_left, 0), 0)
    # The tile's range: rows are token-major, so its first row has the smallest lo and its last
    # valid row the largest hi.
    tile_first = tl.minimum(tile * BLOCK_M, tl.maximum(n_q * GROUP - 1, 0)) // GROUP
    tile_last = tl.minimum(tile * BLOCK_M + BLOCK_M, n_q * GROUP) // GROUP - 1
    first_pos = seqlen - n_q + tile_first
    last_pos = seqlen - n_q + tile_last
    lo = tl.where(window_left >= 0, tl.maximum(first_pos - window_left, 0), 0)
    if CAUSAL:
        hi = tl.minimum(last_pos + 1, seqlen)
    else:
        hi = seqlen
    hi = tl.where(tile * BLOCK_M < n_q * GROUP, hi, 0)
    split_lo = split * split_tokens
    start = tl.maximum(split_lo, lo)
    end = tl.minimum(split_lo + split_tokens, hi)
    # Tiles lie on BLOCK_N boundaries (split_tokens is a multiple of BLOCK_N), so tiles wholly
    # outside [start, end) are never visited, and a tile never straddles a page when PAGE_ALIGNED.
    first_tile = (start // BLOCK_N) * BLOCK_N

    q_ptr = Q + b64 * stride_qb + tok64[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr, mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    scale = qk_scale
    if HAS_SCALE:
        scale = scale * tl.load(K_SCALE + h * stride_ksc)

    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b64 * stride_ab + heads, mask=r_mask, other=0.0) * 1.4426950408889634

    k_head = K + h * stride_kh
    v_head = V + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    for t0 in range(first_tile, end, BLOCK_N):
        pos = t0 + offs_n
        valid = (pos >= start) & (pos < end)
        if PAGED:
            if PAGE_ALIGNED:
                page = tl.load(BLOCK_TABLE + b64 * stride_btb + (t0 // PAGE_SIZE) * stride_btp)
                valid = valid & (page >= 0) & (page < num_pages)
                page64 = page.to(tl.int64)
                rows = (t0 % PAGE_SIZE) + offs_n
            else:
                page = tl.load(BLOCK_TABLE + b64 * stride_btb + (pos // PAGE_SIZE) * stride_btp, mask=valid, other=0)
                valid = valid & (page >= 0) & (page < num_pages)
                page64 = page.to(tl.int64)
                rows = pos % PAGE_SIZE
            k_rows = page64 * stride_kb + rows * stride_ks
            v_rows = page64 * stride_vb + rows * stride_vs
        else:
            pos64 = pos.to(tl.int64)
            k_rows = b64 * stride_kb + pos64 * stride_ks
            v_rows = b64 * stride_vb + pos64 * stride_vs
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP8 != 0:
            # fp8 values are exact in fp16/bf16: the scale is folded into the logits and the output.
            k = dequant_fp8(k, FP8, q.dtype)
            v = dequant_fp8(v, FP8, q.dtype)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)              # [BLOCK_M, BLOCK_N]
        if HAS_SOFTCAP:
            # softcap * tanh(x / softcap), tanh through exp2 of -2|x| (no overflow for any x).
            x = s * scale
            e = tl.exp2(tl.abs(x) * NEG_2LOG2E_C)
            t = (1.0 - e) / (1.0 + e)
            s = cap_log2 * tl.where(x < 0, -t, t)
        else:
            s = s * scale
        if HAS_ALIBI:
            s = s - slope2[:, None] * tl.abs(pos_q[:, None] - pos[None, :]).to(tl.float32)
        seen = valid[None, :] & (pos[None, :] >= row_lo[:, None]) & (pos[None, :] < row_hi[:, None])
        s = tl.where(seen, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no position yet keeps m = -inf; subtracting 0 instead keeps it NaN-free.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if HAS_SCALE:
        out = out * tl.load(V_SCALE + h * stride_vsc)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    if FINAL:
        lse = lse * LN2_C
    o_ptr = (OUT + b64 * stride_ob + tok64[:, None] * stride_ot + heads[:, None] * stride_oh
             + split * stride_os + offs_d[None, :])
    o_mask = r_mask[:, None] & d_mask[None, :]
    if not FINAL:
        # The merge never reads an empty split's row (its weight is exactly 0): skip the write.
        o_mask = o_mask & has[:, None]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=o_mask)
    tl.store(LSE + b64 * stride_lb + tok64 * stride_lt + heads * stride_lh + split * stride_ls, lse, mask=r_mask)


# -------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class CacheAttentionConfig:
    d_pad: int          # head dim padded to a power of two >= 16 (tl.dot's minimum K)
    block_m: int        # rows (query token x group head) per tile
    block_n: int        # KV tile rows
    page_aligned: bool  # paged: a tile never straddles a page (one page-table entry per tile)
    num_warps: int
    num_stages: int


def choose_config(head_dim: int, rows_per_sequence: int, page_size: int | None) -> CacheAttentionConfig:
    """Fixed launch configuration from shapes only (no autotuning: it would benchmark on the first
    call, which breaks CUDA-graph capture).

    - Rows: the (token, head) rows of one (sequence, KV head), padded to a power of two >= 16 (tl.dot's
      minimum M) up to 64 rows, so speculative decoding (2-8 tokens x a GQA group) fits one tile and
      each K/V byte is read once. More rows (chunked prefill) use 128-row tiles for D <= 128 and 64
      for D = 256: the point where a tile's [BLOCK_M, D] fp32 accumulator still fits the registers of
      8 warps (64 per thread), and K/V reuse across rows makes the kernel compute-bound.
    - KV tile: 64 rows for D <= 128, 32 for D = 256 (16 KB per tensor per stage, as in decode). Paged
      caches whose page size is a multiple of the tile use one page-table read per tile; smaller or
      odd pages gather the page of each row (the row is still D contiguous elements), and with
      128 x 128 row tiles they use 32-row KV tiles (64 gathered rows spill registers on sm_80).
    - Warps: 4 up to 8K accumulator values, else 8. Stages: 2 (3 for D <= 64, whose tiles are half
      as big).
    """
    d_pad = max(16, _next_pow2(head_dim))
    if rows_per_sequence <= 64:
        block_m = max(16, _next_pow2(max(1, rows_per_sequence)))
    else:
        block_m = 128 if d_pad <= 128 else 64
    block_n = 64 if d_pad <= 128 else 32
    if block_m == 128 and d_pad == 128 and page_size is not None and page_size % block_n:
        block_n = 32  # gathered rows carry a page index each: 64 of them spill at 128 x 128 (sm_80)
    aligned = page_size is not None and page_size % block_n == 0
    num_warps = 8 if block_m * d_pad > 8192 else 4
    num_stages = 3 if d_pad <= 64 else 2
    return CacheAttentionConfig(d_pad=d_pad, block_m=block_m, block_n=block_n, page_aligned=aligned,
                                num_warps=num_warps, num_stages=num_stages)


# -------------------------------------------------------------------------------------- wrapper


def unsupported(op: str, *, q=None, k_cache=None, paged=False, **kw) -> str | None:
    if q is None or k_cache is None:
        return None
    if q.dtype not in SUPPORTED_DTYPES:
        return (f"the Triton cache-attention kernel computes in fp16/bf16; {str(q.dtype).replace('torch.', '')} "
                f"queries are not supported (use backend='reference')")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM} is not supported by the Triton cache-attention kernel"
    return cache_dtype_reason(q, k_cache) or page_size_reason(k_cache, paged) or fp8_target_reason(k_cache)


def cache_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, block_table, causal,
                    softmax_scale, window_left, softcap, k_scale, v_scale, num_splits, batch_invariant,
                    alibi_slopes=None):
    """Normalised entry point (see kvkernels.api) -> out like q (q.dtype), lse [B, Hq, Sq] or [Hq, Tq] fp32.
    alibi_slopes: fp32 [B, Hq] (batch stride may be 0) or None."""
    target = device_target(q.device)
    out, lse, launches, finish = plan(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, block_table,
                                      causal, softmax_scale, window_left, softcap, k_scale, v_scale, num_splits,
                                      batch_invariant, target, alibi_slopes)
    with torch.cuda.device(q.device) if target is not None else contextlib.nullcontext():
        for launch in launches:
            launch.run()
        if finish is not None:
            finish()
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    return out, lse


def plan(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, block_table, causal, softmax_scale,
         window_left, softcap, k_scale, v_scale, num_splits, batch_invariant, target: Target | None,
         alibi_slopes=None):
    """Allocate outputs and workspace and plan the launches (the tile kernel, then the merge when there
    are several splits) for target (None: the interpreter). -> (out, lse, [Launch], finish): finish,
    when not None, runs after the launches (it moves the merged lse into its public layout); out is
    fp32 when bf16 is interpreted (the caller rounds it back)."""
    ragged = cu_seqlens_q is not None
    hq, d = q.shape[-2], q.shape[-1]
    B = cache_seqlens.shape[0]
    hkv = k_cache.shape[2]
    group = hq // hkv
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else None
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    if ragged:
        tokens, sq = q.shape[0], max_seqlen_q
        lse = torch.empty((hq, tokens), dtype=torch.float32, device=q.device)
    else:
        tokens, sq = B * q.shape[1], q.shape[1]
        lse = torch.empty((B, hq, sq), dtype=torch.float32, device=q.device)
    if B == 0 or tokens == 0 or hq == 0 or sq == 0:
        return torch.zeros_like(q), lse.fill_(float("-inf")), [], None

    fp8 = FP8_FORMAT.get(k_cache.dtype, NO_FP8)
    scaled = k_scale is not None  # fp8 caches always; 16-bit caches when given (value = stored * scale)
    qk = _interpreted_bf16(q, target)
    kk, vk = fp8_storage(_interpreted_bf16(k_cache, target)), fp8_storage(_interpreted_bf16(v_cache, target))
    compute_dtype = qk.dtype

    cfg = choose_config(d, sq * group, page_size)
    row_tiles = -(-sq * group // cfg.block_m)
    num_sms = decode_plan.sm_count(q.device.index) if q.device.type == "cuda" else decode_plan.sm_count()
    split_plan = decode_plan.plan_splits(B, hkv * row_tiles, capacity, num_splits=num_splits,
                                         batch_invariant=batch_invariant, num_sms=num_sms, granule=cfg.block_n)
    splits = split_plan.num_splits

    out = torch.empty(q.shape, dtype=compute_dtype, device=q.device)
    # Token-indexed strides (b, t, h): dense tensors index tokens within a sequence and sequences by
    # b; ragged ones index tokens globally (tok0 = cu_seqlens_q[b]) with a batch stride of 0.
    if ragged:
        q_strides = (0, qk.stride(0), qk.stride(1))
    else:
        q_strides = (qk.stride(0), qk.stride(1), qk.stride(2))
    if splits == 1:
        part_out, part_lse = out, lse
        if ragged:
            o_strides = (0, out.stride(0), out.stride(1), 0)
            l_strides = (0, lse.stride(1), lse.stride(0), 0)
        else:
            o_strides = (out.stride(0), out.stride(1), out.stride(2), 0)
            l_strides = (lse.stride(0), lse.stride(2), lse.stride(1), 0)
    else:
        # Workspace sized from shapes only: [tokens, Hq, splits, D] partial outputs, [tokens, Hq, splits] lse.
        part_out = torch.empty((tokens, hq, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((tokens, hq, splits), dtype=torch.float32, device=q.device)
        tb_o = 0 if ragged else sq * part_out.stride(0)
        tb_l = 0 if ragged else sq * part_lse.stride(0)
        o_strides = (tb_o, part_out.stride(0), part_out.stride(1), part_out.stride(2))
        l_strides = (tb_l, part_lse.stride(0), part_lse.stride(1), part_lse.stride(2))

    if softcap > 0:
        qk_scale, cap_log2 = softmax_scale / softcap, softcap * LOG2E
    else:
        qk_scale, cap_log2 = softmax_scale * LOG2E, 0.0

    tile_args = (
        qk, kk, vk, cache_seqlens, cu_seqlens_q, block_table, k_scale, v_scale, alibi_slopes, part_out, part_lse,
        *q_strides,
        kk.stride(0), kk.stride(1), kk.stride(2),
        vk.stride(0), vk.stride(1), vk.stride(2),
        *(block_table.stride() if paged else (0, 0)),
        k_scale.stride(0) if scaled else 0, v_scale.stride(0) if scaled else 0,
        alibi_slopes.stride(0) if alibi_slopes is not None else 0,
        *o_strides, *l_strides,
        hkv, row_tiles, 0 if ragged else sq, capacity, k_cache.shape[0], split_plan.split_tokens, window_left,
        qk_scale, cap_log2,
    )
    tile_meta = dict(
        HEAD_DIM=d, D_PAD=cfg.d_pad, GROUP=group, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, PAGE_SIZE=page_size or 1,
        PAGED=paged, PAGE_ALIGNED=cfg.page_aligned, RAGGED=ragged, CAUSAL=causal,
        FP8=fp8, HAS_SCALE=scaled, HAS_SOFTCAP=softcap > 0,
        DOT_PRECISION="ieee" if compute_dtype == torch.float32 else "tf32", FINAL=splits == 1,
    )
    if alibi_slopes is not None:  # only then: kernels without ALiBi keep their specialisation
        tile_meta["HAS_ALIBI"] = True
    launches = [Launch(_cache_attention_kernel, lambda _: (B * hkv * row_tiles, splits), tile_args, tile_meta,
                       (KernelConfig((), num_warps=cfg.num_warps, num_stages=cfg.num_stages),),
                       name="cache_attention")]
    if splits == 1:
        return out, lse, launches, None

    # Rows of the merge are (token, head) pairs: the decode merge kernel over [tokens, Hq] rows.
    flat_out = out.view(tokens, hq, d)
    token_lse = torch.empty((tokens, hq), dtype=torch.float32, device=q.device)
    launches.append(merge_launch(part_out, part_lse, flat_out, token_lse, hq, splits))

    def finish():
        if ragged:
            lse.copy_(token_lse.t())
        else:
            lse.copy_(token_lse.view(B, sq, hq).transpose(1, 2))
    return out, lse, launches, finish
