"""Drop-in completeness of kvkernels.compat.flash_attn and vLLM's cache conventions.

Each argument against an independent oracle written here (gather the rows the semantics name,
softmax attention in fp32; the same math in fp16 gives the low-precision error of the parity
criterion), on the reference, the Triton interpreter and the CUDA emulator:

  flash_attn_with_kvcache  cache_batch_idx (sequence b reads and writes row cache_batch_idx[b]),
                           cache_leftpad (keys from position leftpad[b]; cache_seqlens counts the
                           padding; new k/v at cache_seqlens[b] + i; causal alignment on the
                           unpadded keys), out=
  flash_attn_varlen_func   seqused_k (first seqused_k[b] keys of each span; paged: the lengths), out=
  packed functions         qkv [B, S, 3, H, D], kv [B, Sk, 2, Hkv, D] and their varlen forms, as views
  vLLM caches              k_scale/v_scale with 16-bit caches (value = stored * scale; 1.0 changes no bit),
                           kv_cache_dtype "fp8"/"fp8_e4m3"/"fp8_e5m2" on uint8 storage (views: appends land
                           in the caller's tensor), mixed fp8 formats refused by name

Bad values raise before anything is written: the caches stay bit-identical.
"""

from __future__ import annotations

import pytest
import torch

import kvkernels
from conftest import (assert_lse_close, assert_parity, build_paged, kernel_backends, randn, run_or_skip, seeded)
from kvkernels import api
from kvkernels.compat import flash_attn as fa

HQ, HKV, D = 4, 2, 64
FP16 = torch.float16


def backends():
    return [pytest.param("reference", "cpu", id="reference")] + kernel_backends()


@pytest.fixture
def use_backend(monkeypatch):
    def set_(name):
        monkeypatch.setenv("KVKERNELS_BACKEND", name)
    return set_


def naive(q, k, v, *, causal, window=(-1, -1), dtype=torch.float32):
    """q [Sq, Hq, D] against k/v [L, Hkv, D], in `dtype`, FlashAttention's bottom-right alignment:
    query i sees key j iff j <= i + L - Sq (causal) and j >= i + L - Sq - window[0] (window[0] >= 0).
    -> out [Sq, Hq, D] (fp32), lse [Hq, Sq] fp32 (-inf, out 0 where nothing is seen)."""
    sq, hq, d = q.shape
    length, hkv = k.shape[:2]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (d ** -0.5)
    diag = torch.arange(sq)[:, None] + length - sq
    j = torch.arange(length)[None, :]
    allowed = torch.ones(sq, length, dtype=torch.bool)
    if causal:
        allowed &= j <= diag
    if window[0] >= 0:
        allowed &= j >= diag - window[0]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores.float(), -1)
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v).float(), lse


def check_attention(out, lse, q, keys, values, *, causal, window=(-1, -1)):
    """out [Sq, Hq, D], lse [Hq, Sq] of one sequence against its keys/values [L, Hkv, D]."""
    ref, ref_lse = naive(q, keys, values, causal=causal, window=window)
    ref_lp, _ = naive(q, keys, values, causal=causal, window=window, dtype=q.dtype)
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)


# ----------------------------------------------------------------------------------- rotary


def rope(x, cos, sin, positions, interleaved):
    """FlashAttention's rotary of x [..., H, D] at positions [...] in fp32: pairs (2j, 2j+1) when
    interleaved, else (j, j + rotary_dim/2); dims past rotary_dim unchanged."""
    half = cos.shape[1]
    c, s = cos.float()[positions].unsqueeze(-2), sin.float()[positions].unsqueeze(-2)
    y = x.float().clone()
    i1, i2 = (slice(0, 2 * half, 2), slice(1, 2 * half, 2)) if interleaved else (slice(0, half), slice(half, 2 * half))
    x1, x2 = y[..., i1].clone(), y[..., i2].clone()
    y[..., i1], y[..., i2] = x1 * c - x2 * s, x2 * c + x1 * s
    return y


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
@pytest.mark.parametrize("causal,leftpad", [(True, None), (False, None), (True, [3, 0])],
                         ids=["causal", "noncausal", "causal-leftpad"])
