"""kvkernels.compat.flash_attn: FlashAttention 2's signatures and semantics on kvkernels.

flash_attn_with_kvcache: the new k/v land in the cache at cache_seqlens (bit-exact, nothing else
written, cache_seqlens untouched); attention covers cache_seqlens + S_new positions with
FlashAttention's bottom-right causal alignment and window; contiguous and paged caches; Sq = 1
(decode) and Sq > 1 (gathered varlen prefill); lse [B, Hq, Sq]. Unsupported arguments are refused
by name.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_lse_close, assert_parity, build_paged, poison_contiguous, randn, reference, seeded
from kvkernels.compat.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

HQ, HKV, D = 4, 2, 32


def oracle(q, k, v, *, causal, window=(-1, -1), softcap=0.0, upcast=True):
    """Per sequence: q [Sq, Hq, D] against k/v [L, Hkv, D]."""
    out, lse = reference.prefill_attention(q[None], k[None], v[None], causal=causal, window_size=window,
                                           softcap=softcap, upcast=upcast)
    return out[0], lse[0]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("sq,s_new", [(1, 1), (1, 0), (3, 3), (5, 2)])
@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (-1, -1), 0.0),
                                                   (True, (4, 0), 0.0), (True, (-1, -1), 5.0)])
def test_with_kvcache_matches_oracle(paged, sq, s_new, causal, window, softcap):
    gen = seeded(0)
    dtype = torch.float16
    B, S_max, page_size = 3, 40, 8
    lens = torch.tensor([0, 17, 31], dtype=torch.int32) if sq <= s_new else torch.tensor([5, 17, 31], dtype=torch.int32)
    dense_k = randn(B, S_max, HKV, D, dtype=dtype, gen=gen)
    dense_v = randn(B, S_max, HKV, D, dtype=dtype, gen=gen)
    q = randn(B, sq, HQ, D, dtype=dtype, gen=gen)
    k_new = randn(B, s_new, HKV, D, dtype=dtype, gen=gen) if s_new else None
    v_new = randn(B, s_new, HKV, D, dtype=dtype, gen=gen) if s_new else None
    if paged:
        # K and V share one page assignment: scatter them together, then split the heads.
        both, table = build_paged(torch.cat([dense_k, dense_v], dim=2), lens + s_new, page_size, gen=gen)
        k_cache, v_cache = both[:, :, :HKV], both[:, :, HKV:]
    else:
        k_cache = poison_contiguous(dense_k.clone(), lens)
        v_cache = poison_contiguous(dense_v.clone(), lens)
        table = None
    before_k = k_cache.clone()
    seqlens = lens.clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                       block_table=table, causal=causal, window_size=window, softcap=softcap,
                                       return_softmax_lse=True)
    assert torch.equal(seqlens, lens), "cache_seqlens must not be modified"
    assert out.shape == (B, sq, HQ, D) and lse.shape == (B, HQ, sq)
    for b in range(B):
        L = int(lens[b])
        kb, vb = dense_k[b, : L + s_new].clone(), dense_v[b, : L + s_new].clone()
        if s_new:
            kb[L:], vb[L:] = k_new[b], v_new[b]
        ref, ref_lse = oracle(q[b], kb, vb, causal=causal, window=window, softcap=softcap)
        ref_lp, _ = oracle(q[b], kb, vb, causal=causal, window=window, softcap=softcap, upcast=False)
        assert_parity(out[b], ref, ref_lp)
        assert_lse_close(lse[b], ref_lse)
    if s_new:  # the append: bit-exact, and only the new slots changed
        expect = before_k.clone()
        for b in range(B):
            L = int(lens[b])
            for i in range(s_new):
                pos = L + i
                if paged:
                    expect[table[b, pos // page_size], pos % page_size] = k_new[b, i]
                else:
                    expect[b, pos] = k_new[b, i]
        assert torch.equal(k_cache.view(torch.int16), expect.view(torch.int16))
    else:
        assert torch.equal(k_cache.view(torch.int16), before_k.view(torch.int16))


def test_with_kvcache_int_seqlens_and_whole_cache():
    gen = seeded(1)
    k_cache = randn(2, 9, HKV, D, gen=gen)
    v_cache = randn(2, 9, HKV, D, gen=gen)
    q = randn(2, 1, HQ, D, gen=gen)
    whole = flash_attn_with_kvcache(q, k_cache, v_cache)          # cache_seqlens None: every position
    as_int = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=9)
    ref = torch.stack([oracle(q[b], k_cache[b], v_cache[b], causal=False)[0] for b in range(2)])
    assert torch.equal(whole, as_int)
    torch.testing.assert_close(whole.float(), ref.float(), atol=2e-3, rtol=2e-3)


def test_with_kvcache_needs_seqlens_to_append():
    q = torch.randn(1, 1, HQ, D, dtype=torch.float16)
    cache = torch.randn(1, 8, HKV, D, dtype=torch.float16)
    new = torch.randn(1, 1, HKV, D, dtype=torch.float16)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, cache, cache.clone(), k=new, v=new)
    with pytest.raises(ValueError, match="both"):
        flash_attn_with_kvcache(q, cache, cache.clone(), k=new, cache_seqlens=2)


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (3, 2))])
def test_flash_attn_func(causal, window):
    gen = seeded(2)
    q = randn(2, 7, HQ, D, gen=gen)
    k = randn(2, 11, HKV, D, gen=gen)
    v = randn(2, 11, HKV, D, gen=gen)
    out, lse, probs = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    assert probs is None
    for b in range(2):
        ref, ref_lse = oracle(q[b], k[b], v[b], causal=causal, window=window)
        assert_parity(out[b], ref, oracle(q[b], k[b], v[b], causal=causal, window=window, upcast=False)[0])
        assert_lse_close(lse[b], ref_lse)
    assert torch.equal(flash_attn_func(q, k, v, causal=causal, window_size=window), out)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
def test_flash_attn_varlen_func(paged):
    gen = seeded(3)
    lk = [5, 9, 6]
    cu_q = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 14, 20], dtype=torch.int32)
    q = randn(10, HQ, D, gen=gen)
    k = randn(20, HKV, D, gen=gen)
    v = randn(20, HKV, D, gen=gen)
    if paged:
        dense_k = torch.zeros(3, 9, HKV, D, dtype=k.dtype)
        dense_v = torch.zeros_like(dense_k)
        for b in range(3):
            dense_k[b, : lk[b]] = k[cu_k[b]:cu_k[b + 1]]
            dense_v[b, : lk[b]] = v[cu_k[b]:cu_k[b + 1]]
        kk, table = build_paged(dense_k, torch.tensor(lk), 4, gen=seeded(9))
        vv, _ = build_paged(dense_v, torch.tensor(lk), 4, gen=seeded(9))
        out, lse, _ = flash_attn_varlen_func(q, kk, vv, cu_q, cu_k, 6, 9, causal=True, block_table=table,
                                             return_attn_probs=True)
    else:
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 9, causal=True, return_attn_probs=True)
    assert lse.shape == (HQ, 10)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref, ref_lse = oracle(q[qs], k[ks], v[ks], causal=True)
        assert_parity(out[qs], ref, oracle(q[qs], k[ks], v[ks], causal=True, upcast=False)[0])
        assert_lse_close(lse[:, qs], ref_lse)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
def test_several_queries_attend_the_cache_in_place_without_a_copy(monkeypatch, backend, fp8):
    # Sq > 1 over a paged cache (speculative verification) and varlen over pages (chunked prefill)
    # run cache_attention on the cache itself: the gather-and-copy fallback must not be called.
    import kvkernels.compat.flash_attn as fa
    monkeypatch.setenv("KVKERNELS_BACKEND", backend)
    monkeypatch.setattr(fa, "_gather_paged", lambda *a: pytest.fail("the paged cache was copied"))
    gen = seeded(4)
    B, S_max, page_size, sq = 2, 30, 8, 4
    lens = torch.tensor([9, 22], dtype=torch.int32)
    dense_k = randn(B, S_max, HKV, D, gen=gen)
    dense_v = randn(B, S_max, HKV, D, gen=gen)
    if fp8:
        dense_k, dense_v = dense_k.to(torch.float8_e4m3fn), dense_v.to(torch.float8_e4m3fn)
    k_cache, table = build_paged(dense_k, lens, page_size, gen=seeded(5))
    v_cache, _ = build_paged(dense_v, lens, page_size, gen=seeded(5))
    q = randn(B, sq, HQ, D, gen=gen)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table, causal=True)
    cu_q = torch.tensor([0, sq, 2 * sq], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 31], dtype=torch.int32)
    varlen = flash_attn_varlen_func(q.reshape(B * sq, HQ, D), k_cache, v_cache, cu_q, cu_k, sq, 22, causal=True,
                                    block_table=table)
    for b in range(B):
        L = int(lens[b])
        kb, vb = dense_k[b, :L].to(q.dtype), dense_v[b, :L].to(q.dtype)
        ref, _ = oracle(q[b], kb, vb, causal=True)
        ref_lp, _ = oracle(q[b], kb, vb, causal=True, upcast=False)
        assert_parity(out[b], ref, ref_lp)
        assert_parity(varlen[b * sq:(b + 1) * sq], ref, ref_lp)
