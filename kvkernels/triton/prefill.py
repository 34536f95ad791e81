"""Triton prefill: flash-attention forward over whole prompts, dense or varlen.

    dense:  q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32
    varlen: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_q/k int32 [B+1] -> out [Tq, Hq, D], lse [Hq, Tq]

One kernel serves both layouts: a program owns BLOCK_M query rows of one (sequence, query head) and
finds its sequence through per-batch offsets (a batch stride when dense, cu_seqlens when varlen).

For query row i and key j of one sequence (bottom-right aligned, off = Sk - Sq):
    s_ij  = scale * q_i . k_j                       (softcap > 0: s_ij = softcap * tanh(s_ij / softcap))
            - slope_h * |i + off - j|               (ALiBi, with alibi_slopes; after the softcap, unscaled)
    seen  : i + off - left <= j <= i + off + right   (causal is right = 0; -1 = unbounded)
    out_i = sum_j softmax_j(s_ij) v_j,  lse_i = log sum_j exp(s_ij)
computed with the online softmax in base 2 (log2(e) folded into the scale, one exp2 per score).
A row that sees no key gets out 0 and lse -inf.

Key tiles wholly outside a query block's band are never visited: the loop bounds come from the
window, and only the tiles that straddle a band edge (or the end of the sequence) pay for masks.
A program for query head h reads key/value head h // (Hq // Hkv); repeated K/V are never built.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import KernelConfig, Launch, Target, device_target

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# fp32 is left to the reference (auto choice falls back to it): fp32 tiles need twice the shared
# memory of 16-bit ones (over the limit on sm_80 for D >= 64), and IEEE fp32 dots have no tensor-core
# path, so ptxas compiled them to 32 registers with 40-320 KB of spills per thread; a tf32 dot would
# break the fp32 parity contract.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _tanh(x):
    """tanh through exp2 (tl has no tanh the interpreter and every Triton version share);
    saturates to +-1 without overflow because the exponent is never positive."""
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))  # exp(-2|x|) in (0, 1]
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                  offs_m, offs_n, offs_d, d_mask,
                  start, end, kv_lo, kv_hi, diag_off, window_left, window_right, seqlen_k,
                  qk_scale, softcap_log2e, slope_log2e,
                  MASKED: tl.constexpr, SOFTCAP: tl.constexpr, POSITIVE_SCALE: tl.constexpr, ALIBI: tl.constexpr,
                  EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key tiles [start, end) (BLOCK_N apart) of one query block.

    acc [BLOCK_M, BLOCK_D] fp32, l_i/m_i [BLOCK_M] fp32 (running sum / max, base 2); q [BLOCK_M, BLOCK_D];
    k_base/v_base point at key 0 of this sequence and KV head. MASKED tiles straddle a band edge or the
    end of the keys: their loads are limited to [kv_lo, kv_hi) and each score is checked against its
    row's window; unmasked tiles are wholly inside every row's band. ALIBI: slope_log2e = slope * log2(e)
    (this program's head), subtracted times the distance from each row's diagonal, in base 2.
    """
    k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        n = start_n + offs_n
        k_off = start_n.to(tl.int64) * stride_ks
        v_off = start_n.to(tl.int64) * stride_vs
        if MASKED:
            kv_mask = (n >= kv_lo) & (n < kv_hi)
            k = tl.load(k_ptrs + k_off, mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs + k_off)
        else:
            k = tl.load(k_ptrs + k_off, mask=d_mask[None, :], other=0.0)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED or SOFTCAP or not POSITIVE_SCALE or ALIBI:
            if SOFTCAP:
                s = _tanh(qk * qk_scale) * softcap_log2e  # qk_scale = scale / softcap here
            else:
                s = qk * qk_scale  # qk_scale = scale * log2(e)
            if ALIBI:
                dist = tl.abs(offs_m[:, None] + diag_off - n[None, :]).to(tl.float32)
                s = s - slope_log2e * dist
            if MASKED:
                diag = offs_m[:, None] + diag_off
                seen = ((n[None, :] >= diag - window_left) & (n[None, :] <= diag + window_right)
                        & (n[None, :] < seqlen_k))
                s = tl.where(seen, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A row with nothing seen yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = m_new
            p = tl.exp2(s - m_use[:, None])
        else:
            # Inside the band with a positive scale: max(qk) * scale is max(qk * scale) exactly, and the
            # scale and the max subtraction fuse into one FMA per score (the exp2 unit is the bottleneck).
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)

        if MASKED:
            v = tl.load(v_ptrs + v_off, mask=kv_mask[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs + v_off)
        else:
            v = tl.load(v_ptrs + v_off, mask=d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    Q,  # dense [B, Sq, Hq, D] / varlen [Tq, Hq, D]
    K,  # dense [B, Sk, Hkv, D] / varlen [Tk, Hkv, D]
    V,  # like K
    Out,  # like Q
    Lse,  # fp32, dense [B, Hq, Sq] / varlen [Hq, Tq]
    CuQ,  # int32 [B + 1] token offsets of the queries (varlen only)
    CuK,  # int32 [B + 1] token offsets of the keys (varlen only)
    Alibi,  # fp32 [B, Hq] ALiBi slopes, batch stride stride_ab (0: one slope per head) (ALIBI only)
    stride_qb, stride_qs, stride_qh,  # batch stride 0 when varlen; last dim contiguous everywhere
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,  # lse: batch stride 0 when varlen (rows are token indices)
    stride_ab,  # alibi_slopes batch stride (head stride 1)
    seqlen_q, seqlen_k,  # dense: Sq, Sk; varlen: Tq, Tk (cu_seqlens are clamped to them)
    group,  # Hq // Hkv
    qk_scale,  # scale * log2(e); with softcap: scale / softcap
    softcap_log2e,  # softcap * log2(e) (unused without softcap)
    window_left, window_right,  # >= 0; an unbounded side holds a value that covers every key
    seq_bucket_q, seq_bucket_k, banded,  # autotune keys only (sequence-length buckets, causal/window)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, POSITIVE_SCALE: tl.constexpr, LONGEST_FIRST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIBI: tl.constexpr = False,
):
    """out/lse of BLOCK_M query rows of one (sequence, query head); see the module docstring.

    grid (cdiv(max Sq, BLOCK_M), Hq, B): query blocks vary fastest, so the programs running together
    mostly share one KV head and its K/V stay in L2.
    """
    pid_m = tl.program_id(0)
    if LONGEST_FIRST:
        # Under a causal band the last query blocks see the most keys: start them first so the
        # short blocks fill the tail of the grid.
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    kvh = h // group

    if IS_VARLEN:
        q_start = tl.minimum(tl.load(CuQ + b), seqlen_q)
        q_end = tl.minimum(tl.load(CuQ + b + 1), seqlen_q)
        k_start = tl.minimum(tl.load(CuK + b), seqlen_k)
        k_end = tl.minimum(tl.load(CuK + b + 1), seqlen_k)
        sq = tl.maximum(q_end - q_start, 0)
        sk = tl.maximum(k_end - k_start, 0)
        q_row0 = q_start.to(tl.int64)
        k_row0 = k_start.to(tl.int64)
    else:
        sq = seqlen_q
        sk = seqlen_k
        q_row0 = b.to(tl.int64) * 0
        k_row0 = q_row0

    m0 = pid_m * BLOCK_M
    if m0 >= sq:
        return

    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + q_row0 * stride_qs + h.to(tl.int64) * stride_qh
    o_base = Out + b64 * stride_ob + q_row0 * stride_os + h.to(tl.int64) * stride_oh
    k_base = K + b64 * stride_kb + k_row0 * stride_ks + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + k_row0 * stride_vs + kvh.to(tl.int64) * stride_vh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < sq
    rows64 = offs_m.to(tl.int64)

    q = tl.load(q_base + rows64[:, None] * stride_qs + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                other=0.0)

    # Key range of this block: the union of its rows' bands, clipped to [0, sk).
    diag_off = sk - sq
    row_lo = m0
    row_hi = tl.minimum(m0 + BLOCK_M, sq) - 1
    kv_lo = tl.maximum(row_lo + diag_off - window_left, 0)
    kv_hi = tl.maximum(tl.minimum(row_hi + diag_off + window_right + 1, sk), 0)
    tile_lo = (kv_lo // BLOCK_N) * BLOCK_N
    # Tiles from full_lo on are inside the left edge of every row; tiles ending by full_hi are
    # inside the right edge of every row and inside the keys. (Operands of // are kept >= 0.)
    full_lo = tl.maximum(tile_lo,
                         (tl.maximum(row_hi + diag_off - window_left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    full_hi = (tl.maximum(tl.minimum(row_lo + diag_off + window_right + 1, sk), 0) // BLOCK_N) * BLOCK_N
    mid_lo = tl.minimum(full_lo, kv_hi)
    mid_hi = tl.maximum(mid_lo, full_hi)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    slope_log2e = 0.0
    if ALIBI:
        slope_log2e = tl.load(Alibi + b64 * stride_ab + h) * 1.4426950408889634

    # [tile_lo, mid_lo): left-edge tiles; [mid_lo, mid_hi): inside the band; [mid_hi, kv_hi): right edge / tail.
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                                  d_mask, tile_lo, mid_lo, kv_lo, kv_hi, diag_off, window_left, window_right, sk,
                                  qk_scale, softcap_log2e, slope_log2e, True, SOFTCAP, POSITIVE_SCALE, ALIBI, EVEN_D,
                                  DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                                  d_mask, mid_lo, mid_hi, kv_lo, kv_hi, diag_off, window_left, window_right, sk,
                                  qk_scale, softcap_log2e, slope_log2e, False, SOFTCAP, POSITIVE_SCALE, ALIBI, EVEN_D,
                                  DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                                  d_mask, mid_hi, kv_hi, kv_lo, kv_hi, diag_off, window_left, window_right, sk,
                                  qk_scale, softcap_log2e, slope_log2e, True, SOFTCAP, POSITIVE_SCALE, ALIBI, EVEN_D,
                                  DOT_PRECISION, BLOCK_N)

    empty = l_i == 0.0  # no key seen: out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(o_base + rows64[:, None] * stride_os + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(Lse + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_row0 + rows64, lse, mask=m_mask)


# -------------------------------------------------------------------------------- configurations

# Candidate configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) in order of preference, by GPU
# family and head-dim bucket. A target gets the candidates whose shared memory (smem_bytes) fits its
# per-block limit, so one list serves sm_80 (163 KB) and sm_86/sm_89 (99 KB: RTX 3090/4090, A10, A40,
# L4, L40S) alike; tests/test_triton_aot.py compiles every candidate that survives for sm_80, sm_89 and
# sm_90 and checks shared memory, spills and tensor-core use. From those ptxas reports:
#   - 128 query rows take 8 warps at D >= 128, and D = 256 takes 8 warps even at 64 rows: the fp32
#     accumulator, the q fragment and the score tile of 4 warps do not fit in 255 registers (spills
#     of 100-700 bytes, more with softcap).
#   - Hopper issues wgmma per warpgroup, so 8 warps = two warpgroups sharing a 128-row block.
#   - D = 256 keeps key tiles narrow: every pipeline stage holds BLOCK_N x 256 of both K and V.
#   - A 64-row config is in every list: short prompts need more programs than 128-row blocks give.
_CANDIDATES = {
    "wgmma": {  # sm_90: warpgroup MMA
        64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)],
        256: [(64, 32, 8, 3), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 8, 2)],
    },
    "mma": {  # sm_80 .. sm_89: mma.sync
        64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 16, 8, 3)],  # 128 x 32 spills 248 B on sm_80
    },
}