def test_with_kvcache_rotary_positions_are_flash_attentions(backend, device, interleaved, causal, leftpad,
                                                            use_backend):
    use_backend(backend)
    gen = seeded(11)
    B, S_max, s_new, sq, rd = 2, 24, 3, 3, 32
    seqlens = torch.tensor([7, 12], dtype=torch.int32)  # row coordinates, padding included
    angles = torch.arange(64)[:, None] * (10000.0 ** (-torch.arange(0, rd, 2) / rd))[None, :]
    cos, sin = angles.cos().to(FP16), angles.sin().to(FP16)
    k_cache, v_cache = randn(B, S_max, HKV, D, gen=gen), randn(B, S_max, HKV, D, gen=gen)
    q, k, v = randn(B, sq, HQ, D, gen=gen), randn(B, s_new, HKV, D, gen=gen), randn(B, s_new, HKV, D, gen=gen)
    kc, vc = k_cache.clone(), v_cache.clone()
    pad = None if leftpad is None else torch.tensor(leftpad, dtype=torch.int32)
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                         cache_leftpad=pad, causal=causal, rotary_interleaved=interleaved,
                                         return_softmax_lse=True)
    for b in range(B):
        start, end = int(seqlens[b]), int(seqlens[b]) + s_new
        k_pos = torch.arange(start, end)
        want = rope(k[b], cos, sin, k_pos, interleaved)
        torch.testing.assert_close(kc[b, start:end].float(), want, atol=2e-3, rtol=2e-3)
        # bit for bit the public apply_rotary's rounding of the same rotation
        assert torch.equal(kc[b, start:end], kvkernels.apply_rotary(k[b], cos, sin, k_pos, interleaved=interleaved))
        assert torch.equal(vc[b, start:end], v[b])
        assert torch.equal(kc[b, :start], k_cache[b, :start]) and torch.equal(kc[b, end:], k_cache[b, end:])
        q_pos = start + (torch.arange(sq) if causal else torch.zeros(sq, dtype=torch.long))
        q_rot = rope(q[b], cos, sin, q_pos, interleaved).to(FP16)
        first = 0 if leftpad is None else leftpad[b]
        check_attention(out[b], lse[b], q_rot, kc[b, first:end], vc[b, first:end], causal=causal)


def test_with_kvcache_rotary_needs_new_keys_and_both_tables():
    q = torch.randn(1, 1, HQ, D, dtype=FP16)
    cache = torch.randn(1, 8, HKV, D, dtype=FP16)
    new = torch.randn(1, 1, HKV, D, dtype=FP16)
    table = torch.zeros(16, 8, dtype=FP16)
    with pytest.raises(ValueError, match="pass k and v"):
        fa.flash_attn_with_kvcache(q, cache, cache.clone(), rotary_cos=table, rotary_sin=table, cache_seqlens=4)
    before = cache.clone()
    with pytest.raises(ValueError, match="rotary_cos and rotary_sin"):
        fa.flash_attn_with_kvcache(q, cache, cache.clone(), k=new, v=new, rotary_cos=table, cache_seqlens=4)
    assert torch.equal(cache, before)


# ------------------------------------------------------------------ cache_batch_idx / cache_leftpad


ROW_CASES = {
    # name: (B_cache, S_max, cache_batch_idx, cache_leftpad, cache_seqlens (from the row start))
    "batch_idx": (4, 40, [2, 0, 3], None, [17, 5, 30]),
    "batch_idx, S_max > 256": (3, 520, [1, 2, 0], None, [300, 7, 261]),
    "leftpad": (3, 40, None, [0, 6, 13], [9, 20, 31]),
    "batch_idx + leftpad": (5, 40, [4, 1, 2], [3, 0, 11], [8, 12, 30]),
}


STEPS = [(1, 1, True), (1, 0, False), (3, 3, True), (4, 2, True)]  # (Sq, S_new, causal)
ROW_GRID = [(case, *step) for case in ROW_CASES for step in STEPS
            if case != "batch_idx, S_max > 256" or step == STEPS[0]]  # one decode step covers the multi-page view


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("case,sq,s_new,causal", ROW_GRID)
def test_with_kvcache_rows_and_leftpad_match_the_positions_they_name(backend, device, case, sq, s_new, causal,
                                                                      use_backend):
    use_backend(backend)
    gen = seeded(7)
    b_cache, s_max, idx, pad, seqlens = ROW_CASES[case]
    B = len(seqlens)
    rows = idx if idx is not None else list(range(B))
    pads = pad if pad is not None else [0] * B
    k_cache = torch.full((b_cache, s_max, HKV, D), float("nan"), dtype=FP16)
    v_cache = k_cache.clone()
    for b in range(B):  # only [leftpad, cache_seqlens) of the named rows holds data; the rest is NaN
        k_cache[rows[b], pads[b]:seqlens[b]] = randn(seqlens[b] - pads[b], HKV, D, gen=gen)
        v_cache[rows[b], pads[b]:seqlens[b]] = randn(seqlens[b] - pads[b], HKV, D, gen=gen)
    q = randn(B, sq, HQ, D, gen=gen)
    k_new = randn(B, s_new, HKV, D, gen=gen) if s_new else None
    v_new = randn(B, s_new, HKV, D, gen=gen) if s_new else None
    before_k, before_v = k_cache.clone(), v_cache.clone()
    to = (lambda x: None if x is None else x.to(device))
    lens = torch.tensor(seqlens, dtype=torch.int32)
    args = dict(cache_seqlens=lens.to(device), causal=causal, return_softmax_lse=True,
                cache_batch_idx=to(None if idx is None else torch.tensor(idx, dtype=torch.int32)),
                cache_leftpad=to(None if pad is None else torch.tensor(pad, dtype=torch.int32)))
    kc, vc = k_cache.to(device), v_cache.to(device)
    out, lse = run_or_skip(backend, lambda: fa.flash_attn_with_kvcache(q.to(device), kc, vc, k=to(k_new),
                                                                      v=to(v_new), **args))
    assert torch.equal(args["cache_seqlens"].cpu(), lens), "cache_seqlens must not be modified"
    assert out.shape == (B, sq, HQ, D) and lse.shape == (B, HQ, sq)
    expect_k, expect_v = before_k.clone(), before_v.clone()
    for b in range(B):
        r, lo, hi = rows[b], pads[b], seqlens[b]
        if s_new:
            expect_k[r, hi:hi + s_new], expect_v[r, hi:hi + s_new] = k_new[b], v_new[b]
        check_attention(out[b].cpu(), lse[b].cpu(), q[b], expect_k[r, lo:hi + s_new], expect_v[r, lo:hi + s_new],
                        causal=causal)
    # The append: bit-exact at cache_seqlens[b] + i of row cache_batch_idx[b]; nothing else written.
    assert torch.equal(kc.cpu().view(torch.int16), expect_k.view(torch.int16))
    assert torch.equal(vc.cpu().view(torch.int16), expect_v.view(torch.int16))


