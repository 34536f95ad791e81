"""Drop-in replacements for FlashAttention 2's inference functions, running on kvkernels.

    from kvkernels.compat.flash_attn import (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
        flash_attn_qkvpacked_func, flash_attn_kvpacked_func, flash_attn_varlen_qkvpacked_func,
        flash_attn_varlen_kvpacked_func)

Same signatures, shapes and semantics as flash_attn 2.x (causal masks bottom-right aligned,
window_size=(left, right) with -1 unbounded, softcap, GQA by passing fewer K/V heads, lse in natural
log, return_attn_probs -> (out, lse, None): the probabilities are not formed). Forward only.

Supported beyond the three basic functions:
  * flash_attn_with_kvcache: cache_batch_idx (contiguous cache: sequence b reads and writes row
    cache_batch_idx[b]; rows distinct when appending), cache_leftpad (contiguous cache: sequence b's keys
    start at position cache_leftpad[b] of its row; cache_seqlens counts from the row start, padding
    included, as in FlashAttention; new k/v go at cache_seqlens[b] + i; masks count unpadded keys),
    num_splits, return_softmax_lse, out= (keyword, as vLLM's fork), and rotary_cos/rotary_sin/
    rotary_interleaved with k/v: FlashAttention's positions (new key i at cache_seqlens[b] + i in row
    coordinates; q at cache_seqlens[b] + i when causal or windowed, else at cache_seqlens[b]), keys
    rotated inside the append (kvkernels.append_kv's fused rotary), q by kvkernels.apply_rotary.
  * flash_attn_varlen_func: block_table (paged k/v), seqused_k (keyword, vLLM's fork: sequence b uses the
    first seqused_k[b] keys of its cu_seqlens_k span, or its paged length; cu_seqlens_k may then be None
    when paged), out= (keyword). FlashAttention 2's positional order is kept (vLLM's fork reorders it).
  * the packed forms take qkv [B, S, 3, H, D] / kv [B, Sk, 2, Hkv, D] (varlen: [T, 3, H, D] /
    [Tk, 2, Hkv, D]) as strided views, without a copy: every backend reads strides (last dim contiguous).
  * alibi_slopes fp32 [Hq] or [B, Hq] in every function, FlashAttention's bias -slope * |i + Sk - Sq - j|
    (after the softcap, unscaled; Sk, Sq per sequence: varlen spans, seqused_k, cache lengths after the
    append). With cache_leftpad the distances count unpadded keys, as FlashAttention's do (its key 0
    is the row's position cache_leftpad[b]); the |.| is shift-invariant, so they equal row positions'.
    The returned lse is the log-sum-exp of these logits. FlashAttention's causal kernel adds +slope * j
    instead (the same probabilities), so its lse is larger by slope * (i + Sk - Sq) on causal calls
    without a window; ours is the one that merges across key chunks.
Raising NotImplementedError: dropout_p > 0; there is no backward. FlashAttention's own refusals are kept: cache_batch_idx or cache_leftpad with a block_table
raise ValueError.

flash_attn_with_kvcache paths:
  * k/v given: appended in place at cache_seqlens (kvkernels.append_kv; FlashAttention's
    cache_seqlens is the length *before* the append), then attention over cache_seqlens + S_new.
  * cache_batch_idx / cache_leftpad: the contiguous cache is read as pages of itself (a view, no copy):
    pages of P rows (P the largest divisor of S_max up to 256) for cache_batch_idx alone, one-row
    pages with a leftpad; the block table is built on the device from the index tensors (no sync,
    capturable in CUDA graphs), then the paths below run on that view.
  * Sq == 1 (decode): kvkernels.decode_attention straight on the cache (contiguous or paged),
    no copy; causal and window_size[1] change nothing for a single last-position query.
  * Sq > 1 (chunked prefill, speculative verification): kvkernels.cache_attention straight on the
    cache, no copy: FlashAttention's bottom-right alignment puts query i at position
    total - Sq + i, which is cache_attention's rule. Two cases it cannot express fall back to a
    gathered copy and varlen prefill_attention (lengths read on the host): a window reaching right
    of the diagonal without causal (window_size[1] > 0), and, where the lengths are readable for
    free (CPU tensors), sequences holding fewer keys than queries (FlashAttention's rows that see
    no key); on a GPU those rows see nothing in cache_attention too.
  * out=: the result is computed, then copied into out (checked before anything is written).

flash_attn_varlen_func(block_table=...) runs cache_attention on the paged cache the same way, and
seqused_k over packed k/v reads them as one-row pages (k.unsqueeze(1), a view).

Index values (cache_batch_idx range and repeats, leftpad within the length, appends within the row,
seqused_k within its span) are checked where that costs no device sync (CPU tensors, checked mode),
before anything is written.
"""

