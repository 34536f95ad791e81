"""The oracle: every op of the public contract in plain PyTorch.

Readable over fast. Math is done in fp32 (or in the input dtype when that is wider, so fp64 inputs
give an fp64 oracle), on whatever device the inputs live. Every kernel in the package is tested
against these functions; they are tested against a naive per-query fp64 loop in
tests/test_reference.py.

Arguments arrive already validated and normalised by kvkernels.api:
  softmax_scale   float (never None)
  window          (left, right), -1 = unbounded; causal already folded into right (right <= 0)
  k_scale/v_scale fp32 [Hkv] (stride may be 0) for fp8 caches, for other attended caches when given
                  (value = stored * scale), else None
  alibi_slopes    fp32 [B, Hq] (batch stride may be 0) or None: FlashAttention's ALiBi, a bias
                  -slope[b, h] * |pos_q - pos_k| added to each score after the softcap, not scaled

fp8 caches are float8_e4m3fn or float8_e5m2 (both K and V in one format). Reading either is exact
(torch's widening); writing rounds to nearest even and saturates (quantize, e5m2_satfinite).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_E5M2_MAX = 57344.0  # largest finite float8_e5m2 (1.75 * 2^15)
E5M2_NAN = 0x7F  # the NaN the hardware's fp32 -> e5m2 conversion gives, whatever the input's sign


def _math_dtype(*tensors: torch.Tensor, upcast: bool = True) -> torch.dtype:
    """fp32 (fp64 if an input is fp64); with upcast=False the inputs' own dtype, which gives the
    naive low-precision baseline of the parity criterion."""
    if not upcast:
        return tensors[0].dtype
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------- attention


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype) -> torch.Tensor:
    """ALiBi bias [Hq, Sq, Sk] = -slopes[h] * |q_pos[i] - k_pos[j]| in `dtype` (FlashAttention's
    definition: q_pos of query i is i + Sk - Sq in a prefill, its cache position in decode / cache
    attention). slopes [Hq]; positions are integer tensors."""
    dist = (q_pos.to(torch.long)[:, None] - k_pos.to(torch.long)[None, :]).abs().to(dtype)
    return -slopes.to(dtype)[:, None, None] * dist


def _attend(q, k, v, scale, softcap, allowed, bias=None):
    """Softmax attention of one sequence.

    q [Sq, Hq, D], k/v [Sk, Hkv, D] (math dtype), allowed bool [Sq, Sk] -> out [Sq, Hq, D], lse [Hq, Sq].
    bias [Hq, Sq, Sk] (ALiBi) or None: added to the scores after the softcap.
    Rows with no allowed key give out 0 and lse -inf.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [Sk, Hq, D]
    v = v.repeat_interleave(group, dim=1)
    # A key no query may see is never read: its value (NaN or inf in an unused cache slot, say) has
    # weight 0, and 0 * inf would be NaN.
    v = v.masked_fill(~allowed.any(0)[:, None, None], 0.0)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, Sq, Sk]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Probabilities relative to the row maximum, normalised by their sum, as the kernels compute
    # them: exp(s - lse) with lse already rounded would be off by one rounding step of lse, which
    # at |lse| ~ 4.6e4 is 0.004 in fp32 (weights of 1.0017 for two equal keys).
    if scores.shape[-1]:
        row_max = scores.amax(dim=-1, keepdim=True)  # [Hq, Sq, 1]; -inf on empty rows
    else:
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))  # no keys at all
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)  # exactly 1 at the maximum, 0 where masked
    total = weights.sum(dim=-1, keepdim=True)
    empty = total == 0
    probs = weights / torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), row_max + torch.log(total)).squeeze(-1)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse  # out [Sq, Hq, D], lse [Hq, Sq]


def attention_mask(sq: int, sk: int, window_left: int, window_right: int, device=None) -> torch.Tensor:
    """bool [sq, sk]: query i may see key j iff j in [i + sk - sq - left, i + sk - sq + right]
    (bottom-right aligned; -1 = unbounded on that side)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    diag = i + sk - sq
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        allowed &= j >= diag - window_left
    if window_right >= 0:
        allowed &= j <= diag + window_right
    return allowed


def _slopes(alibi_slopes, b: int):
    """Sequence b's slopes [Hq] of alibi_slopes [Hq] or [B, Hq], or None."""
    if alibi_slopes is None:
        return None
    return alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]