def test_with_kvcache_window_on_a_padded_row_counts_from_the_first_real_key():
    gen = seeded(8)
    k_cache, v_cache = randn(2, 24, HKV, D, gen=gen), randn(2, 24, HKV, D, gen=gen)
    q = randn(2, 3, HQ, D, gen=gen)
    pad, lens = torch.tensor([5, 0], dtype=torch.int32), torch.tensor([20, 11], dtype=torch.int32)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, cache_leftpad=pad, causal=True,
                                     window_size=(4, 0))
    for b in range(2):
        ref, _ = naive(q[b], k_cache[b, pad[b]:lens[b]], v_cache[b, pad[b]:lens[b]], causal=True, window=(4, 0))
        ref_lp, _ = naive(q[b], k_cache[b, pad[b]:lens[b]], v_cache[b, pad[b]:lens[b]], causal=True, window=(4, 0),
                          dtype=FP16)
        assert_parity(out[b], ref, ref_lp)


def test_with_kvcache_repeated_rows_may_be_read():
    # Reading one row for two sequences is fine (no write): both see the same keys.
    gen = seeded(9)
    k_cache, v_cache = randn(2, 16, HKV, D, gen=gen), randn(2, 16, HKV, D, gen=gen)
    q = randn(1, 1, HQ, D, gen=gen).expand(3, 1, HQ, D).contiguous()
    idx = torch.tensor([1, 1, 0], dtype=torch.int32)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=9, cache_batch_idx=idx)
    assert torch.equal(out[0], out[1])
    ref, _ = naive(q[2], k_cache[0, :9], v_cache[0, :9], causal=False)
    torch.testing.assert_close(out[2].float(), ref, atol=2e-3, rtol=2e-3)


def _kvcache_args(**over):
    gen = seeded(10)
    args = dict(q=randn(2, 1, HQ, D, gen=gen), k_cache=randn(3, 16, HKV, D, gen=gen),
                v_cache=randn(3, 16, HKV, D, gen=gen), k=randn(2, 1, HKV, D, gen=gen), v=randn(2, 1, HKV, D, gen=gen),
                cache_seqlens=torch.tensor([4, 9], dtype=torch.int32))
    args.update(over)
    return args


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


