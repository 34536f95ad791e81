"""Drop-in replacements for FlashAttention 2's inference functions, running on kvkernels.

    from kvkernels.compat.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same signatures, shapes and semantics as flash_attn 2.x (causal masks bottom-right aligned,
window_size=(left, right) with -1 unbounded, softcap, GQA by passing fewer K/V heads, lse in natural
log). Forward only: no dropout, no backward. Arguments we do not implement raise
NotImplementedError naming them (alibi_slopes, rotary_cos/rotary_sin, cache_batch_idx,
cache_leftpad, dropout_p > 0) rather than being ignored.

flash_attn_with_kvcache paths:
  * k/v given: appended in place at cache_seqlens (kvkernels.append_kv; FlashAttention's
    cache_seqlens is the length *before* the append), then attention over cache_seqlens + S_new.
  * Sq == 1 (decode): kvkernels.decode_attention straight on the cache (contiguous or paged),
    no copy; causal and window_size[1] change nothing for a single last-position query.
  * Sq > 1 (chunked prefill, speculative verification): kvkernels.cache_attention straight on the
    cache, no copy: FlashAttention's bottom-right alignment puts query i at position
    total - Sq + i, which is cache_attention's rule. Two cases it cannot express fall back to a
    gathered copy and varlen prefill_attention (lengths read on the host): a window reaching right
    of the diagonal without causal (window_size[1] > 0), and, where the lengths are readable for
    free (CPU tensors), sequences holding fewer keys than queries (FlashAttention's rows that see
    no key); on a GPU those rows see nothing in cache_attention too.

flash_attn_varlen_func(block_table=...) runs cache_attention on the paged cache the same way.
"""

from __future__ import annotations

import torch

from .. import api


def _unsupported(**named):
    used = [name for name, value in named.items() if value is not None and value is not False]
    if used:
        raise NotImplementedError(f"kvkernels.compat.flash_attn does not support {', '.join(used)}")


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
    _unsupported(alibi_slopes=alibi_slopes)
    q, k, v = (_contig_last(x) for x in (q, k, v))
    out, lse = api.prefill_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                     window_size=_window(window_size), softcap=softcap, return_lse=True)
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


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q [Tq, Hq, D]; k/v [Tk, Hkv, D] (or, with block_table [B, max_pages], a paged cache
    [num_pages, page_size, Hkv, D] whose sequence b holds cu_seqlens_k[b+1] - cu_seqlens_k[b] keys);
    cu_seqlens_* int32 [B+1] -> out [Tq, Hq, D] (return_attn_probs: (out, lse [Hq, Tq], None))."""
    _dropout(dropout_p)
    _unsupported(alibi_slopes=alibi_slopes)
    q = _contig_last(q)
    if block_table is not None:
        lengths = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        mask = _cache_causal(causal, _window(window_size))
        if mask is not None and not _fewer_keys_than_queries(lengths, cu_seqlens_q[1:] - cu_seqlens_q[:-1]):
            # The paged cache is attended in place: query i of sequence b sits at L_b - n_b + i.
            out, lse = api.cache_attention(q, k, v, lengths, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=int(max_seqlen_q),
                                           block_table=block_table, causal=mask[0], softmax_scale=softmax_scale,
                                           window_left=mask[1], softcap=softcap, return_lse=True)
            return (out, lse, None) if return_attn_probs else out
        # A mask cache_attention cannot express: gather the pages into the packed layout (a copy).
        k = _gather_paged(k, block_table, cu_seqlens_k)
        v = _gather_paged(v, block_table, cu_seqlens_k)
    k, v = _contig_last(k), _contig_last(v)
    out, lse = api.prefill_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                                     cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
                                     max_seqlen_k=int(max_seqlen_k), window_size=_window(window_size),
                                     softcap=softcap, return_lse=True)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q [B, Sq, Hq, D] over a KV cache, optionally appending k/v [B, S_new, Hkv, D] first.

    k_cache/v_cache: [B, S_max, Hkv, D], or paged [num_pages, page_size, Hkv, D] with block_table
    int32 [B, max_pages]. cache_seqlens: int or int32 [B], the lengths before the append (None:
    the whole cache). Sequence b attends to positions [0, cache_seqlens[b] + S_new); with causal,
    query i sees keys up to i + (cache_seqlens[b] + S_new) - Sq.
    -> out [B, Sq, Hq, D] (+ softmax_lse [B, Hq, Sq] fp32 when return_softmax_lse).
    """
    _unsupported(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx,
                 cache_leftpad=cache_leftpad, alibi_slopes=alibi_slopes)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a tensor [B, Sq, Hq, D], got {getattr(q, 'shape', type(q).__name__)}")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    q = _contig_last(q)
    B, sq, hq, d = q.shape
    device = q.device
    paged = block_table is not None
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when appending k/v (the position to write at)")
        full = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
        cache_seqlens = full
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    if k is not None:
        k, v = _contig_last(k), _contig_last(v)
        api.append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table=block_table)
        total = cache_seqlens + k.shape[1]
    else:
        total = cache_seqlens
    if not isinstance(total, torch.Tensor) or total.dtype != torch.int32:
        raise TypeError("cache_seqlens must be an int or an int32 tensor [B]")
    left, right = _window(window_size)

    if sq == 1:
        out, lse = api.decode_attention(q[:, 0], k_cache, v_cache, total, block_table=block_table,
                                        softmax_scale=softmax_scale, window_left=left, softcap=softcap,
                                        num_splits=num_splits, return_lse=True)
        out, lse = out.unsqueeze(1), lse.unsqueeze(-1)
    elif (mask := _cache_causal(causal, (left, right))) is not None and not _fewer_keys_than_queries(total, sq):
        # Several queries per sequence, on the cache in place: query i sits at total - Sq + i.
        out, lse = api.cache_attention(q, k_cache, v_cache, total, block_table=block_table, causal=mask[0],
                                       softmax_scale=softmax_scale, window_left=mask[1], softcap=softcap,
                                       num_splits=num_splits, return_lse=True)
    else:
        # A mask cache_attention cannot express: packed copy of the cached keys/values, varlen prefill.
        cu_k = torch.zeros(B + 1, dtype=torch.int32, device=device)
        cu_k[1:] = torch.cumsum(total, 0)
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
        out, lse = api.prefill_attention(q.reshape(B * sq, hq, d), kk, vv, causal=causal, softmax_scale=softmax_scale,
                                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=sq,
                                         max_seqlen_k=int(total.max()) if B else 0, window_size=(left, right),
                                         softcap=softcap, return_lse=True)
        out = out.view(B, sq, hq, d)
        lse = lse.view(hq, B, sq).permute(1, 0, 2)
    return (out, lse) if return_softmax_lse else out


__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]