def prefill_attention(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens_q=None,
                      cu_seqlens_k=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, upcast=True):
    """Flash-attention forward, dense or varlen.

    dense:  q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32
    varlen: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_q/k int [B+1] -> out [Tq, Hq, D], lse [Hq, Tq]
    alibi_slopes fp32 [Hq] or [B, Hq]: bias -slope * |i + Sk - Sq - j| (per sequence's lengths).
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    md = _math_dtype(q, k, v, upcast=upcast)
    lse_dtype = torch.float64 if md == torch.float64 else torch.float32

    if cu_seqlens_q is None:
        B, Sq, Hq, _ = q.shape
        Sk = k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty(B, Hq, Sq, dtype=lse_dtype, device=q.device)
        allowed = attention_mask(Sq, Sk, left, right, q.device)
        for b in range(B):
            o, l = _attend(q[b].to(md), k[b].to(md), v[b].to(md), scale, softcap, allowed,
                           _prefill_bias(alibi_slopes, b, Sq, Sk, md, q.device))
            out[b] = o.to(q.dtype)
            lse[b] = l.to(lse_dtype)
        return out, lse

    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        allowed = attention_mask(qe - qs, ke - ks, left, right, q.device)
        o, l = _attend(q[qs:qe].to(md), k[ks:ke].to(md), v[ks:ke].to(md), scale, softcap, allowed,
                       _prefill_bias(alibi_slopes, b, qe - qs, ke - ks, md, q.device))
        out[qs:qe] = o.to(q.dtype)
        lse[:, qs:qe] = l.to(lse_dtype)
    return out, lse


def _prefill_bias(alibi_slopes, b, sq, sk, dtype, device):
    slopes = _slopes(alibi_slopes, b)
    if slopes is None:
        return None
    return alibi_bias(slopes, torch.arange(sq, device=device) + (sk - sq), torch.arange(sk, device=device), dtype)


# ------------------------------------------------------------------------------------- caches


def dequantize(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """cache [..., Hkv, D] -> values in `dtype`: stored * scale[h] (fp8 storage always; other caches
    when a scale is given), multiplied in fp32 (fp64 for fp64 caches)."""
    if cache.dtype in FP8_DTYPES or scale is not None:
        wide = torch.float32 if cache.dtype in FP8_DTYPES else torch.promote_types(cache.dtype, torch.float32)
        s = scale.to(wide).reshape(-1).expand(cache.shape[-2])
        return (cache.to(wide) * s.unsqueeze(-1)).to(dtype)
    return cache.to(dtype)


def e5m2_satfinite(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> float8_e5m2 as the hardware converts it (PTX `cvt.rn.satfinite.e5m2x2.f32`, which the
    CUDA kernels run on sm_89+ and reproduce in integer code below it, the Triton kernels everywhere):

      * finite values round to nearest even, subnormals included (steps of 2^-16; |y| <= 2^-17 gives
        a zero of y's sign);
      * .satfinite: |y| > 57344 (the largest finite e5m2), +-inf included, gives +-57344 (0x7B / 0xFB);
      * NaN gives the canonical NaN 0x7F, whatever y's sign.

    torch's own `y.to(torch.float8_e5m2)` differs from the hardware, which wins here, in three places:
    it rounds |y| >= 61440 (the midpoint of 57344 and 2^16) to inf, keeps inf as inf, and gives a NaN
    y's sign (0xFF for a negative NaN). Clamping to +-57344 first fixes the first two (saturating before
    or after the rounding is the same: every value above 57344 ends at 57344 either way), the explicit
    NaN the third. (e4m3 has no infinity and its NaN keeps the sign in quantize, as torch does.)"""
    bits = y.clamp(-FP8_E5M2_MAX, FP8_E5M2_MAX).to(torch.float8_e5m2).view(torch.uint8)
    bits = torch.where(torch.isnan(y), torch.full_like(bits, E5M2_NAN), bits)
    return bits.view(torch.float8_e5m2)