KVCACHE_BAD = {
    "batch_idx out of range": (dict(cache_batch_idx=_i32(0, 3)), ValueError, r"cache_batch_idx\[1\] = 3"),
    "batch_idx negative": (dict(cache_batch_idx=_i32(-1, 0)), ValueError, r"cache_batch_idx\[0\] = -1"),
    "batch_idx repeated while appending": (dict(cache_batch_idx=_i32(2, 2)), ValueError, "repeats row 2"),
    "batch_idx dtype": (dict(cache_batch_idx=torch.tensor([0, 1])), TypeError, "cache_batch_idx must have dtype int32"),
    "batch_idx shape": (dict(cache_batch_idx=_i32(0, 1, 2)), ValueError, r"cache_batch_idx must have shape \[2\]"),
    "batch_idx with a paged cache": (dict(cache_batch_idx=_i32(0, 1), block_table=_i32(0, 1).view(2, 1)),
                                     ValueError, "cache_batch_idx selects rows of a contiguous cache"),
    "leftpad past the length": (dict(cache_leftpad=_i32(5, 0)), ValueError, r"cache_leftpad\[0\] = 5 is past"),
    "leftpad negative": (dict(cache_leftpad=_i32(0, -2)), ValueError, r"cache_leftpad\[1\] = -2"),
    "leftpad with a paged cache": (dict(cache_leftpad=_i32(0, 0), block_table=_i32(0, 1).view(2, 1)),
                                   ValueError, "cache_leftpad is for a contiguous cache"),
    "append past the row with leftpad": (dict(cache_leftpad=_i32(1, 2), cache_seqlens=_i32(4, 16)), ValueError,
                                         "runs past the cache row's 16 positions"),
    "out shape": (dict(out=torch.empty(2, 1, HQ, D + 1, dtype=FP16)), ValueError, r"out must have shape \[2, 1, 4, 64\]"),
    "out dtype": (dict(out=torch.empty(2, 1, HQ, D)), TypeError, "out must have q's dtype float16"),
    "out not a tensor": (dict(out=[0.0]), TypeError, "out must be a torch.Tensor"),
    # the attention's own checks run before the append writes anything
    "softcap negative": (dict(softcap=-1.0), ValueError, "softcap"),
    "window below -1": (dict(window_size=(-2, 0)), ValueError, r"window_size\[0\]"),
    "q dtype unlike the cache": (dict(q=randn(2, 1, HQ, D, dtype=torch.bfloat16)), TypeError, "q's dtype"),
}


@pytest.mark.parametrize("case", list(KVCACHE_BAD))
def test_with_kvcache_rejects_bad_rows_and_leaves_caches_untouched(case):
    over, exc, match = KVCACHE_BAD[case]
    args = _kvcache_args(**over)
    if "block_table" in over:  # a paged cache of 16-row pages
        args["k_cache"], args["v_cache"] = args["k_cache"][:2], args["v_cache"][:2]
    before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(exc, match=match):
        fa.flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"].view(torch.int16), before[0].view(torch.int16))
    assert torch.equal(args["v_cache"].view(torch.int16), before[1].view(torch.int16))


class _NoKernel:
    """A backend that launches nothing: what remains is the path from the public call to the kernels."""

    @staticmethod
    def unsupported(op, **kw):
        return None

    @staticmethod
    def append_kv(*args):
        return None

    @staticmethod
    def decode_attention(q, *args):
        return torch.zeros_like(q), q.new_zeros(q.shape[:2], dtype=torch.float32)


def test_with_kvcache_rows_build_no_host_values(monkeypatch):
    # The block table of the row view is made on the device from the index tensors: no .tolist()/.item()
    # between the call and the kernels (a sync on a GPU, and a break in CUDA-graph capture).
    args = _kvcache_args(cache_batch_idx=_i32(2, 0), cache_leftpad=_i32(1, 3))
    monkeypatch.setattr(api.V, "values_checkable", lambda *t: False)  # as for device tensors
    monkeypatch.setattr(api, "get_backend", lambda name: _NoKernel)
    for name in ("tolist", "item", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name: pytest.fail(f"Tensor.{_n} on the main path"))
    out = fa.flash_attn_with_kvcache(**args)
    assert out.shape == args["q"].shape


# ------------------------------------------------------------------------------------------- out=


@pytest.mark.parametrize("backend,device", backends())
def test_out_receives_the_result(backend, device, use_backend):
    use_backend(backend)
    gen = seeded(11)
    q = randn(2, 3, HQ, D, gen=gen, device=device)
    k_cache, v_cache = randn(2, 20, HKV, D, gen=gen, device=device), randn(2, 20, HKV, D, gen=gen, device=device)
    lens = torch.tensor([9, 17], dtype=torch.int32, device=device)
    plain = run_or_skip(backend, lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                                                    causal=True))
    dest = torch.full_like(q, float("nan"))
    got, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True, out=dest,
                                         return_softmax_lse=True)
    assert got is dest and torch.equal(dest, plain) and lse.shape == (2, HQ, 3)
    cu_q, cu_k = _i32(0, 3, 6), _i32(0, 9, 26)
    qv = q.reshape(6, HQ, D)
    kv = torch.cat([k_cache[0, :9], k_cache[1, :17]]), torch.cat([v_cache[0, :9], v_cache[1, :17]])
    plain = run_or_skip(backend, lambda: fa.flash_attn_varlen_func(qv, *kv, cu_q.to(device), cu_k.to(device), 3, 17,
                                                                   causal=True))
    dest = torch.full_like(qv, float("nan"))
    got = fa.flash_attn_varlen_func(qv, *kv, cu_q.to(device), cu_k.to(device), 3, 17, causal=True, out=dest)
    assert got is dest and torch.equal(dest, plain)
    with pytest.raises(ValueError, match=r"out must have shape \[6, 4, 64\]"):
        fa.flash_attn_varlen_func(qv, *kv, cu_q.to(device), cu_k.to(device), 3, 17, out=dest[:5])


