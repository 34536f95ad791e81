"""The oracle: every op of the public contract in plain PyTorch.

Readable over fast. Math is done in fp32 (or in the input dtype when that is wider, so fp64 inputs
give an fp64 oracle), on whatever device the inputs live. Every kernel in the package is tested
against these functions; they are tested against a naive per-query fp64 loop in
tests/test_reference.py.

Arguments arrive already validated and normalised by kvkernels.api:
  softmax_scale   float (never None)
  window          (left, right), -1 = unbounded; causal already folded into right (right <= 0)
  k_scale/v_scale fp32 [Hkv] (stride may be 0) for fp8 caches, None otherwise
"""

from __future__ import annotations

import math

import torch

FP8_DTYPES = (torch.float8_e4m3fn,)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _math_dtype(*tensors: torch.Tensor, upcast: bool = True) -> torch.dtype:
    """fp32 (fp64 if an input is fp64); with upcast=False the inputs' own dtype, which gives the
    naive low-precision baseline of the parity criterion."""
    if not upcast:
        return tensors[0].dtype
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------- attention


def _attend(q, k, v, scale, softcap, allowed):
    """Softmax attention of one sequence.

    q [Sq, Hq, D], k/v [Sk, Hkv, D] (math dtype), allowed bool [Sq, Sk] -> out [Sq, Hq, D], lse [Hq, Sq].
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
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Sq]; -inf on empty rows
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(lse.dtype).min))
    probs = probs.masked_fill(~allowed, 0.0)  # exp(-inf - -inf) would be NaN on empty rows
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse


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


def prefill_attention(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens_q=None,
                      cu_seqlens_k=None, window_size=(-1, -1), softcap=0.0, upcast=True):
    """Flash-attention forward, dense or varlen.

    dense:  q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32
    varlen: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_q/k int [B+1] -> out [Tq, Hq, D], lse [Hq, Tq]
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
            o, l = _attend(q[b].to(md), k[b].to(md), v[b].to(md), scale, softcap, allowed)
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
        o, l = _attend(q[qs:qe].to(md), k[ks:ke].to(md), v[ks:ke].to(md), scale, softcap, allowed)
        out[qs:qe] = o.to(q.dtype)
        lse[:, qs:qe] = l.to(lse_dtype)
    return out, lse


# ------------------------------------------------------------------------------------- caches


def dequantize(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """cache [..., Hkv, D] -> values in `dtype`; fp8 storage is stored * scale[h]."""
    if cache.dtype in FP8_DTYPES:
        s = scale.to(torch.float32).reshape(-1).expand(cache.shape[-2])
        return (cache.to(torch.float32) * s.unsqueeze(-1)).to(dtype)
    return cache.to(dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor | None, cache_dtype: torch.dtype) -> torch.Tensor:
    """x [..., Hkv, D] -> cache_dtype; fp8 stores saturate(x / scale[h]), rounding to nearest even."""
    if cache_dtype in FP8_DTYPES:
        s = scale.to(torch.float32).reshape(-1).expand(x.shape[-2])
        y = x.to(torch.float32) / s.unsqueeze(-1)
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
                     window_left=-1, softcap=0.0, k_scale=None, v_scale=None, upcast=True):
    """One query token per sequence against its KV cache.

    q [B, Hq, D]; cache_seqlens int [B]; caches contiguous [B, S_max, Hkv, D] or paged
    [num_pages, page_size, Hkv, D] with block_table int [B, max_pages].
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
        o, l = _attend(q[b].unsqueeze(0).to(md), k, v, scale, softcap, allowed)
        out[b] = o[0].to(q.dtype)
        lse[b] = l[:, 0].to(lse.dtype)
    return out, lse


def append_kv(k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, k_scale=None, v_scale=None,
              cu_seqlens=None):
    """Write token i of sequence b at position cache_seqlens[b] + i, in place. Returns None.

    dense:  k/v [B, S_new, Hkv, D]
    ragged: k/v [T, Hkv, D] with cu_seqlens int [B+1]: sequence b's tokens are rows
            cu_seqlens[b] .. cu_seqlens[b+1] - 1
    caches as in decode_attention. cache_seqlens is not modified.
    """
    cu = None if cu_seqlens is None else cu_seqlens.tolist()
    for b, start in enumerate(cache_seqlens.tolist()):
        kb, vb = (k[b], v[b]) if cu is None else (k[cu[b]:cu[b + 1]], v[cu[b]:cu[b + 1]])  # [n_b, Hkv, D]
        pos = torch.arange(start, start + kb.shape[0], device=kb.device)
        for src, cache, scale in ((kb, k_cache, k_scale), (vb, v_cache, v_scale)):
            values = quantize(src, scale, cache.dtype)
            if block_table is None:
                cache[b, pos] = values
            else:
                page_size = cache.shape[1]
                pages = block_table[b].to(torch.long)[pos // page_size]
                cache[pages, pos % page_size] = values


def append_kv_slots(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None):
    """Write token t at slot slot_mapping[t] (page s // page_size, row s % page_size), in place.

    k/v [T, Hkv, D]; caches [pages, page_size, Hkv, D] (a contiguous [B, S_max, Hkv, D] cache is
    the same thing read as B pages of S_max rows). Negative slots are skipped.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.long)
    for src, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        page_size = cache.shape[1]
        cache[slots // page_size, slots % page_size] = quantize(src[keep], scale, cache.dtype)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key sets.

    out_* [..., H, D], lse_* [..., H] (natural log) -> (out [..., H, D] in out_a's dtype, lse fp32;
    fp64 when the inputs are fp64).
    An empty side has lse -inf; both empty gives out 0, lse -inf.
    """
    md = _math_dtype(out_a, out_b, lse_a, lse_b)
    la, lb = lse_a.to(md), lse_b.to(md)
    # Weights relative to the larger lse (one of them is exactly 1), not to the rounded merged lse,
    # which at |lse| ~ 1e4 would cost ~1e-3 relative in fp32.
    m = torch.maximum(la, lb)
    empty = torch.isneginf(m)
    m = torch.where(empty, torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)  # exp(-inf) = 0 for an empty side
    total = wa + wb
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(total))
    denom = torch.where(empty, torch.ones_like(total), total).unsqueeze(-1)
    out = (wa.unsqueeze(-1) * out_a.to(md) + wb.unsqueeze(-1) * out_b.to(md)) / denom
    return out.to(out_a.dtype), lse.to(torch.float32 if md == torch.float32 else md)