def quantize(x: torch.Tensor, scale: torch.Tensor | None, cache_dtype: torch.dtype) -> torch.Tensor:
    """x [..., Hkv, D] -> cache_dtype; fp8 stores saturate(fp32(x) / scale[h]), rounding to nearest even:
    e4m3 as torch's `clamp(-448, 448).to(float8_e4m3fn)` (NaN keeps its sign), e5m2 as the hardware
    (e5m2_satfinite)."""
    if cache_dtype in FP8_DTYPES:
        s = scale.to(torch.float32).reshape(-1).expand(x.shape[-2])
        y = x.to(torch.float32) / s.unsqueeze(-1)
        if cache_dtype == torch.float8_e5m2:
            return e5m2_satfinite(y)
        return y.clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def gather_sequence(cache: torch.Tensor, b: int, length: int, block_table=None) -> torch.Tensor:
    """The first `length` positions of sequence b: [length, Hkv, D].

    contiguous: cache [B, S_max, Hkv, D]; paged: cache [num_pages, page_size, Hkv, D] with
    position p in page block_table[b, p // page_size], row p % page_size.
    """
    if block_table is None:
        return cache[b, :length]
    page_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    pages = block_table[b].to(torch.long)[pos // page_size]
    return cache[pages, pos % page_size]


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None,
                     window_left=-1, softcap=0.0, k_scale=None, v_scale=None, alibi_slopes=None, upcast=True):
    """One query token per sequence against its KV cache.

    q [B, Hq, D]; cache_seqlens int [B]; caches contiguous [B, S_max, Hkv, D] or paged
    [num_pages, page_size, Hkv, D] with block_table int [B, max_pages].
    alibi_slopes fp32 [Hq] or [B, Hq]: bias -slope * (cache_seqlens[b] - 1 - j) on position j.
    -> out [B, Hq, D] (q's dtype), lse [B, Hq] fp32. Empty sequence: out 0, lse -inf.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    md = _math_dtype(q, upcast=upcast)
    B, Hq, D = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float64 if md == torch.float64 else torch.float32,
                     device=q.device)
    for b, length in enumerate(cache_seqlens.tolist()):
        if length == 0:
            continue
        k = dequantize(gather_sequence(k_cache, b, length, block_table), k_scale, md)
        v = dequantize(gather_sequence(v_cache, b, length, block_table), v_scale, md)
        allowed = attention_mask(1, length, window_left, -1, q.device)
        bias = _cache_bias(alibi_slopes, b, 1, length, md, q.device)
        o, l = _attend(q[b].unsqueeze(0).to(md), k, v, scale, softcap, allowed, bias)
        out[b] = o[0].to(q.dtype)
        lse[b] = l[:, 0].to(lse.dtype)
    return out, lse


def cache_attention_mask(n_q: int, length: int, causal: bool, window_left: int, device=None) -> torch.Tensor:
    """bool [n_q, length]: query i of a sequence of `length` cached tokens whose last n_q are the
    queries sits at p = length - n_q + i and may see position j iff j <= p (causal) and
    j >= p - window_left (window_left >= 0). A query with p < 0 sees nothing."""
    p = torch.arange(n_q, device=device).unsqueeze(1) + (length - n_q)
    j = torch.arange(length, device=device).unsqueeze(0)
    allowed = (p >= 0) & (j < length)
    if causal:
        allowed = allowed & (j <= p)
    if window_left >= 0:
        allowed = allowed & (j >= p - window_left)
    return allowed


def _cache_bias(alibi_slopes, b, n_q, length, dtype, device):
    """ALiBi bias of sequence b's n_q queries at positions length - n_q + i against positions [0, length)."""
    slopes = _slopes(alibi_slopes, b)
    if slopes is None:
        return None
    return alibi_bias(slopes, torch.arange(n_q, device=device) + (length - n_q), torch.arange(length, device=device),
                      dtype)