from __future__ import annotations

import torch

from .. import api


def _dropout(dropout_p):
    if dropout_p:
        raise NotImplementedError(f"dropout_p={dropout_p}: kvkernels is inference-only (use dropout_p=0.0)")


def _window(window_size):
    if window_size is None:
        return (-1, -1)
    return tuple(int(w) for w in window_size)


def _contig_last(x):
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D]
    (return_attn_probs=True: (out, softmax_lse [B, Hq, Sq], None); the probabilities are not formed)."""
    _dropout(dropout_p)
    q, k, v = (_contig_last(x) for x in (q, k, v))
    out, lse = api.prefill_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                     window_size=_window(window_size), softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
    return (out, lse, None) if return_attn_probs else out


def _gather_paged(cache, block_table, cu_seqlens):
    """Packed [total, Hkv, D] rows of each sequence's positions [0, len) from a paged cache."""
    page_size = cache.shape[1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    rows = []
    for b, n in enumerate(lengths):
        pos = torch.arange(n, device=cache.device)
        rows.append(block_table[b].long()[pos // page_size] * page_size + pos % page_size)
    idx = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long, device=cache.device)
    return cache.reshape(-1, *cache.shape[2:]).index_select(0, idx)


def _cache_causal(causal, window):
    """(causal, window_left) for cache_attention, or None when FlashAttention's mask is not one of
    its masks (a window reaching right of the diagonal without causal)."""
    left, right = window
    if causal or right == 0:
        return True, left
    if right < 0:
        return False, left
    return None


def _fewer_keys_than_queries(lengths, counts) -> bool:
    """True when some sequence has 0 < keys < queries and the values are readable for free (CPU)."""
    if lengths.device.type != "cpu" or (isinstance(counts, torch.Tensor) and counts.device.type != "cpu"):
        return False
    return bool(((lengths > 0) & (lengths < counts)).any())


def _check_out(out, shape, dtype, device):
    """out= (FlashAttention's C++ API and vLLM's fork): checked before anything is written."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {list(shape)} (like q), got {list(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out must have q's dtype {str(dtype).replace('torch.', '')}, "
                        f"got {str(out.dtype).replace('torch.', '')}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}, expected {device} (q's device)")


def _into(out, result):
    if out is None:
        return result
    out.copy_(result)
    return out


def _precheck_attention(q, k_cache, softmax_scale, window_size, softcap, num_splits):
    """The attention's own argument checks, run before an append so that a bad argument writes nothing."""
    from .. import validation as V
    V.tensor("q", q, rank=4, dtypes=V.FLOAT_DTYPES)
    V.tensor("k_cache", k_cache, rank=4, dtypes=V.FLOAT_DTYPES + V.FP8_DTYPES, device=q.device)
    if k_cache.dtype != q.dtype and k_cache.dtype not in V.FP8_DTYPES:
        raise TypeError(f"k_cache/v_cache must have q's dtype {q.dtype} or be fp8 ({V.FP8_NAMES}), "
                        f"got {k_cache.dtype}")
    if k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"k_cache/v_cache must have head dim {q.shape[3]} like q, got {k_cache.shape[3]}")
    V.heads(q.shape[2], k_cache.shape[2], kv_name="k_cache")
    api._default_scale(softmax_scale, q.shape[3])
    api._softcap(softcap)
    V.scalar("num_splits", num_splits, kind=int, minimum=0)
    left, right = window_size
    V.scalar("window_size[0]", left, kind=int, minimum=-1)
    V.scalar("window_size[1]", right, kind=int, minimum=-1)


def _index_vector(name, x, batch, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor [B], got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {str(x.dtype).replace('torch.', '')}")
    if tuple(x.shape) != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one entry per sequence of q), got {list(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (q's device)")


def _page_size_for(s_max: int) -> int:
    """The largest page size <= 256 (the Triton kernels' limit) dividing S_max: a contiguous cache row
    read as S_max / P whole pages, so cache_batch_idx costs no per-position block-table entries."""
    for p in range(min(s_max, 256), 0, -1):
        if s_max % p == 0:
            return p
    return 1


def _as_pages(cache, page_size):
    """[B_cache, S_max, Hkv, D] -> [B_cache * S_max / P, P, Hkv, D], a view (never a copy)."""
    b_cache, s_max = cache.shape[:2]
    try:
        return cache.view(b_cache * (s_max // page_size), page_size, *cache.shape[2:])
    except RuntimeError:
        raise ValueError(f"cache_batch_idx/cache_leftpad read the contiguous cache as pages of {page_size} rows, "
                         f"which needs its first two dimensions to be mergeable without a copy; got strides "
                         f"{tuple(cache.stride())}") from None


def _row_view(k_cache, v_cache, cache_seqlens, cache_batch_idx, cache_leftpad):
    """cache_batch_idx / cache_leftpad over a contiguous cache as a paged view of that cache (no copy).

    Sequence b's row is r = cache_batch_idx[b] (default b); its keys sit at positions
    [leftpad[b], cache_seqlens[b]) of row r (FlashAttention: cache_seqlens counts from the row start,
    the padding included) and the new k/v go at cache_seqlens[b] + i. Logical position j of the
    sequence is row r, position leftpad[b] + j: a block table over pages of P rows, built on the device
    from the index tensors (no sync). P = 1 with a leftpad (any offset); without one, P divides S_max.
    -> (k_pages, v_pages, block_table int32 [B, S_max / P], lengths int32 [B] without the padding).
    """
    b_cache, s_max = k_cache.shape[:2]
    batch = cache_seqlens.shape[0]
    device = k_cache.device
    rows = cache_batch_idx if cache_batch_idx is not None else torch.arange(batch, dtype=torch.int32, device=device)
    if cache_leftpad is None:
        page = _page_size_for(s_max)
        per_row = s_max // page
        if per_row == 1:
            table = rows.view(batch, 1)
        else:
            cols = torch.arange(per_row, dtype=torch.int32, device=device)
            table = rows.view(batch, 1) * per_row + cols
        lengths = cache_seqlens
    else:
        page = 1
        pos = torch.arange(s_max, dtype=torch.int32, device=device).unsqueeze(0) + cache_leftpad.unsqueeze(1)
        # Positions past the row's end are -1 (skipped), never the next row's first slots.
        table = torch.where(pos < s_max, rows.view(batch, 1) * s_max + pos, -1).to(torch.int32)
        # A leftpad past the length would give a negative length; unchecked (device values) it reads nothing.
        lengths = (cache_seqlens - cache_leftpad).clamp_min(0).to(torch.int32)
    return _as_pages(k_cache, page), _as_pages(v_cache, page), table, lengths


def _check_rows(k_cache, cache_seqlens, cache_batch_idx, cache_leftpad, s_new, appending):
    """Index values of cache_batch_idx / cache_leftpad, read where that costs no sync (CPU, checked mode)."""
    from .. import validation as V
    if not V.values_checkable(cache_seqlens, cache_batch_idx, cache_leftpad):
        return
    seqlens, idx, pad = V.host_copies(cache_seqlens, cache_batch_idx, cache_leftpad)
    b_cache, s_max = k_cache.shape[:2]
    if idx is not None and idx.numel():
        bad = ((idx < 0) | (idx >= b_cache)).nonzero()
        if bad.numel():
            b = int(bad[0])
            raise ValueError(f"cache_batch_idx[{b}] = {int(idx[b])} is not a row of the cache (0..{b_cache - 1})")
        if appending:
            uniq, counts = torch.unique(idx, return_counts=True)
            if bool((counts > 1).any()):
                row = int(uniq[counts > 1][0])
                who = (idx == row).nonzero().squeeze(1).tolist()
                raise ValueError(f"cache_batch_idx repeats row {row} (sequences {who}) while appending k/v: two "
                                 f"sequences would write one cache row (FlashAttention leaves which write wins "
                                 f"undefined); give each appending sequence its own row")
    if seqlens.numel():
        lo = int(seqlens.min())
        if lo < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {lo} (sequence {int(seqlens.argmin())})")
        ends = seqlens.to(torch.int64) + s_new
        if int(ends.max()) > s_max:
            b = int(ends.argmax())
            raise ValueError(f"cache_seqlens[{b}] + {s_new} new tokens = {int(ends[b])} runs past the cache row's "
                             f"{s_max} positions (S_max)")
    if pad is not None and pad.numel():
        if int(pad.min()) < 0:
            b = int(pad.argmin())
            raise ValueError(f"cache_leftpad[{b}] = {int(pad[b])} must be >= 0")
        past = (pad > seqlens).nonzero()
        if past.numel():
            b = int(past[0])
            raise ValueError(f"cache_leftpad[{b}] = {int(pad[b])} is past the sequence's length cache_seqlens[{b}] = "
                             f"{int(seqlens[b])} (cache_seqlens counts from the row start, the padding included)")


def _packed_pages(k, cu_seqlens_k, batch, max_seqlen_k):
    """The block table int32 [B, max_seqlen_k] reading packed k [Tk, Hkv, D] as one-row pages
    (k.unsqueeze(1), a view): entry j of sequence b is cu_seqlens_k[b] + j (-1 past Tk), built on the device."""
    pos = cu_seqlens_k[:batch].unsqueeze(1) + torch.arange(max(max_seqlen_k, 1), dtype=torch.int32, device=k.device)
    return torch.where(pos < k.shape[0], pos, -1).to(torch.int32)


def _cumulative(lengths):
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, seqused_k=None,
                           out=None):
    """q [Tq, Hq, D]; k/v [Tk, Hkv, D] (or, with block_table [B, max_pages], a paged cache
    [num_pages, page_size, Hkv, D] whose sequence b holds cu_seqlens_k[b+1] - cu_seqlens_k[b] keys);
    cu_seqlens_* int32 [B+1] -> out [Tq, Hq, D] (return_attn_probs: (out, lse [Hq, Tq], None)).

    seqused_k int32 [B] (vLLM's fork): sequence b uses only the first seqused_k[b] keys of its
    cu_seqlens_k span (paged: its length; cu_seqlens_k may then be None). Causal alignment counts
    those keys. out= [Tq, Hq, D] in q's dtype receives the result (and is returned).
    """
    _dropout(dropout_p)
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a tensor [Tq, Hq, D], got {getattr(q, 'shape', type(q).__name__)}")
    _check_out(out, q.shape, q.dtype, q.device)
    q = _contig_last(q)
    batch = cu_seqlens_q.shape[0] - 1 if isinstance(cu_seqlens_q, torch.Tensor) else None
    if seqused_k is not None:
        _index_vector("seqused_k", seqused_k, batch, q.device)
    elif cu_seqlens_k is None:
        raise ValueError("cu_seqlens_k is required (it may be None only with seqused_k and block_table)")
    mask = _cache_causal(causal, _window(window_size))
    if block_table is not None:
        lengths = seqused_k if seqused_k is not None else cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        cu_k = cu_seqlens_k if seqused_k is None else None
        pages_k, pages_v, table = k, v, block_table
    elif seqused_k is not None:
        # Packed k/v read as one-row pages: sequence b's keys are rows cu_seqlens_k[b] .. + seqused_k[b] - 1.
        _check_seqused(seqused_k, cu_seqlens_k)
        lengths, cu_k = seqused_k, None
        k, v = _contig_last(k), _contig_last(v)
        pages_k, pages_v = k.unsqueeze(1), v.unsqueeze(1)
        table = _packed_pages(k, cu_seqlens_k, batch, int(max_seqlen_k))
    else:
        lengths = None
    if lengths is not None:
        if mask is not None and not _fewer_keys_than_queries(lengths, cu_seqlens_q[1:] - cu_seqlens_q[:-1]):
            # Attended in place: query i of sequence b sits at L_b - n_b + i.
            res, lse = api.cache_attention(q, pages_k, pages_v, lengths, cu_seqlens_q=cu_seqlens_q,
                                           max_seqlen_q=int(max_seqlen_q), block_table=table, causal=mask[0],
                                           softmax_scale=softmax_scale, window_left=mask[1], softcap=softcap,
                                           alibi_slopes=alibi_slopes, return_lse=True)
            res = _into(out, res)
            return (res, lse, None) if return_attn_probs else res
        # A mask cache_attention cannot express: gather the keys into the packed layout (a copy).
        cu_k = _cumulative(lengths) if cu_k is None else cu_k
        k = _gather_paged(pages_k, table, cu_k)
        v = _gather_paged(pages_v, table, cu_k)
        cu_seqlens_k = cu_k
    k, v = _contig_last(k), _contig_last(v)
    res, lse = api.prefill_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                                     cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
                                     max_seqlen_k=int(max_seqlen_k), window_size=_window(window_size),
                                     softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
    res = _into(out, res)
    return (res, lse, None) if return_attn_probs else res


def _check_seqused(seqused_k, cu_seqlens_k):
    from .. import validation as V
    if cu_seqlens_k is None:
        raise ValueError("cu_seqlens_k is required with packed k/v (seqused_k selects keys within its spans)")
    if not V.values_checkable(seqused_k, cu_seqlens_k):
        return
    used, cu = V.host_copies(seqused_k, cu_seqlens_k)
    spans = (cu[1:] - cu[:-1]).to(torch.int64)
    if used.numel() and int(used.min()) < 0:
        raise ValueError(f"seqused_k must be >= 0, got {int(used.min())}")
    over = (used.to(torch.int64) > spans).nonzero()
    if over.numel():
        b = int(over[0])
        raise ValueError(f"seqused_k[{b}] = {int(used[b])} is more than sequence {b}'s {int(spans[b])} keys "
                         f"(cu_seqlens_k[{b + 1}] - cu_seqlens_k[{b}])")


def _unpack(name, x, rank, dim, parts):
    if not isinstance(x, torch.Tensor) or x.dim() != rank or x.shape[dim] != parts:
        want = {("qkv", 5): "[B, S, 3, H, D]", ("kv", 5): "[B, Sk, 2, Hkv, D]",
                ("qkv", 4): "[T, 3, H, D]", ("kv", 4): "[Tk, 2, Hkv, D]"}[(name, rank)]
        raise ValueError(f"{name} must be a tensor {want}, got {getattr(x, 'shape', type(x).__name__)}")
    return x.unbind(dim)  # strided views, no copy: every backend takes strides (last dim contiguous)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv [B, S, 3, H, D] -> out [B, S, H, D] (return_attn_probs: (out, lse [B, H, S], None))."""
    q, k, v = _unpack("qkv", qkv, 5, 2, 3)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [B, Sq, Hq, D], kv [B, Sk, 2, Hkv, D] -> out [B, Sq, Hq, D] (as flash_attn_func)."""
    k, v = _unpack("kv", kv, 5, 2, 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv [T, 3, H, D], cu_seqlens int32 [B+1] -> out [T, H, D] (return_attn_probs: (out, lse [H, T], None))."""
    q, k, v = _unpack("qkv", qkv, 4, 1, 3)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [Tq, Hq, D], kv [Tk, 2, Hkv, D] -> out [Tq, Hq, D] (as flash_attn_varlen_func)."""
    k, v = _unpack("kv", kv, 4, 1, 2)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, out=None):
    """Attention of q [B, Sq, Hq, D] over a KV cache, optionally appending k/v [B, S_new, Hkv, D] first.

    k_cache/v_cache: [B_cache, S_max, Hkv, D], or paged [num_pages, page_size, Hkv, D] with block_table
    int32 [B, max_pages]. cache_seqlens: int or int32 [B], the lengths before the append (None:
    the whole cache). Sequence b attends to positions [0, cache_seqlens[b] + S_new); with causal,
    query i sees keys up to i + (cache_seqlens[b] + S_new) - Sq.
    cache_batch_idx int32 [B] (contiguous cache only): sequence b reads and writes cache row
    cache_batch_idx[b] (default b); rows must be distinct when appending.
    cache_leftpad int32 [B] (contiguous cache only): sequence b's keys start at position cache_leftpad[b]
    of its row; cache_seqlens counts from the row start, padding included, so the sequence holds
    cache_seqlens[b] - cache_leftpad[b] keys, the new k/v go at cache_seqlens[b] + i, and the causal
    alignment counts only the unpadded keys.
    out= [B, Sq, Hq, D] in q's dtype receives the result (and is returned).
    rotary_cos/rotary_sin [max_position, rotary_dim / 2] (with k/v only): new key i of sequence b is
    rotated at position cache_seqlens[b] + i (row coordinates, padding included) inside the append,
    and q at cache_seqlens[b] + i when causal or windowed, else every query at cache_seqlens[b];
    rotary_interleaved=True pairs adjacent dims (GPT-J), False the two halves (GPT-NeoX).
    -> out [B, Sq, Hq, D] (+ softmax_lse [B, Hq, Sq] fp32 when return_softmax_lse).
    """
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary and k is None:
        raise ValueError("rotary_cos/rotary_sin rotate the appended keys and the queries: pass k and v with them "
                         "(FlashAttention applies rotary only when k and v are given)")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a tensor [B, Sq, Hq, D], got {getattr(q, 'shape', type(q).__name__)}")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    _check_out(out, q.shape, q.dtype, q.device)
    q = _contig_last(q)
    B, sq, hq, d = q.shape
    device = q.device
    paged = block_table is not None
    by_row = cache_batch_idx is not None or cache_leftpad is not None
    if paged and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx selects rows of a contiguous cache; a paged cache (block_table) maps each "
                         "sequence through its block_table row instead (FlashAttention rejects the pair too)")
    if paged and cache_leftpad is not None:
        raise ValueError("cache_leftpad is for a contiguous cache; with a paged cache (block_table) start each "
                         "sequence's block_table at its first page instead (FlashAttention rejects the pair too)")
    if by_row and (not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4):
        raise ValueError(f"k_cache must be a tensor [B_cache, S_max, Hkv, D], got "
                         f"{getattr(k_cache, 'shape', type(k_cache).__name__)}")
    if cache_batch_idx is not None:
        _index_vector("cache_batch_idx", cache_batch_idx, B, device)
    if cache_leftpad is not None:
        _index_vector("cache_leftpad", cache_leftpad, B, device)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when appending k/v (the position to write at)")
        full = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
        cache_seqlens = full
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    row_seqlens = cache_seqlens  # positions in row coordinates (rotary), before any leftpad view
    if by_row:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
            raise TypeError("cache_seqlens must be an int or an int32 tensor [B]")
        _index_vector("cache_seqlens", cache_seqlens, B, device)
        s_new = 0 if k is None else k.shape[1]
        _check_rows(k_cache, cache_seqlens, cache_batch_idx, cache_leftpad, s_new, appending=k is not None)
        k_cache, v_cache, block_table, cache_seqlens = _row_view(k_cache, v_cache, cache_seqlens, cache_batch_idx,
                                                                 cache_leftpad)
        paged = True
    if k is not None:
        _precheck_attention(q, k_cache, softmax_scale, _window(window_size), softcap, num_splits)
        k, v = _contig_last(k), _contig_last(v)
        if rotary:
            left = _window(window_size)[0]
            q, k, fused = _rotary(q, k, rotary_cos, rotary_sin, row_seqlens, rotary_interleaved,
                                  per_query=causal or left >= 0, fuse=cache_leftpad is None)
            if fused:
                api.append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table=block_table, rotary_cos=rotary_cos,
                              rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved)
            else:
                api.append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table=block_table)
        else:
            api.append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table=block_table)
        total = cache_seqlens + k.shape[1]
    else:
        total = cache_seqlens
    if not isinstance(total, torch.Tensor) or total.dtype != torch.int32:
        raise TypeError("cache_seqlens must be an int or an int32 tensor [B]")
    left, right = _window(window_size)

    if sq == 1:
        res, lse = api.decode_attention(q[:, 0], k_cache, v_cache, total, block_table=block_table,
                                        softmax_scale=softmax_scale, window_left=left, softcap=softcap,
                                        num_splits=num_splits, alibi_slopes=alibi_slopes, return_lse=True)
        res, lse = res.unsqueeze(1), lse.unsqueeze(-1)
    elif (mask := _cache_causal(causal, (left, right))) is not None and not _fewer_keys_than_queries(total, sq):
        # Several queries per sequence, on the cache in place: query i sits at total - Sq + i.
        res, lse = api.cache_attention(q, k_cache, v_cache, total, block_table=block_table, causal=mask[0],
                                       softmax_scale=softmax_scale, window_left=mask[1], softcap=softcap,
                                       num_splits=num_splits, alibi_slopes=alibi_slopes, return_lse=True)
    else:
        # A mask cache_attention cannot express: packed copy of the cached keys/values, varlen prefill.
        cu_k = _cumulative(total)
        if paged:
            kk = _gather_paged(k_cache, block_table, cu_k)
            vv = _gather_paged(v_cache, block_table, cu_k)
        else:
            lengths = total.tolist()
            kk = torch.cat([k_cache[b, :n] for b, n in enumerate(lengths)])
            vv = torch.cat([v_cache[b, :n] for b, n in enumerate(lengths)])
        if kk.dtype != q.dtype:
            raise NotImplementedError(f"Sq > 1 over a {kk.dtype} cache: only caches in q's dtype are supported here")
        cu_q = torch.arange(0, (B + 1) * sq, sq, dtype=torch.int32, device=device)
        res, lse = api.prefill_attention(q.reshape(B * sq, hq, d), kk, vv, causal=causal, softmax_scale=softmax_scale,
                                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=sq,
                                         max_seqlen_k=int(total.max()) if B else 0, window_size=(left, right),
                                         softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
        res = res.view(B, sq, hq, d)
        lse = lse.view(hq, B, sq).permute(1, 0, 2)
    res = _into(out, res)
    return (res, lse) if return_softmax_lse else res


def _rotary(q, k, cos, sin, seqlens, interleaved, *, per_query, fuse):
    """(q rotated, k to append, whether the append rotates k itself). Positions in row coordinates:
    key i at seqlens[b] + i; query i at seqlens[b] + i (per_query) or seqlens[b]. With a leftpad the
    append's positions (unpadded) are not the row's, so k is rotated here (the same bits)."""
    if cos is None or sin is None:
        raise ValueError("pass both rotary_cos and rotary_sin [max_position, rotary_dim / 2]")
    B, sq = q.shape[:2]
    base = seqlens.long()[:, None]
    q_pos = base + (torch.arange(sq, device=q.device) if per_query else torch.zeros(sq, dtype=torch.long,
                                                                                   device=q.device))
    q = api.apply_rotary(q, cos, sin, q_pos, interleaved=interleaved)
    if fuse:
        return q, k, True
    k_pos = base + torch.arange(k.shape[1], device=k.device)
    return q, api.apply_rotary(k, cos, sin, k_pos, interleaved=interleaved), False


__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