# ------------------------------------------------------------------------------------------ seqused_k


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_seqused_k_uses_the_first_keys_of_each_span(backend, device, paged, causal, use_backend):
    use_backend(backend)
    gen = seeded(12)
    spans, used, nq = [9, 20, 6], [5, 20, 0], [3, 4, 2]
    cu_k = _i32(0, *torch.tensor(spans).cumsum(0).tolist())
    cu_q = _i32(0, *torch.tensor(nq).cumsum(0).tolist())
    k, v = randn(sum(spans), HKV, D, gen=gen), randn(sum(spans), HKV, D, gen=gen)
    for b in range(3):  # keys past seqused_k[b] must never be read
        k[cu_k[b] + used[b]:cu_k[b + 1]] = float("nan")
        v[cu_k[b] + used[b]:cu_k[b + 1]] = float("nan")
    q = randn(sum(nq), HQ, D, gen=gen)
    seqused = _i32(*used)
    if paged:
        dense_k, dense_v = torch.zeros(3, 20, HKV, D, dtype=FP16), torch.zeros(3, 20, HKV, D, dtype=FP16)
        for b in range(3):
            dense_k[b, :used[b]], dense_v[b, :used[b]] = k[cu_k[b]:cu_k[b] + used[b]], v[cu_k[b]:cu_k[b] + used[b]]
        kk, table = build_paged(dense_k, seqused, 8, gen=seeded(13))
        vv, _ = build_paged(dense_v, seqused, 8, gen=seeded(13))
        call = lambda: fa.flash_attn_varlen_func(q.to(device), kk.to(device), vv.to(device), cu_q.to(device), None,
                                                 4, 20, causal=causal, block_table=table.to(device),
                                                 seqused_k=seqused.to(device), return_attn_probs=True)
    else:
        call = lambda: fa.flash_attn_varlen_func(q.to(device), k.to(device), v.to(device), cu_q.to(device),
                                                 cu_k.to(device), 4, 20, causal=causal, seqused_k=seqused.to(device),
                                                 return_attn_probs=True)
    out, lse, _ = run_or_skip(backend, call)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b] + used[b])
        check_attention(out[qs].cpu(), lse[:, qs].cpu(), q[qs], k[ks], v[ks], causal=causal)


def test_varlen_seqused_k_rejects_more_keys_than_the_span():
    q = randn(2, HQ, D)
    k = randn(5, HKV, D)
    with pytest.raises(ValueError, match=r"seqused_k\[1\] = 4 is more than sequence 1's 3 keys"):
        fa.flash_attn_varlen_func(q, k, k, _i32(0, 1, 2), _i32(0, 2, 5), 1, 3, seqused_k=_i32(1, 4))
    with pytest.raises(ValueError, match=r"seqused_k must have shape \[2\]"):
        fa.flash_attn_varlen_func(q, k, k, _i32(0, 1, 2), _i32(0, 2, 5), 1, 3, seqused_k=_i32(1))


# ------------------------------------------------------------------------------------ packed layouts


def _spy_prefill(monkeypatch, storage):
    """Assert that prefill_attention gets views of the packed tensor (no copy)."""
    real = api.prefill_attention

    def spy(q, k, v, **kw):
        for x in (q, k, v) if storage.get("qkv") else (k, v):
            assert x.untyped_storage().data_ptr() == storage["ptr"], "the packed tensor was copied"
        return real(q, k, v, **kw)
    monkeypatch.setattr(fa.api, "prefill_attention", spy)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("layout", ["qkv", "kv", "varlen qkv", "varlen kv"])