# Short prompts (<= AUTOTUNE_MIN_SEQLEN queries) run one fixed 64-row config: they are latency-bound,
# the 64-row config is what wins there, and a tuning run per new key would cost more than it saves.
# The first candidate that fits the target is taken. KVKERNELS_TRITON_AUTOTUNE=0 uses the first
# fitting autotune candidate for every longer prompt (test runs on a GPU, where each new autotune key
# compiles every config).
AUTOTUNE_MIN_SEQLEN = 512
_SHORT_CANDIDATES = {64: [(64, 64, 4, 3)], 128: [(64, 64, 4, 3), (64, 32, 4, 2)],
                     256: [(64, 32, 8, 2), (64, 16, 8, 2)]}
AUTOTUNE_KEY = ("seq_bucket_q", "seq_bucket_k", "banded", "HEAD_DIM", "SOFTCAP")


def _autotune_enabled() -> bool:
    return os.environ.get("KVKERNELS_TRITON_AUTOTUNE", "1") not in ("0", "false", "False", "")


# The interpreter runs one fixed config (autotuning there would only multiply a slow run). Small
# tiles with BLOCK_N != BLOCK_M also make the test sequences (17, 113 keys) cross several tiles and
# band edges, so every loop phase runs.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}


def _d_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _seq_bucket(n: int) -> int:
    """Coarse length buckets for the autotune key (a retune per distinct length would be absurd)."""
    for edge in (256, 1024, 4096):
        if n <= edge:
            return edge
    return 16384