def cache_attention(q, k_cache, v_cache, cache_seqlens, *, cu_seqlens_q=None, block_table=None, causal=True,
                    softmax_scale=None, window_left=-1, softcap=0.0, k_scale=None, v_scale=None, alibi_slopes=None,
                    upcast=True):
    """Several new queries per sequence against a KV cache that already holds their keys and values.

    dense q [B, Sq, Hq, D] (n_b = Sq) or ragged q [Tq, Hq, D] with cu_seqlens_q int [B+1]
    (n_b = cu[b+1] - cu[b]); caches as in decode_attention; cache_seqlens[b] counts the n_b new tokens.
    Query i of sequence b sits at p = cache_seqlens[b] - n_b + i and sees [0, p] (causal) or
    [0, cache_seqlens[b]), and only positions >= p - window_left when window_left >= 0.
    alibi_slopes fp32 [Hq] or [B, Hq]: bias -slope * |p - j| on position j.
    -> out like q (q's dtype), lse [B, Hq, Sq] (dense) or [Hq, Tq] (ragged) fp32. Seeing nothing:
    out 0, lse -inf.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    md = _math_dtype(q, upcast=upcast)
    lse_dtype = torch.float64 if md == torch.float64 else torch.float32
    ragged = cu_seqlens_q is not None
    lengths = cache_seqlens.tolist()
    out = torch.zeros_like(q)
    if ragged:
        bounds = cu_seqlens_q.tolist()
        spans = [(bounds[b], bounds[b + 1]) for b in range(len(lengths))]
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    else:
        spans = [(0, q.shape[1])] * len(lengths)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=lse_dtype, device=q.device)
    for b, (length, (qs, qe)) in enumerate(zip(lengths, spans)):
        if qe == qs or length == 0:
            continue
        qb = q[qs:qe] if ragged else q[b]
        k = dequantize(gather_sequence(k_cache, b, length, block_table), k_scale, md)
        v = dequantize(gather_sequence(v_cache, b, length, block_table), v_scale, md)
        allowed = cache_attention_mask(qe - qs, length, causal, window_left, q.device)
        bias = _cache_bias(alibi_slopes, b, qe - qs, length, md, q.device)
        o, l = _attend(qb.to(md), k, v, scale, softcap, allowed, bias)
        if ragged:
            out[qs:qe] = o.to(q.dtype)
            lse[:, qs:qe] = l.to(lse_dtype)
        else:
            out[b] = o.to(q.dtype)
            lse[b] = l.to(lse_dtype)
    return out, lse


def rotary_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                interleaved: bool = False) -> torch.Tensor:
    """Rotary embedding of x [..., H, D] at positions [...] (one per row, broadcast over the heads),
    in fp32: the exact values the kernels compute before their single rounding to the output dtype.

    cos/sin [max_position, rotary_dim / 2] (any float dtype, upcast to fp32); the first rotary_dim
    dims of each head are rotated, the rest pass through (converted to fp32, exactly). Pair j is
    (x[j], x[j + rotary_dim / 2]) (GPT-NeoX, interleaved=False) or (x[2j], x[2j + 1]) (GPT-J):
        x1' = x1 * cos[p, j] - x2 * sin[p, j],    x2' = x2 * cos[p, j] + x1 * sin[p, j],
    every product and sum rounded to fp32 on its own (no fused multiply-add).
    """
    half = cos.shape[-1]
    rd = 2 * half
    y = x.to(torch.float32)  # a copy for fp16/bf16; cloned below for fp32 so x is never written
    if y is x:
        y = y.clone()
    pos = positions.to(torch.long)
    c = cos.to(torch.float32)[pos].unsqueeze(-2)  # [..., 1, rd / 2]: the same angle for every head
    s = sin.to(torch.float32)[pos].unsqueeze(-2)
    if interleaved:
        x1, x2 = y[..., 0:rd:2], y[..., 1:rd:2]
    else:
        x1, x2 = y[..., :half], y[..., half:rd]
    r1 = x1 * c - x2 * s
    r2 = x2 * c + x1 * s
    if interleaved:
        y[..., 0:rd:2], y[..., 1:rd:2] = r1, r2
    else:
        y[..., :half], y[..., half:rd] = r1, r2
    return y


def apply_rotary(x, cos, sin, positions, *, interleaved=False):
    """x [..., H, D] rotated at positions [...] (see rotary_fp32), rounded once to x's dtype."""
    return rotary_fp32(x, cos, sin, positions, interleaved).to(x.dtype)


