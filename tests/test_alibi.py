"""ALiBi (FlashAttention's alibi_slopes) in prefill, decode and cache attention, on every backend.

FlashAttention's definition (flash_attn_func's docstring; csrc/flash_attn/src/mask.h, alibi.h): the
score of query i and key j of a sequence with Sq queries and Sk keys gets
    -slope[b, h] * |i + Sk - Sq - j|
added after the softcap and not multiplied by softmax_scale (the kernel divides the slope by the
softmax scale before the scaled exp), with the causal / window masks applied as without it. Decode is
Sq = 1, Sk = cache_seqlens[b]; cache attention's query i sits at p = cache_seqlens[b] - n_b + i.

`independent` below is written from that definition alone (an explicit bias matrix and a masked fp64
softmax, per sequence and head, in the spirit of FlashAttention's tests' attn_bias_from_alibi_slopes);
it is checked once against kvkernels.reference, and the kernels are then held to the parity contract
against kvkernels.reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (HAS_EMULATOR, assert_lse_close, assert_parity, build_paged, kernel_backends, lengths_tensor,
                      poison_contiguous, randn, run_or_skip, seeded)

import kvkernels
from kvkernels import reference
from kvkernels.compat.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *kernel_backends()]
HQ, HKV, D = 4, 2, 64


def independent(q, k, v, slopes, *, scale, causal=False, window=(-1, -1), softcap=0.0, q_pos=None):
    """One sequence: q [Sq, Hq, D], k/v [Sk, Hkv, D], slopes [Hq] -> (out [Sq, Hq, D] fp64, lse [Hq, Sq]).

    q_pos[i]: the key index on query i's diagonal (default i + Sk - Sq, bottom-right aligned). Masks:
    key j visible iff (not causal or j <= q_pos[i]) and left/right window bounds around q_pos[i]."""
    sq, sk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if q_pos is None:
        q_pos = [i + sk - sq for i in range(sq)]
    out = torch.zeros(sq, q.shape[1], q.shape[2], dtype=torch.float64)
    lse = torch.full((q.shape[1], sq), float("-inf"), dtype=torch.float64)
    left, right = window
    for h in range(q.shape[1]):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        for i in range(sq):
            s = (kh @ q[i, h].double()) * scale
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            bias = torch.tensor([-float(slopes[h]) * abs(q_pos[i] - j) for j in range(sk)], dtype=torch.float64)
            s = s + bias
            seen = torch.tensor([(not causal or j <= q_pos[i]) and (left < 0 or j >= q_pos[i] - left)
                                 and (right < 0 or j <= q_pos[i] + right) for j in range(sk)], dtype=torch.bool)
            if not seen.any():
                continue
            s = s.masked_fill(~seen, float("-inf"))
            m = s.max()
            w = torch.exp(s - m)
            out[i, h] = (w[:, None] * vh.masked_fill(~seen[:, None], 0.0)).sum(0) / w.sum()
            lse[h, i] = m + torch.log(w.sum())
    return out, lse


def _slopes(per_batch: bool, batch: int, gen):
    base = torch.tensor([2.0 ** (-8 * (h + 1) / HQ) for h in range(HQ)])  # the ALiBi paper's geometric slopes
    if not per_batch:
        return base
    return base * (torch.rand(batch, 1, generator=gen) * 4 + 0.5)


def test_independent_definition_matches_the_oracle():
    gen = seeded(11)
    sq, sk = 5, 9
    q, k, v = randn(2, sq, HQ, D, gen=gen), randn(2, sk, HKV, D, gen=gen), randn(2, sk, HKV, D, gen=gen)
    slopes = _slopes(True, 2, gen)
    scale = D ** -0.5
    out, lse = reference.prefill_attention(q.double(), k.double(), v.double(), causal=True, softmax_scale=scale,
                                           window_size=(3, -1), softcap=2.0, alibi_slopes=slopes)
    for b in range(2):
        ind, ind_lse = independent(q[b], k[b], v[b], slopes[b], scale=scale, causal=True, window=(3, 0), softcap=2.0)
        torch.testing.assert_close(out[b], ind, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse[b], ind_lse, atol=1e-10, rtol=1e-10)
    # decode: Sq = 1 at position L - 1; cache attention: query i at L - n + i.
    lens = [9, 4]
    qd = randn(2, HQ, D, gen=gen)
    out, lse = reference.decode_attention(qd.double(), k.double(), v.double(), lengths_tensor(lens), softmax_scale=scale,
                                          alibi_slopes=slopes)
    qc = randn(2, 3, HQ, D, gen=gen)
    cout, clse = reference.cache_attention(qc.double(), k.double(), v.double(), lengths_tensor(lens), causal=False,
                                           softmax_scale=scale, window_left=2, alibi_slopes=slopes)
    for b, n in enumerate(lens):
        ind, ind_lse = independent(qd[b, None], k[b, :n], v[b, :n], slopes[b], scale=scale)
        torch.testing.assert_close(out[b], ind[0], atol=1e-10, rtol=1e-10)
        ind, _ = independent(qc[b], k[b, :n], v[b, :n], slopes[b], scale=scale, window=(2, -1))
        torch.testing.assert_close(cout[b], ind, atol=1e-10, rtol=1e-10)
    # The bias matters: without it the answer differs.
    plain = reference.cache_attention(qc.double(), k.double(), v.double(), lengths_tensor(lens), causal=False,
                                      softmax_scale=scale, window_left=2)[0]
    assert (plain - cout).abs().max() > 1e-3


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("varlen,causal,window,softcap,per_batch", [
    (True, True, (-1, -1), 0.0, False),
    (False, False, (6, 3), 5.0, True),
], ids=["varlen-causal-Hq", "dense-window-softcap-BHq"])
def test_prefill(backend, device, varlen, causal, window, softcap, per_batch):
    gen = seeded(12)
    slopes = _slopes(per_batch, 3, gen)
    if varlen:
        lq, lk = [1, 17, 9], [5, 17, 40]
        cu_q = torch.tensor([0, 1, 18, 27], dtype=torch.int32)
        cu_k = torch.tensor([0, 5, 22, 62], dtype=torch.int32)
        q, k, v = randn(27, HQ, D, gen=gen), randn(62, HKV, D, gen=gen), randn(62, HKV, D, gen=gen)
        kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17, max_seqlen_k=40)
    else:
        q, k, v = randn(3, 17, HQ, D, gen=gen), randn(3, 33, HKV, D, gen=gen), randn(3, 33, HKV, D, gen=gen)
        kw = {}
    common = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    ref, ref_lse = reference.prefill_attention(q, k, v, **{**common, **{k_: w for k_, w in kw.items() if "cu" in k_}})
    ref_lp, _ = reference.prefill_attention(q, k, v, upcast=False,
                                            **{**common, **{k_: w for k_, w in kw.items() if "cu" in k_}})
    dev = lambda x: x.to(device)  # noqa: E731
    out, lse = run_or_skip(backend, lambda: kvkernels.prefill_attention(
        dev(q), dev(k), dev(v), **{k_: dev(w) if torch.is_tensor(w) else w for k_, w in kw.items()},
        causal=causal, window_size=window, softcap=softcap, alibi_slopes=dev(slopes), return_lse=True,
        backend=backend))
    assert_parity(out.cpu(), ref, ref_lp)
    assert_lse_close(lse.cpu(), ref_lse)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("page_size,splits,window,softcap,per_batch", [
    (16, 3, -1, 0.0, True),
    (None, 1, 20, 4.0, False),
], ids=["paged16-splits3-BHq", "contiguous-window-softcap-Hq"])
def test_decode(backend, device, page_size, splits, window, softcap, per_batch):
    gen = seeded(13)
    lens = lengths_tensor([1, 17, 47])
    slopes = _slopes(per_batch, 3, gen)
    q = randn(3, HQ, D, gen=gen)
    k, v = randn(3, 50, HKV, D, gen=gen), randn(3, 50, HKV, D, gen=gen)
    kw = dict(window_left=window, softcap=softcap, alibi_slopes=slopes)
    ref, ref_lse = reference.decode_attention(q, k, v, lens, **kw)
    ref_lp, _ = reference.decode_attention(q, k, v, lens, upcast=False, **kw)
    if page_size is None:
        kc, vc, table = poison_contiguous(k, lens), poison_contiguous(v, lens), None
    else:
        kc, table = build_paged(k, lens, page_size, gen=seeded(1))
        vc, _ = build_paged(v, lens, page_size, gen=seeded(1))
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    out, lse = run_or_skip(backend, lambda: kvkernels.decode_attention(
        dev(q), dev(kc), dev(vc), dev(lens), block_table=dev(table), num_splits=splits, return_lse=True,
        backend=backend, **{**kw, "alibi_slopes": dev(slopes)}))
    assert_parity(out.cpu(), ref, ref_lp)
    assert_lse_close(lse.cpu(), ref_lse)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("ragged,causal,window,splits,per_batch", [
    (True, True, 9, 3, True),
    (False, False, -1, 2, False),
], ids=["ragged-paged-causal-window-splits3-BHq", "dense-full-splits2-Hq"])
def test_cache_attention(backend, device, ragged, causal, window, splits, per_batch):
    gen = seeded(14)
    lens = lengths_tensor([7, 17, 40])
    slopes = _slopes(per_batch, 3, gen)
    k, v = randn(3, 42, HKV, D, gen=gen), randn(3, 42, HKV, D, gen=gen)
    if ragged:
        counts = [0, 5, 7]
        cu = torch.tensor([0, 0, 5, 12], dtype=torch.int32)
        q = randn(12, HQ, D, gen=gen)
        kc, table = build_paged(k, lens, 16, gen=seeded(2))
        vc, _ = build_paged(v, lens, 16, gen=seeded(2))
        extra = dict(cu_seqlens_q=cu, max_seqlen_q=max(counts))
    else:
        q = randn(3, 4, HQ, D, gen=gen)
        kc, vc, table, cu, extra = poison_contiguous(k, lens), poison_contiguous(v, lens), None, None, {}
    kw = dict(causal=causal, window_left=window, alibi_slopes=slopes)
    ref, ref_lse = reference.cache_attention(q, k, v, lens, cu_seqlens_q=cu, **kw)
    ref_lp, _ = reference.cache_attention(q, k, v, lens, cu_seqlens_q=cu, upcast=False, **kw)
    dev = lambda x: x.to(device) if torch.is_tensor(x) else x  # noqa: E731
    out, lse = run_or_skip(backend, lambda: kvkernels.cache_attention(
        dev(q), dev(kc), dev(vc), dev(lens), block_table=dev(table), num_splits=splits, return_lse=True,
        backend=backend, **{k_: dev(w) for k_, w in {**kw, **extra}.items()}))
    assert_parity(out.cpu(), ref, ref_lp)
    assert_lse_close(lse.cpu(), ref_lse)


# ------------------------------------------------------------------------------------ drop-in


def _close(out, ind):
    torch.testing.assert_close(out.double(), ind, atol=2e-3, rtol=2e-3)


def test_flash_attn_func_and_varlen():
    gen = seeded(15)
    slopes = _slopes(True, 2, gen)
    q, k, v = randn(2, 7, HQ, D, gen=gen), randn(2, 11, HKV, D, gen=gen), randn(2, 11, HKV, D, gen=gen)
    out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    for b in range(2):
        _close(out[b], independent(q[b], k[b], v[b], slopes[b], scale=D ** -0.5, causal=True)[0])
    # varlen over packed k/v, then over paged k/v with seqused_k (vLLM's form): uneven lengths.
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 16], dtype=torch.int32)
    qv, kv, vv = randn(7, HQ, D, gen=gen), randn(16, HKV, D, gen=gen), randn(16, HKV, D, gen=gen)
    out = flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, 4, 11, causal=True, alibi_slopes=slopes[0])
    for b in range(2):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        _close(out[qs:qe], independent(qv[qs:qe], kv[ks:ke], vv[ks:ke], slopes[0], scale=D ** -0.5, causal=True)[0])
    lens = lengths_tensor([5, 11])
    dense_k = torch.stack([torch.cat([kv[0:5], kv[0:6]]), kv[5:16]])
    dense_v = torch.stack([torch.cat([vv[0:5], vv[0:6]]), vv[5:16]])
    pk, table = build_paged(dense_k, lens, 4, gen=seeded(3))
    pv, _ = build_paged(dense_v, lens, 4, gen=seeded(3))
    out = flash_attn_varlen_func(qv, pk, pv, cu_q, None, 4, 11, causal=True, alibi_slopes=slopes,
                                 block_table=table, seqused_k=lens)
    for b in range(2):
        qs, qe, n = cu_q[b], cu_q[b + 1], int(lens[b])
        _close(out[qs:qe], independent(qv[qs:qe], dense_k[b, :n], dense_v[b, :n], slopes[b], scale=D ** -0.5,
                                       causal=True)[0])


@pytest.mark.parametrize("sq", [1, 3])
def test_flash_attn_with_kvcache_leftpad_append(sq):
    """FlashAttention's key 0 of a left-padded sequence is row position cache_leftpad[b]: the distance
    i + Sk - Sq - j counts unpadded keys, equal to the row positions' difference."""
    gen = seeded(16)
    slopes = _slopes(True, 2, gen)
    k_cache, v_cache = randn(2, 20, HKV, D, gen=gen), randn(2, 20, HKV, D, gen=gen)
    seqlens = torch.tensor([9, 14], dtype=torch.int32)  # row lengths before the append, padding included
    pad = torch.tensor([2, 5], dtype=torch.int32)
    q, k_new, v_new = randn(2, sq, HQ, D, gen=gen), randn(2, 2, HKV, D, gen=gen), randn(2, 2, HKV, D, gen=gen)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = flash_attn_with_kvcache(q, kc, vc, k=k_new, v=v_new, cache_seqlens=seqlens, cache_leftpad=pad,
                                  causal=True, alibi_slopes=slopes)
    for b in range(2):
        end = int(seqlens[b]) + 2
        keys = torch.cat([k_cache[b, int(pad[b]):int(seqlens[b])], k_new[b]])
        vals = torch.cat([v_cache[b, int(pad[b]):int(seqlens[b])], v_new[b]])
        assert torch.equal(kc[b, int(seqlens[b]):end], k_new[b])
        _close(out[b], independent(q[b], keys, vals, slopes[b], scale=D ** -0.5, causal=True)[0])


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("slopes,error,match", [
    (torch.ones(HQ, dtype=torch.float16), TypeError, "alibi_slopes"),
    (torch.ones(HQ + 1), ValueError, r"\[Hq\]"),
    (torch.ones(3, HQ), ValueError, r"\[B, Hq\]"),
    (torch.ones(2, HQ, 1), ValueError, "alibi_slopes"),
    (torch.ones(HQ, 2)[:, 0], ValueError, "contiguous"),
    (torch.ones(HQ, device="meta"), ValueError, "alibi_slopes"),
    ([0.5] * HQ, TypeError, "alibi_slopes"),
])
def test_bad_slopes_rejected_before_launch(slopes, error, match):
    gen = seeded(17)
    q, k = randn(2, 3, HQ, D, gen=gen), randn(2, 5, HKV, D, gen=gen)
    cache = randn(2, 8, HKV, D, gen=gen)
    lens = lengths_tensor([3, 8])
    with pytest.raises(error, match=match):
        kvkernels.prefill_attention(q, k, k, alibi_slopes=slopes)
    with pytest.raises(error, match=match):
        kvkernels.decode_attention(q[:, 0], cache, cache, lens, alibi_slopes=slopes)
    with pytest.raises(error, match=match):
        kvkernels.cache_attention(q, cache, cache, lens, alibi_slopes=slopes)
    with pytest.raises(error, match=match):
        flash_attn_func(q, k, k, alibi_slopes=slopes)