def _family(target: Target) -> str:
    return "wgmma" if target.capability[0] == 9 else "mma"


def smem_bytes(target: Target, block_m: int, block_n: int, block_d: int, num_stages: int, elem: int = 2) -> int:
    """Upper bound of the shared memory Triton gives this kernel (checked against the compiler by
    tests/test_triton_aot.py): the K and V tiles of the software pipeline (num_stages - 1 buffers
    with mma.sync, num_stages with Hopper's wgmma pipeline), the q tile, and the layout-conversion
    scratch of the P tile."""
    kv_tile = 2 * block_n * block_d * elem
    buffers = num_stages if target.capability[0] >= 9 else max(1, num_stages - 1)
    return buffers * kv_tile + block_m * block_d * elem + block_m * block_n * elem


def _fitting(target: Target, block_d: int, candidates) -> list[KernelConfig]:
    return [KernelConfig((("BLOCK_M", bm), ("BLOCK_N", bn)), num_warps=w, num_stages=s)
            for bm, bn, w, s in candidates
            if smem_bytes(target, bm, bn, block_d, s) <= target.max_shared_mem]


def launch_configs(target: Target, block_d: int, seqlen_q: int) -> tuple[KernelConfig, ...]:
    """The configurations a prompt of seqlen_q queries (the longest, when varlen) runs with on target:
    one fixed config for short prompts (and with autotuning off), else the autotune list. Empty when
    no candidate fits the target's shared memory (unsupported() then declines)."""
    d_bucket = _d_bucket(block_d)
    if seqlen_q <= AUTOTUNE_MIN_SEQLEN:
        return tuple(_fitting(target, block_d, _SHORT_CANDIDATES[d_bucket])[:1])
    tuned = _fitting(target, block_d, _CANDIDATES[_family(target)][d_bucket])
    return tuple(tuned if _autotune_enabled() else tuned[:1])