def append_kv(k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, k_scale=None, v_scale=None,
              cu_seqlens=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    """Write token i of sequence b at position cache_seqlens[b] + i, in place. Returns None.

    dense:  k/v [B, S_new, Hkv, D]
    ragged: k/v [T, Hkv, D] with cu_seqlens int [B+1]: sequence b's tokens are rows
            cu_seqlens[b] .. cu_seqlens[b+1] - 1
    caches as in decode_attention. cache_seqlens is not modified.
    rotary_cos/rotary_sin [max_position, rotary_dim / 2]: each key is first rotated at its own
    position cache_seqlens[b] + i (rotary_fp32, in fp32), then rounded or quantized once; values
    are stored as they are.
    """
    cu = None if cu_seqlens is None else cu_seqlens.tolist()
    for b, start in enumerate(cache_seqlens.tolist()):
        kb, vb = (k[b], v[b]) if cu is None else (k[cu[b]:cu[b + 1]], v[cu[b]:cu[b + 1]])  # [n_b, Hkv, D]
        pos = torch.arange(start, start + kb.shape[0], device=kb.device)
        if rotary_cos is not None:
            kb = rotary_fp32(kb, rotary_cos, rotary_sin, pos, rotary_interleaved)
        for src, cache, scale in ((kb, k_cache, k_scale), (vb, v_cache, v_scale)):
            values = quantize(src, scale, cache.dtype)
            if block_table is None:
                cache[b, pos] = values
            else:
                page_size = cache.shape[1]
                pages = block_table[b].to(torch.long)[pos // page_size]
                cache[pages, pos % page_size] = values


def append_kv_slots(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None, positions=None,
                    rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    """Write token t at slot slot_mapping[t] (page s // page_size, row s % page_size), in place.

    k/v [T, Hkv, D]; caches [pages, page_size, Hkv, D] (a contiguous [B, S_max, Hkv, D] cache is
    the same thing read as B pages of S_max rows). Negative slots are skipped. With rotary_cos/sin,
    key t is rotated at positions[t] (int [T]) before it is stored, as in append_kv.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.long)
    k_kept = k[keep]
    if rotary_cos is not None:  # a skipped token's position is never read
        k_kept = rotary_fp32(k_kept, rotary_cos, rotary_sin, positions[keep], rotary_interleaved)
    for src, cache, scale in ((k_kept, k_cache, k_scale), (v[keep], v_cache, v_scale)):
        page_size = cache.shape[1]
        cache[slots // page_size, slots % page_size] = quantize(src, scale, cache.dtype)


def merge_states(outs, lses):
    """Combine attention over N disjoint key sets, in the order given (deterministic).

    outs [N, ..., H, D], lses [N, ..., H] (natural log) -> (out [..., H, D] in outs' dtype, lse fp32;
    fp64 when the inputs are fp64). A state is empty when its lse is -inf, or +inf (the convention of
    FlashAttention 2 and vLLM); an empty state's out is never read. All empty: out 0, lse -inf.

        M = max_i lse_i,  w_i = exp(lse_i - M),  out = sum_i w_i out_i / sum_i w_i,  lse = M + log sum_i w_i

    The weights are relative to the largest lse (so one of them is exactly 1), not to the rounded
    merged lse, which at |lse| ~ 1e4 would cost ~1e-3 relative in fp32.
    """
    md = _math_dtype(outs, lses)
    lse = lses.to(md)
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)
    m = lse.amax(dim=0) if lse.shape[0] else torch.full(lse.shape[1:], float("-inf"), dtype=md, device=lse.device)
    empty = torch.isneginf(m)
    m = torch.where(empty, torch.zeros_like(m), m)
    acc = torch.zeros(outs.shape[1:], dtype=md, device=outs.device)
    total = torch.zeros_like(m)
    for i in range(lses.shape[0]):
        w = torch.exp(lse[i] - m)  # exactly 0 for an empty state
        acc = acc + torch.where(w.unsqueeze(-1) > 0, w.unsqueeze(-1) * outs[i].to(md), 0.0)
        total = total + w
    merged_lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(total))
    out = acc / torch.where(empty, torch.ones_like(total), total).unsqueeze(-1)
    return out.to(outs.dtype), merged_lse.to(torch.float32 if md == torch.float32 else md)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key sets: merge_states of the two, in the order a, b.

    out_* [..., H, D], lse_* [..., H] (natural log) -> (out [..., H, D] in out_a's dtype, lse fp32;
    fp64 when the inputs are fp64). An empty side has lse -inf (or +inf); both empty gives out 0,
    lse -inf.
    """
    dtype = out_a.dtype
    md = _math_dtype(out_a, out_b, lse_a, lse_b)
    out, lse = merge_states(torch.stack((out_a.to(md), out_b.to(md))), torch.stack((lse_a.to(md), lse_b.to(md))))
    return out.to(dtype), lse