@pytest.mark.skipif(not HAS_EMULATOR, reason="needs the CUDA emulator")
def test_cuda_prefill_declines_alibi_with_softcap_at_d256():
    q = randn(1, 3, 2, 256, gen=seeded(19))
    with pytest.raises(ValueError, match="softcap at head dim 256"):
        kvkernels.prefill_attention(q, q, q, softcap=5.0, alibi_slopes=torch.ones(2), backend="cuda")
    kvkernels.prefill_attention(q, q, q, alibi_slopes=torch.ones(2), backend="cuda")  # without a softcap: taken


def test_sm90_path_declines_alibi():
    from kvkernels.cuda.prefill import PATH_SM80, PATH_SM90, select_path
    needed = {PATH_SM80: 1, PATH_SM90: 1}
    assert select_path((9, 0), "8.0;9.0a", tma_ok=True, smem_optin=1 << 20, smem_needed=needed) == PATH_SM90
    assert select_path((9, 0), "8.0;9.0a", tma_ok=True, smem_optin=1 << 20, smem_needed=needed,
                       alibi=True) == PATH_SM80
    assert select_path((9, 0), "8.0;9.0a", tma_ok=True, smem_optin=1 << 20, smem_needed=needed, alibi=True,
                       forced=PATH_SM90) is None


