"""Decode attention in Triton: one query token per sequence against a contiguous or paged KV cache.

Two kernels:

  _decode_split_kernel  one program per (sequence b, KV head h, query-head chunk c, split s). It
                        holds every query head of the group that shares KV head h as one
                        [G_BLOCK, D] tile, so each [BLOCK_N, D] K/V tile is read from memory once
                        per group, and runs an online softmax over the split's tokens.
  _decode_merge_kernel  one program per (sequence, query head): merges the splits' partial
                        (out, lse) states in a fixed order (deterministic, no atomics).

With one split the first kernel writes the final result itself and the merge is skipped.

Nothing here reads tensor values on the host and every allocation is sized from shapes, so a call
can be captured in a CUDA graph; the split plan (kvkernels.decode_plan) depends on shapes and the
SM count only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import decode_plan
from . import KernelConfig, Launch, Target, device_target

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256
MAX_PAGE_SIZE = 256
# Query heads one program holds at once: a [64, 256] fp32 accumulator is 64 registers per thread
# at 8 warps. Larger groups are cut into chunks of this many heads (each chunk re-reads K/V).
MAX_GROUP_BLOCK = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
NEG_2LOG2E_C = tl.constexpr(-2.0 * LOG2E)
LN2_C = tl.constexpr(LN2)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# constexpr FP8 of the attention kernels: 0 a cache of q's dtype, else its fp8 format
NO_FP8, E4M3, E5M2 = 0, 1, 2
FP8_FORMAT = {torch.float8_e4m3fn: E4M3, torch.float8_e5m2: E5M2}


@triton.jit
def dequant_fp8(x, FP8: tl.constexpr, dtype: tl.constexpr):
    """fp8 cache values -> dtype (fp16 / bf16 / fp32), exactly. e4m3 (FP8 1): Triton's cast of the
    float8e4nv tensor (sm_89+). e5m2 (FP8 2): x holds the raw bytes (uint8); an e5m2 value is the
    upper byte of the fp16 with the same value (5 exponent bits of bias 15, its 2 mantissa bits on
    top of fp16's 10; subnormals, infinities and NaN line up too), so widening is a shift, on every
    GPU and in the interpreter alike; fp16 -> bf16 / fp32 is exact for every e5m2 value."""
    if FP8 == 2:
        return (x.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


# ------------------------------------------------------------------------------------- kernels


@triton.jit
def _decode_split_kernel(
    Q,            # [B, Hq, D] fp16/bf16 (fp32 when bf16 is interpreted)
    K,            # contiguous [B, S_max, Hkv, D] | paged [num_pages, page_size, Hkv, D]; q's dtype, fp8 e4m3
                  # (float8e4nv) or e5m2 (its bytes, uint8)
    V,            # same layout and dtype as K
    SEQLENS,      # [B] int32 (stride stride_sl): sequence b attends to positions [0, SEQLENS[b]), clamped to capacity
    BLOCK_TABLE,  # [B, max_pages] int32 (paged only)
    K_SCALE,      # [Hkv] fp32, stride may be 0 (fp8, or HAS_SCALE): key = stored * K_SCALE[h]
    V_SCALE,      # [Hkv] fp32, stride may be 0 (with K_SCALE)
    ALIBI,        # [B, Hq] fp32 ALiBi slopes, batch stride stride_ab (may be 0) (HAS_ALIBI only)
    OUT,          # final [B, Hq, D] (FINAL) | partial [B, Hq, num_splits, D] fp32
    LSE,          # final [B, Hq] fp32, natural log (FINAL) | partial [B, Hq, num_splits] fp32, log2
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_sl,
    stride_btb, stride_btp,
    stride_ksc, stride_vsc,
    stride_ab,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    num_kv_heads,        # Hkv
    num_chunks,          # query-head chunks per KV head: cdiv(GROUP, G_BLOCK)
    capacity,            # S_max, or max_pages * page_size
    num_pages,           # pages in the paged cache (entries outside [0, num_pages) are skipped)
    split_tokens,        # tokens per split, a multiple of BLOCK_N
    window_left,         # -1: unbounded; else only positions >= seqlen - 1 - window_left
    qk_scale,            # softmax_scale * log2(e), or softmax_scale / softcap with HAS_SOFTCAP
    cap_log2,            # softcap * log2(e) (HAS_SOFTCAP only)
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    GROUP: tl.constexpr, G_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, PAGE_ALIGNED: tl.constexpr,
    FP8: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FINAL: tl.constexpr, HAS_ALIBI: tl.constexpr = False,
):
    """Attention of the group's query heads over the split's tokens, in base 2:

        s2[g, n] = log2(e) * score(q[g] . k[n] * softmax_scale * k_scale)     (score = softcap or identity)
                   - log2(e) * slope[g] * (seqlen - 1 - n)                    (HAS_ALIBI)
        m = max_n s2,  l = sum_n 2^(s2 - m),  out[g] = v_scale * sum_n 2^(s2 - m) v[n] / l
        lse2 = m + log2(l)            (stored as lse2 * ln 2 when FINAL)

    computed online tile by tile. Tokens outside [max(window start, split start), min(seqlen,
    split end)), and rows of pages outside [0, num_pages), are masked out of every load: they are
    never read. No token gives out 0 and lse -inf.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    chunk = pid % num_chunks
    bh = pid // num_chunks
    h = bh % num_kv_heads
    b = bh // num_kv_heads
    b64 = b.to(tl.int64)

    seqlen = tl.load(SEQLENS + b64 * stride_sl)
    seqlen = tl.minimum(tl.maximum(seqlen, 0), capacity)
    lo = tl.where(window_left >= 0, tl.maximum(seqlen - 1 - window_left, 0), 0)
    split_lo = split * split_tokens
    start = tl.maximum(split_lo, lo)
    end = tl.minimum(split_lo + split_tokens, seqlen)
    # Tiles lie on BLOCK_N boundaries (split_tokens is a multiple of BLOCK_N), so tiles wholly
    # before the window are never visited, and a tile never straddles a page when PAGE_ALIGNED.
    first_tile = (start // BLOCK_N) * BLOCK_N

    offs_g = chunk * G_BLOCK + tl.arange(0, G_BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = h * GROUP + offs_g

    q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if not USE_DOT:
        q = q.to(tl.float32)
    scale = qk_scale
    if HAS_SCALE:
        scale = scale * tl.load(K_SCALE + h * stride_ksc)

    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b64 * stride_ab + heads, mask=g_mask, other=0.0) * 1.4426950408889634

    k_head = K + h * stride_kh
    v_head = V + h * stride_vh
    m_i = tl.full([G_BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([G_BLOCK], tl.float32)
    acc = tl.zeros([G_BLOCK, D_PAD], tl.float32)

    for t0 in range(first_tile, end, BLOCK_N):
        pos = t0 + offs_n
        valid = (pos >= start) & (pos < end)
        if PAGED:
            if PAGE_ALIGNED:
                # The whole tile is one page: one page-table entry per tile.
                page = tl.load(BLOCK_TABLE + b64 * stride_btb + (t0 // PAGE_SIZE) * stride_btp)
                valid = valid & (page >= 0) & (page < num_pages)
                page64 = page.to(tl.int64)
                rows = (t0 % PAGE_SIZE) + offs_n
            else:
                # Pages smaller than a tile (or not a multiple of it): one entry per row.
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

        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)              # [G_BLOCK, BLOCK_N]
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)      # [G_BLOCK, BLOCK_N]
        if HAS_SOFTCAP:
            # softcap * tanh(x / softcap), tanh through exp2 of -2|x| (no overflow for any x).
            x = s * scale
            e = tl.exp2(tl.abs(x) * NEG_2LOG2E_C)
            t = (1.0 - e) / (1.0 + e)
            s = cap_log2 * tl.where(x < 0, -t, t)
        else:
            s = s * scale
        if HAS_ALIBI:
            s = s - slope2[:, None] * (seqlen - 1 - pos).to(tl.float32)[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no token yet keeps m = -inf; subtracting 0 instead keeps it NaN-free.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if USE_DOT:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if HAS_SCALE:
        out = out * tl.load(V_SCALE + h * stride_vsc)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    if FINAL:
        lse = lse * LN2_C
    o_ptr = OUT + b64 * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if not FINAL:
        # The merge never reads an empty split's row (its weight is exactly 0): skip the write.
        o_mask = o_mask & has[:, None]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=o_mask)
    tl.store(LSE + b64 * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    PART_OUT,   # [B * Hq, num_splits, D] fp32, each split's normalised output
    PART_LSE,   # [B * Hq, num_splits] fp32, log2; -inf for an empty split
    OUT,        # [B, Hq, D] q's dtype (fp32 when bf16 is interpreted)
    LSE,        # [B, Hq] fp32, natural log
    num_heads,  # Hq
    num_splits,
    stride_pr, stride_ps,
    stride_lr,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    """out = sum_s 2^(lse_s - M) out_s / sum_s 2^(lse_s - M), lse = (M + log2 sum_s 2^(lse_s - M)) ln 2,
    M = max_s lse_s, summed in split order. Empty splits weigh exactly 0 and their rows are not read;
    all splits empty gives out 0 and lse -inf."""
    row = tl.program_id(0)
    b = row // num_heads
    h = row % num_heads
    row64 = row.to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM

    lse_s = tl.load(PART_LSE + row64 * stride_lr + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse_s - m_safe), axis=0)

    acc = tl.zeros([D_PAD], tl.float32)
    for s in range(0, num_splits):
        w = tl.exp2(tl.load(PART_LSE + row64 * stride_lr + s) - m_safe)
        d_limit = tl.where(w > 0.0, HEAD_DIM, 0)  # an empty split's row is not read
        o = tl.load(PART_OUT + row64 * stride_pr + s * stride_ps + offs_d, mask=offs_d < d_limit, other=0.0)
        acc += w * o
    has = total > 0.0
    out = acc / tl.where(has, total, 1.0)
    lse = tl.where(has, (m + tl.log2(tl.where(has, total, 1.0))) * LN2_C, float("-inf"))
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=d_mask)
    tl.store(LSE + b.to(tl.int64) * stride_lb + h * stride_lh, lse)


# -------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class DecodeConfig:
    d_pad: int          # head dim padded to a power of two >= 16 (tl.dot's minimum K)
    block_n: int        # KV tile rows
    page_aligned: bool  # paged: a tile never straddles a page (one page-table entry per tile)
    g_block: int        # query-head rows of the tile (the group padded to a power of two, >= 16 for tl.dot)
    use_dot: bool
    num_warps: int
    num_stages: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def choose_config(head_dim: int, group: int, page_size: int | None) -> DecodeConfig:
    """Fixed launch configuration, no autotuning (autotuning would benchmark on the first call, which
    breaks CUDA-graph capture and makes timings depend on a warm-up).

    - KV tile: 64 rows for D <= 128, 32 for D = 256. Decode streams K and V once, so the tile only has
      to keep enough bytes in flight per SM: 64 x 128 x 2 B = 16 KB per tensor per stage, and 32 rows
      of D = 256 give the same 16 KB. Compiled for sm_90a (ptxas, no spills) a GQA program takes 39 KB
      (D = 128) or 41 KB (D = 256) of shared memory and 76-108 registers (168 with fp8 dequantization,
      167 for the elementwise MHA form): several programs per SM.
    - Paged: when the page size is a multiple of the tile a tile lies in one page and costs one
      page-table read. Smaller or odd pages (1..32, 48, 5, ...) keep the full tile and gather the page
      of each row: a row is still D contiguous elements, so the loads stay 128-bit wide, and the few
      distinct table entries of a tile come from L1. Shrinking the tile to a 16-token page instead
      would cut the bytes in flight per program by four.
    - Group of query heads sharing a KV head: two or more heads use tl.dot, which needs >= 16 rows,
      so the group is padded to 16 (masked rows): the wasted tensor-core work is free in a
      bandwidth-bound kernel, while an elementwise [G, BLOCK_N, D] product would cost G times the
      registers. One head (MHA) uses an elementwise fp32 product over a contiguous or page-aligned
      cache; over gathered pages it too goes through tl.dot, because there the compiler pipelines the
      page-table and K/V loads with cp.async (sm_90a, D = 128: 96 registers and 17 table loads per
      thread and tile) while the elementwise form keeps them synchronous (207 registers, 75 loads).
    - 4 warps; 8 when the accumulator [G_BLOCK, D] passes 8K fp32 values (64 registers per thread at
      4 warps). Two pipeline stages (three for D <= 64, whose tiles are half as big) hide the latency
      of the next tile's loads behind the current tile's math.
    """
    d_pad = max(16, _next_pow2(head_dim))
    base = 64 if d_pad <= 128 else 32
    block_n = base
    aligned = page_size is not None and page_size % block_n == 0
    use_dot = group > 1 or (page_size is not None and not aligned)
    g_block = min(max(16, _next_pow2(group)), MAX_GROUP_BLOCK) if use_dot else 1
    num_warps = 8 if g_block * d_pad > 8192 else 4
    num_stages = 3 if d_pad <= 64 else 2
    return DecodeConfig(d_pad=d_pad, block_n=block_n, page_aligned=aligned, g_block=g_block, use_dot=use_dot,
                        num_warps=num_warps, num_stages=num_stages)


# -------------------------------------------------------------------------------------- wrapper


def unsupported(op: str, *, q=None, k_cache=None, paged=False, **kw) -> str | None:
    if q is None or k_cache is None:
        return None
    if q.dtype not in SUPPORTED_DTYPES:
        return (f"the Triton decode kernel computes in fp16/bf16; {str(q.dtype).replace('torch.', '')} "
                f"queries are not supported (use backend='reference')")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM} is not supported by the Triton decode kernel"
    return cache_dtype_reason(q, k_cache) or page_size_reason(k_cache, paged) or fp8_target_reason(k_cache)


def cache_dtype_reason(q, k_cache) -> str | None:
    """The Triton attention kernels (decode, cache attention) read caches of q's dtype or fp8."""
    if k_cache.dtype != q.dtype and k_cache.dtype not in FP8_DTYPES:
        return f"cache dtype {k_cache.dtype} must be q's dtype {q.dtype}, float8_e4m3fn or float8_e5m2"
    return None


def page_size_reason(k_cache, paged) -> str | None:
    if paged and not 1 <= k_cache.shape[1] <= MAX_PAGE_SIZE:
        return f"page size {k_cache.shape[1]} is outside 1..{MAX_PAGE_SIZE}"
    return None


def fp8_target_reason(k_cache) -> str | None:
    """An fp8 format this GPU's Triton cannot convert (e4m3 below sm_89), or None."""
    target = device_target(k_cache.device) if k_cache.dtype in FP8_DTYPES else None
    if target is not None and not fp8_supported(target, k_cache.dtype):
        return (f"float8_e4m3fn caches need compute capability >= 8.9 for Triton's e4m3 conversions "
                f"(this GPU is sm_{target.arch}); float8_e5m2 caches, backend='reference' or the CUDA "
                f"kernels read them")
    return None


def fp8_supported(target: Target, dtype: torch.dtype = torch.float8_e4m3fn) -> bool:
    """Triton converts e4m3 only from sm_89 on (there is no e4m3 type below it: compiling the e4m3
    kernel for sm_80 fails). e5m2 is read as bytes and widened by a shift (dequant_fp8), no fp8 type
    involved: every GPU (tests/test_triton_aot.py compiles it for sm_80, sm_89 and sm_90)."""
    return dtype == torch.float8_e5m2 or target.capability >= (8, 9)


def fp8_storage(cache: torch.Tensor) -> torch.Tensor:
    """What the kernels load from a cache: e5m2 as its raw bytes (a uint8 view, see dequant_fp8),
    anything else as it is."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e5m2 else cache


def _interpreted_bf16(x: torch.Tensor | None, target: Target | None) -> torch.Tensor | None:
    # The Triton interpreter holds bf16 as raw uint16 (tl.dot multiplies bit patterns, fp32 -> bf16
    # casts truncate), so when interpreting, bf16 tensors reach the kernel as exact fp32 copies and
    # the fp32 result is rounded back to bf16 by torch (round to nearest even). On a GPU the kernel
    # gets bf16 directly and runs bf16 tensor-core dots.
    if x is not None and target is None and x.dtype == torch.bfloat16:
        return x.to(torch.float32)
    return x


def decode(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, window_left, softcap,
           k_scale, v_scale, num_splits, batch_invariant, alibi_slopes=None):
    """Normalised entry point (see kvkernels.api): -> out [B, Hq, D] q.dtype, lse [B, Hq] fp32.
    alibi_slopes: fp32 [B, Hq] (batch stride may be 0) or None."""
    target = device_target(q.device)
    out, lse, launches = plan(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, window_left, softcap,
                              k_scale, v_scale, num_splits, batch_invariant, target, alibi_slopes)
    with torch.cuda.device(q.device) if target is not None else contextlib.nullcontext():
        for launch in launches:
            launch.run()
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    return out, lse


def plan(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, window_left, softcap,
         k_scale, v_scale, num_splits, batch_invariant, target: Target | None, alibi_slopes=None):
    """Allocate outputs and workspace and plan the launches (split kernel, then the merge when there
    are several splits) for target (None: the interpreter). -> (out, lse, [Launch]); out is fp32
    when bf16 is interpreted (the caller rounds it back)."""
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else None
    capacity = block_table.shape[1] * page_size if paged else k_cache.shape[1]
    lse = torch.empty((B, hq), dtype=torch.float32, device=q.device)
    if B == 0 or hq == 0:
        return torch.empty_like(q), lse, []

    fp8 = FP8_FORMAT.get(k_cache.dtype, NO_FP8)
    scaled = k_scale is not None  # fp8 caches always; 16-bit caches when given (value = stored * scale)
    qk = _interpreted_bf16(q, target)
    kk, vk = fp8_storage(_interpreted_bf16(k_cache, target)), fp8_storage(_interpreted_bf16(v_cache, target))
    compute_dtype = qk.dtype

    cfg = choose_config(d, group, page_size)
    num_chunks = -(-group // cfg.g_block)
    num_sms = decode_plan.sm_count(q.device.index) if q.device.type == "cuda" else decode_plan.sm_count()
    plan_ = decode_plan.plan_splits(B, hkv * num_chunks, capacity, num_splits=num_splits,
                                    batch_invariant=batch_invariant, num_sms=num_sms, granule=cfg.block_n)
    splits = plan_.num_splits

    out = torch.empty((B, hq, d), dtype=compute_dtype, device=q.device)
    if splits == 1:
        part_out, part_lse = out, lse
        o_strides = (out.stride(0), out.stride(1), 0)
        l_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        # Workspace sized from shapes only: [B, Hq, splits, D] partial outputs and [B, Hq, splits] lse.
        part_out = torch.empty((B, hq, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, hq, splits), dtype=torch.float32, device=q.device)
        o_strides = (part_out.stride(0), part_out.stride(1), part_out.stride(2))
        l_strides = (part_lse.stride(0), part_lse.stride(1), part_lse.stride(2))

    if softcap > 0:
        qk_scale, cap_log2 = softmax_scale / softcap, softcap * LOG2E
    else:
        qk_scale, cap_log2 = softmax_scale * LOG2E, 0.0
    num_pages = k_cache.shape[0]

    split_args = (
        qk, kk, vk, cache_seqlens, block_table, k_scale, v_scale, alibi_slopes, part_out, part_lse,
        qk.stride(0), qk.stride(1),
        kk.stride(0), kk.stride(1), kk.stride(2),
        vk.stride(0), vk.stride(1), vk.stride(2),
        cache_seqlens.stride(0),
        *(block_table.stride() if paged else (0, 0)),
        k_scale.stride(0) if scaled else 0, v_scale.stride(0) if scaled else 0,
        alibi_slopes.stride(0) if alibi_slopes is not None else 0,
        *o_strides, *l_strides,
        hkv, num_chunks, capacity, num_pages, plan_.split_tokens, window_left, qk_scale, cap_log2,
    )
    split_meta = dict(
        HEAD_DIM=d, D_PAD=cfg.d_pad, GROUP=group, G_BLOCK=cfg.g_block,
        BLOCK_N=cfg.block_n, PAGE_SIZE=page_size or 1,
        PAGED=paged, PAGE_ALIGNED=cfg.page_aligned,
        FP8=fp8, HAS_SCALE=scaled, HAS_SOFTCAP=softcap > 0, USE_DOT=cfg.use_dot,
        DOT_PRECISION="ieee" if compute_dtype == torch.float32 else "tf32", FINAL=splits == 1,
    )
    if alibi_slopes is not None:  # only then: kernels without ALiBi keep their specialisation
        split_meta["HAS_ALIBI"] = True
    launches = [Launch(_decode_split_kernel, lambda _: (B * hkv * num_chunks, splits), split_args, split_meta,
                       (KernelConfig((), num_warps=cfg.num_warps, num_stages=cfg.num_stages),), name="decode_split")]
    if splits > 1:
        launches.append(merge_launch(part_out, part_lse, out, lse, hq, splits))
    return out, lse, launches


def merge_launch(part_out, part_lse, out, lse, hq, splits) -> Launch:
    """The merge of the splits' partials into out [rows, Hq, D] and lse [rows, Hq], one program a
    (row, head): rows are sequences in decode, (token) rows in cache attention."""
    rows, d = out.shape[0], out.shape[-1]
    args = (part_out, part_lse, out, lse, hq, splits,
            part_out.stride(1), part_out.stride(2),
            part_lse.stride(1),
            out.stride(0), out.stride(1),
            lse.stride(0), lse.stride(1))
    meta = dict(HEAD_DIM=d, D_PAD=_next_pow2(d), S_PAD=max(2, _next_pow2(splits)))
    # One warp per row up to D = 128 (a [D] fp32 vector is 4 values per lane), two beyond.
    return Launch(_decode_merge_kernel, lambda _: (rows * hq,), args, meta,
                  (KernelConfig((), num_warps=1 if d <= 128 else 2, num_stages=3),), name="decode_merge")