def test_packed_functions_read_strided_views(backend, device, layout, use_backend, monkeypatch):
    use_backend(backend)
    gen = seeded(14)
    B, S = 2, 17
    if layout.endswith("qkv"):
        packed = randn(B, S, 3, HQ, D, gen=gen, device=device)
        q, k, v = packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]
    else:
        packed = randn(B, S, 2, HKV, D, gen=gen, device=device)
        q, (k, v) = randn(B, 5, HQ, D, gen=gen, device=device), (packed[:, :, 0], packed[:, :, 1])
    _spy_prefill(monkeypatch, {"ptr": packed.untyped_storage().data_ptr(), "qkv": layout.endswith("qkv")})
    if layout == "qkv":
        out, lse, _ = run_or_skip(backend, lambda: fa.flash_attn_qkvpacked_func(packed, causal=True,
                                                                                return_attn_probs=True))
    elif layout == "kv":
        out, lse, _ = run_or_skip(backend, lambda: fa.flash_attn_kvpacked_func(q, packed, causal=True,
                                                                               return_attn_probs=True))
    else:
        sq = q.shape[1]
        cu_q = _i32(0, sq, 2 * sq).to(device)
        cu_k = _i32(0, S, 2 * S).to(device)
        if layout == "varlen qkv":
            out, lse, _ = run_or_skip(backend, lambda: fa.flash_attn_varlen_qkvpacked_func(
                packed.flatten(0, 1), cu_k, S, causal=True, return_attn_probs=True))
        else:
            out, lse, _ = run_or_skip(backend, lambda: fa.flash_attn_varlen_kvpacked_func(
                q.flatten(0, 1), packed.flatten(0, 1), cu_q, cu_k, sq, S, causal=True, return_attn_probs=True))
        out, lse = out.view(B, sq, HQ, D), lse.view(HQ, B, sq).permute(1, 0, 2)
    for b in range(B):
        check_attention(out[b].cpu(), lse[b].cpu(), q[b].cpu(), k[b].cpu(), v[b].cpu(), causal=True)


def test_packed_functions_refuse_bad_shapes_and_dropout():
    with pytest.raises(ValueError, match=r"qkv must be a tensor \[B, S, 3, H, D\]"):
        fa.flash_attn_qkvpacked_func(randn(2, 5, 2, HQ, D))
    with pytest.raises(ValueError, match=r"kv must be a tensor \[Tk, 2, Hkv, D\]"):
        fa.flash_attn_varlen_kvpacked_func(randn(5, HQ, D), randn(5, HKV, D), _i32(0, 5), _i32(0, 5), 5, 5)
    with pytest.raises(NotImplementedError, match="dropout"):
        fa.flash_attn_kvpacked_func(randn(2, 5, HQ, D), randn(2, 5, 2, HKV, D), dropout_p=0.1)


# ------------------------------------------------------------------------- scales on 16-bit caches


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("op", ["decode", "cache_attention"])
def test_scales_on_a_16bit_cache_multiply_the_stored_values(backend, device, op, use_backend):
    gen = seeded(15)
    B, S_max = 2, 24
    lens = torch.tensor([13, 24], dtype=torch.int32)
    k_cache, v_cache = randn(B, S_max, HKV, D, gen=gen), randn(B, S_max, HKV, D, gen=gen)
    sq = 1 if op == "decode" else 3
    q = randn(B, sq, HQ, D, gen=gen)
    k_scale, v_scale = torch.tensor([0.5, 1.75]), torch.tensor(0.25)

    def call(**scales):
        dev = {name: (s.to(device) if isinstance(s, torch.Tensor) else s) for name, s in scales.items()}
        args = (k_cache.to(device), v_cache.to(device), lens.to(device))
        if op == "decode":
            out, lse = kvkernels.decode_attention(q[:, 0].to(device), *args, return_lse=True, backend=backend, **dev)
            return out[:, None].cpu(), lse[..., None].cpu()
        out, lse = kvkernels.cache_attention(q.to(device), *args, return_lse=True, backend=backend, **dev)
        return out.cpu(), lse.cpu()

    plain = run_or_skip(backend, call)
    for one in (dict(k_scale=1.0, v_scale=1.0), dict(k_scale=torch.tensor(1.0), v_scale=torch.ones(HKV))):
        same = call(**one)  # a scale of 1 is exact: bit-identical to no scale
        assert torch.equal(same[0], plain[0]) and torch.equal(same[1], plain[1])
    out, lse = call(k_scale=k_scale, v_scale=v_scale)
    for b in range(B):
        L = int(lens[b])
        keys = k_cache[b, :L].float() * k_scale[:, None]  # value = stored * scale, in fp32
        values = v_cache[b, :L].float() * v_scale
        check_attention(out[b], lse[b], q[b], keys, values, causal=True)


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("slots", [False, True], ids=["append_kv", "append_kv_slots"])
def test_append_with_scales_on_a_16bit_cache_stores_value_over_scale(backend, device, slots, use_backend):
    gen = seeded(16)
    B, S_max = 2, 12
    k, v = randn(B, 3, HKV, D, gen=gen), randn(B, 3, HKV, D, gen=gen)
    k_cache, v_cache = randn(B, S_max, HKV, D, gen=gen), randn(B, S_max, HKV, D, gen=gen)
    lens = torch.tensor([2, 9], dtype=torch.int32)
    k_scale, v_scale = torch.tensor([0.5, 3.0]), torch.tensor(1.0)

    def run(**scales):
        kc, vc = k_cache.to(device), v_cache.to(device)
        dev = {name: (s.to(device) if isinstance(s, torch.Tensor) else s) for name, s in scales.items()}
        if slots:
            slot = (torch.arange(B)[:, None] * S_max + lens[:, None].long() + torch.arange(3)).reshape(-1)
            kvkernels.append_kv_slots(k.flatten(0, 1).to(device), v.flatten(0, 1).to(device), kc, vc, slot.to(device),
                                      backend=backend, **dev)
        else:
            kvkernels.append_kv(k.to(device), v.to(device), kc, vc, lens.to(device), backend=backend, **dev)
        return kc.cpu(), vc.cpu()

    plain = run_or_skip(backend, run)
    one = run(k_scale=torch.tensor(1.0), v_scale=1.0)
    assert torch.equal(one[0].view(torch.int16), plain[0].view(torch.int16))
    kc, vc = run(k_scale=k_scale, v_scale=v_scale)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    for b in range(B):
        L = int(lens[b])
        expect_k[b, L:L + 3] = (k[b].float() / k_scale[:, None]).to(FP16)
        expect_v[b, L:L + 3] = (v[b].float() / v_scale).to(FP16)
    assert torch.equal(kc.view(torch.int16), expect_k.view(torch.int16))
    assert torch.equal(vc.view(torch.int16), expect_v.view(torch.int16))