# ------------------------------------------------------------------------------ torch.library / compile


def test_opcheck_and_compile_with_slopes():
    gen = seeded(18)
    q, kc = randn(2, 4, 16, gen=gen), randn(2, 9, 2, 16, gen=gen)
    lens = lengths_tensor([3, 9])
    slopes = torch.rand(2, 4, generator=gen)
    utils = ("test_faketensor", "test_aot_dispatch_dynamic", "test_schema")
    torch.library.opcheck(torch.ops.kvkernels.decode_attention.default,
                          (q, kc, kc, lens, None, 0.25, -1, 0.0, None, None, 0, False, "reference", slopes),
                          test_utils=utils)
    qp, kp = randn(2, 5, 4, 16, gen=gen), randn(2, 6, 2, 16, gen=gen)
    torch.library.opcheck(torch.ops.kvkernels.prefill_attention.default,
                          (qp, kp, kp, None, None, 5, 6, 0.25, -1, 0, 0.0, "reference", slopes), test_utils=utils)
    torch.library.opcheck(torch.ops.kvkernels.cache_attention.default,
                          (qp, randn(2, 9, 2, 16, gen=gen), randn(2, 9, 2, 16, gen=gen), lengths_tensor([5, 9]),
                           None, 5, None, True, 0.25, -1, 0.0, None, None, 0, False, "reference", slopes),
                          test_utils=utils)
    f = torch.compile(lambda q, k, s: kvkernels.prefill_attention(q, k, k, causal=True, alibi_slopes=s,
                                                                  return_lse=True), fullgraph=True)
    out, lse = f(qp, kp, slopes[0])
    ref_out, ref_lse = kvkernels.prefill_attention(qp, kp, kp, causal=True, alibi_slopes=slopes[0], return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