# ------------------------------------------------------------------------------------ entry points


def unsupported(op: str, *, q=None, k=None, v=None, **kw) -> str | None:
    if q is None:
        return None
    if q.dtype not in SUPPORTED_DTYPES:
        name = str(q.dtype).replace("torch.", "")
        return (f"the Triton prefill kernel computes in float16/bfloat16 tiles; {name} inputs go to the "
                f"reference (backend='reference', which auto choice picks)")
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    target = device_target(q.device)
    if target is not None:
        if target.capability[0] < 8:
            return "compute capability < 8.0 (the Triton prefill kernel is tuned for sm_80 and newer)"
        block_d = max(16, triton.next_power_of_2(q.shape[-1]))
        if not (launch_configs(target, block_d, 1) and launch_configs(target, block_d, AUTOTUNE_MIN_SEQLEN + 1)):
            return (f"no Triton prefill configuration for head dim {q.shape[-1]} fits this GPU's "
                    f"{target.max_shared_mem} bytes of shared memory per block")
    return None


def _window_bound(w: int, cover: int) -> int:
    """-1 (unbounded) becomes a window that covers every key of every row; wider windows are
    clipped to it (same keys, and the kernel's int32 index arithmetic cannot overflow)."""
    return cover if w < 0 else min(w, cover)