@pytest.mark.parametrize("backend,device", backends())
def test_rotary_append_to_a_scaled_16bit_cache_stores_the_rotated_key_over_the_scale(backend, device):
    gen = seeded(19)
    B, S_max, s_new, rd = 2, 16, 3, 16
    angles = torch.arange(32)[:, None] * (10000.0 ** (-torch.arange(0, rd, 2) / rd))[None, :]
    cos, sin = angles.cos(), angles.sin()
    seqlens = torch.tensor([4, 9], dtype=torch.int32)
    k, v = randn(B, s_new, HKV, D, gen=gen), randn(B, s_new, HKV, D, gen=gen)
    kc, vc = randn(B, S_max, HKV, D, gen=gen), randn(B, S_max, HKV, D, gen=gen)
    before = kc.clone()
    k_scale = torch.tensor([2.0, 0.5])
    run_or_skip(backend, lambda: kvkernels.append_kv(k, v, kc, vc, seqlens, k_scale=k_scale, rotary_cos=cos,
                                                     rotary_sin=sin, backend=backend))
    for b in range(B):
        start = int(seqlens[b])
        pos = torch.arange(start, start + s_new)
        want = (rope(k[b], cos, sin, pos, False) / k_scale[:, None]).to(FP16)
        assert torch.equal(kc[b, start:start + s_new], want)
        assert torch.equal(kc[b, :start], before[b, :start])


# ---------------------------------------------------------------------------------- kv_cache_dtype


@pytest.mark.parametrize("backend,device", backends())
@pytest.mark.parametrize("name,fmt", [("fp8", torch.float8_e4m3fn), ("fp8_e4m3", torch.float8_e4m3fn),
                                      ("fp8_e5m2", torch.float8_e5m2)], ids=["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_kv_cache_dtype_reads_and_writes_uint8_storage_as_fp8(backend, device, name, fmt, use_backend):
    gen = seeded(17)
    B, S_max = 2, 16
    lens = torch.tensor([5, 11], dtype=torch.int32)
    fp8_k = randn(B, S_max, HKV, D, gen=gen).to(fmt)
    fp8_v = randn(B, S_max, HKV, D, gen=gen).to(fmt)
    raw_k, raw_v = fp8_k.view(torch.uint8).to(device), fp8_v.view(torch.uint8).to(device)
    q = randn(B, HQ, D, gen=gen, device=device)
    scale = torch.tensor(0.5, device=device)
    # Attention: the uint8 storage gives exactly what the float8 tensor of that format gives.
    want = run_or_skip(backend, lambda: kvkernels.decode_attention(q, fp8_k.to(device), fp8_v.to(device),
                                                                   lens.to(device), k_scale=scale, backend=backend))
    got = kvkernels.decode_attention(q, raw_k, raw_v, lens.to(device), k_scale=scale, kv_cache_dtype=name,
                                     backend=backend)
    assert torch.equal(got, want)
    q3 = randn(B, 2, HQ, D, gen=gen, device=device)
    want = run_or_skip(backend, lambda: kvkernels.cache_attention(q3, fp8_k.to(device), fp8_v.to(device),
                                                                  lens.to(device), backend=backend))
    got = kvkernels.cache_attention(q3, raw_k, raw_v, lens.to(device), kv_cache_dtype=name, backend=backend)
    assert torch.equal(got, want)
    # Appends land in the caller's uint8 tensor (a view, not a copy), as the fp8 append stores them.
    k, v = randn(B, 2, HKV, D, gen=gen, device=device), randn(B, 2, HKV, D, gen=gen, device=device)
    ek, ev = fp8_k.to(device), fp8_v.to(device)
    run_or_skip(backend, lambda: kvkernels.append_kv(k, v, ek, ev, lens.to(device), k_scale=scale, backend=backend))
    kvkernels.append_kv(k, v, raw_k, raw_v, lens.to(device), k_scale=scale, kv_cache_dtype=name, backend=backend)
    assert torch.equal(raw_k.cpu(), ek.view(torch.uint8).cpu()) and torch.equal(raw_v.cpu(), ev.view(torch.uint8).cpu())
    slot = torch.tensor([3, 30], device=device)
    run_or_skip(backend, lambda: kvkernels.append_kv_slots(k[:, 0], v[:, 0], ek, ev, slot, backend=backend))
    kvkernels.append_kv_slots(k[:, 0], v[:, 0], raw_k, raw_v, slot, kv_cache_dtype=name, backend=backend)
    assert torch.equal(raw_k.cpu(), ek.view(torch.uint8).cpu())


@pytest.mark.parametrize("op", ["decode", "cache_attention", "append_kv", "append_kv_slots"])
def test_mixed_or_misnamed_fp8_formats_are_refused_by_name(op):
    """k e4m3 with v e5m2 (one format for both caches: the kernels convert K and V alike), and a float8
    tensor of the other format than kv_cache_dtype names, raise TypeError before anything is written."""
    q, k = randn(2, HQ, D), randn(2, 1, HKV, D)
    e4m3 = torch.zeros(2, 8, HKV, D, dtype=torch.float8_e4m3fn)
    e5m2 = torch.zeros(2, 8, HKV, D, dtype=torch.float8_e5m2)
    lens = _i32(3, 4)
    calls = {"decode": lambda kc, vc, **kw: kvkernels.decode_attention(q, kc, vc, lens, **kw),
             "cache_attention": lambda kc, vc, **kw: kvkernels.cache_attention(q[:, None], kc, vc, lens, **kw),
             "append_kv": lambda kc, vc, **kw: kvkernels.append_kv(k, k, kc, vc, lens, **kw),
             "append_kv_slots": lambda kc, vc, **kw: kvkernels.append_kv_slots(k[:, 0], k[:, 0], kc, vc, lens, **kw)}
    with pytest.raises(TypeError, match="one fp8 format"):
        calls[op](e4m3, e5m2)
    with pytest.raises(TypeError, match="one fp8 format"):
        calls[op](e5m2, e4m3)
    with pytest.raises(TypeError, match="reads k_cache as float8_e5m2"):
        calls[op](e4m3, e4m3.clone(), kv_cache_dtype="fp8_e5m2")
    with pytest.raises(TypeError, match="reads k_cache as float8_e4m3fn"):
        calls[op](e5m2, e5m2.clone(), kv_cache_dtype="fp8")
    assert not e4m3.view(torch.uint8).any() and not e5m2.view(torch.uint8).any()


# ---------------------------------------------------------------------------------- torch.compile


def test_compiled_vllm_conventions_and_row_view_match_eager():
    # kv_cache_dtype and the 16-bit scales are resolved before the custom ops, and the row view of
    # cache_batch_idx/cache_leftpad is plain tensor code: all of it traces with fullgraph=True.
    gen = seeded(18)
    raw_k = randn(3, 16, HKV, D, gen=gen).to(torch.float8_e4m3fn).view(torch.uint8)
    raw_v = randn(3, 16, HKV, D, gen=gen).to(torch.float8_e4m3fn).view(torch.uint8)
    k_cache, v_cache = randn(3, 16, HKV, D, gen=gen), randn(3, 16, HKV, D, gen=gen)
    q, new = randn(2, 1, HQ, D, gen=gen), randn(2, 1, HKV, D, gen=gen)
    lens, idx, pad = _i32(4, 9), _i32(2, 0), _i32(1, 3)
    scale = torch.tensor([0.5, 2.0])

    def step(q, new, raw_k, raw_v, k_cache, v_cache):
        kvkernels.append_kv(new, new, raw_k[:2], raw_v[:2], lens, k_scale=scale, kv_cache_dtype="fp8")
        a = kvkernels.decode_attention(q[:, 0], raw_k[:2], raw_v[:2], lens + 1, k_scale=scale, kv_cache_dtype="fp8")
        b = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=new, v=new, cache_seqlens=lens, cache_batch_idx=idx,
                                       cache_leftpad=pad)
        c = kvkernels.decode_attention(q[:, 0], k_cache[:2], v_cache[:2], lens, k_scale=scale, v_scale=scale)
        return a, b, c

    copies = [t.clone() for t in (raw_k, raw_v, k_cache, v_cache)]
    eager = step(q, new, raw_k, raw_v, k_cache, v_cache)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, new, *copies)
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)
    for got, want in zip(copies, (raw_k, raw_v, k_cache, v_cache)):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), "the compiled appends must write the caches"