def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
            window_right, softcap, alibi_slopes=None):
    """Normalised entry point (kvkernels.api): causal already folded into window_right (0 = causal);
    alibi_slopes fp32 [B, Hq] (batch stride may be 0) or None.

    -> (out like q, lse fp32: dense [B, Hq, Sq], varlen [Hq, Tq]).
    """
    out_dtype = q.dtype
    target = device_target(q.device)
    out, lse, launch = plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                            window_left, window_right, softcap, target, alibi_slopes)
    if launch is not None:
        with torch.cuda.device(q.device) if target is not None else contextlib.nullcontext():
            launch.run()
    return out.to(out_dtype), lse


def plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
         window_right, softcap, target: Target | None, alibi_slopes=None):
    """Allocate the outputs and plan the kernel launch for target (None: the interpreter).

    -> (out, lse, Launch or None when there is nothing to compute). out is fp32 when bf16 is
    interpreted (the caller rounds it back to q's dtype).
    """
    varlen = q.dim() == 3
    if target is None and q.dtype == torch.bfloat16:
        # The Triton interpreter holds bfloat16 as raw uint16 (tl.dot multiplies bit patterns, casts
        # truncate; DESIGN.md sec. 5). Interpreting only, the kernel gets exact fp32 copies of the
        # bf16 inputs with IEEE fp32 dots, and its fp32 result is rounded back to bf16 by torch
        # (round-to-nearest). On a GPU the kernel reads bf16 directly and uses bf16 tensor-core dots.
        q, k, v = q.float(), k.float(), v.float()

    if varlen:
        total_q, hq, d = q.shape
        total_k, hkv = k.shape[0], k.shape[1]
        batch = cu_seqlens_q.shape[0] - 1
        out = torch.empty((total_q, hq, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
        sq_arg, sk_arg = total_q, total_k
        grid_sq, grid_sk = max_seqlen_q, max_seqlen_k
        q_strides = (0, q.stride(0), q.stride(1))
        k_strides = (0, k.stride(0), k.stride(1))
        v_strides = (0, v.stride(0), v.stride(1))
        o_strides = (0, out.stride(0), out.stride(1))
        l_strides = (0, lse.stride(0))
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        out = torch.empty((batch, sq, hq, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, hq, sq), dtype=torch.float32, device=q.device)
        sq_arg, sk_arg = sq, sk
        grid_sq, grid_sk = sq, sk
        q_strides = (q.stride(0), q.stride(1), q.stride(2))
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        v_strides = (v.stride(0), v.stride(1), v.stride(2))
        o_strides = (out.stride(0), out.stride(1), out.stride(2))
        l_strides = (lse.stride(0), lse.stride(1))
        cu_q = cu_k = lse  # never read when dense

    if out.numel() == 0 or batch == 0 or grid_sq == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse, None

    left = _window_bound(window_left, grid_sk)
    right = _window_bound(window_right, grid_sq)
    if softcap > 0:
        qk_scale, softcap_log2e = softmax_scale / softcap, softcap * LOG2E
    else:
        qk_scale, softcap_log2e = softmax_scale * LOG2E, 0.0
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16
    banded = int(window_left >= 0 or window_right >= 0)
    alibi = alibi_slopes is not None
    args = (q, k, v, out, lse, cu_q, cu_k, alibi_slopes if alibi else lse,
            *q_strides, *k_strides, *v_strides, *o_strides, *l_strides, alibi_slopes.stride(0) if alibi else 0,
            sq_arg, sk_arg, hq // hkv, qk_scale, softcap_log2e, left, right,
            _seq_bucket(grid_sq), _seq_bucket(grid_sk), banded)
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d, IS_VARLEN=varlen, SOFTCAP=softcap > 0,
                POSITIVE_SCALE=softmax_scale > 0, LONGEST_FIRST=window_right >= 0,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if alibi:  # only then: the kernels without ALiBi keep their specialisation (and AOT signature)
        meta["ALIBI"] = True

    if target is None:
        configs = (KernelConfig(tuple(_INTERPRET_CONFIG.items())),)
    else:
        configs = launch_configs(target, block_d, grid_sq)
        if not configs:  # unsupported() declines these before any launch
            raise RuntimeError(f"no Triton prefill configuration fits {target}")
    grid = lambda meta_: (triton.cdiv(grid_sq, meta_["BLOCK_M"]), hq, batch)  # noqa: E731
    return out, lse, Launch(_prefill_kernel, grid, args, meta, configs, AUTOTUNE_KEY, name="prefill")
