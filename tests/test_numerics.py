"""Numerics at the edges, for every op and every backend that runs here (the reference; Triton,
interpreted on the CPU; on a GPU also Triton and CUDA):

  * logits near 1e4 in fp16/bf16 (a common offset of ~1e4 with an O(10) spread): no inf/NaN, and
    the result stays at fp32-logit accuracy although the naive low-precision math is off by O(10);
  * +inf, -inf and NaN in every cache slot and page a call must not read (past each length, spare
    pages, block-table columns past a sequence, positions before the window) never reach an output;
    the same for keys no prefill query can see;
  * prefill rows that see no key give out 0 and lse -inf, the other rows stay exact;
  * empty batches (B = 0) and zero-length sequences for every op: outputs of the right shape, out 0
    and lse -inf where a row sees nothing, and an append of nothing leaves every cache bit alone;
  * merging attention states with an empty side or with lse near 1e4.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (run_or_skip, assert_lse_close, assert_parity, build_paged, kernel_backends, lengths_tensor, randn,
                      reference, seeded)

import kvkernels
import kvkernels.triton

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *kernel_backends()]
FP8 = torch.float8_e4m3fn
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
HQ, HKV, D = 4, 2, 64  # a head dim every backend takes


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaN compares equal to itself."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def decode(backend, device, q, k_cache, v_cache, seqlens, block_table=None, **kw):
    """decode_attention on `device` -> (out, lse) on the CPU."""
    to = (lambda x: None if x is None else x.to(device))
    out, lse = run_or_skip(backend, lambda: kvkernels.decode_attention(
        q.to(device), k_cache.to(device), v_cache.to(device), seqlens.to(device), block_table=to(block_table),
        return_lse=True, backend=backend, **{n: to(x) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}))
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:2] and lse.dtype == torch.float32
    return out.cpu(), lse.cpu()


def prefill(backend, device, q, k, v, **kw):
    out, lse = run_or_skip(backend, lambda: kvkernels.prefill_attention(
        q.to(device), k.to(device), v.to(device), return_lse=True, backend=backend,
        **{n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}))
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    return out.cpu(), lse.cpu()


def common_offset_qk(q_shape, k_shape, dtype, gen):
    """q and k whose logits (softmax_scale 1) are ~1e4 + O(10): every key shares a component u
    aligned with the queries (q . u ~ 1e4), plus small noise that spreads the logits by ~10, so the
    softmax is neither uniform nor one-hot and exp(logit) overflows without the running max."""
    d = q_shape[-1]
    w = torch.randn(d, generator=gen)
    q = 10.0 * w + 0.05 * torch.randn(*q_shape, generator=gen)
    u = 20.0 * torch.sign(w)
    k = u + 0.03 * torch.randn(*k_shape, generator=gen)
    return q.to(dtype), k.to(dtype)


def assert_fp32_logit_accuracy(out, ref64, max_v):
    """Logits ~1e4 are held in fp32 by the kernels: a few fp32 ulps (1e-3 each at 1e4) per logit, so
    |out - ref| stays at 1e-2 * max|v|, while the naive fp16/bf16 math (logits rounded to multiples of
    8 or 64) is off by O(1)."""
    err = (out.double() - ref64.double()).abs().max().item()
    assert err <= 1e-2 * max_v, f"error {err:.3e} vs the fp64 oracle with logits near 1e4"


# -------------------------------------------------------------------------- large logits


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,num_splits", [(None, 1), (16, 3)], ids=["contiguous", "page16-3splits"])
def test_decode_logits_near_1e4(backend, device, dtype, page_size, num_splits):
    gen = seeded(11)
    lens = lengths_tensor([1, 37, 70])
    q, k = common_offset_qk((3, HQ, D), (3, 72, HKV, D), dtype, gen)
    v = randn(3, 72, HKV, D, dtype=dtype, gen=gen)
    ref64, lse64 = reference.decode_attention(q.double(), k.double(), v.double(), lens, softmax_scale=1.0)
    assert lse64[1:].abs().max() > 9e3  # the regime this test is about
    ref, ref_lse = reference.decode_attention(q.float(), k, v, lens, softmax_scale=1.0)
    ref_lp, _ = reference.decode_attention(q, k, v, lens, softmax_scale=1.0, upcast=False)
    if page_size is None:
        kc, vc, table = k, v, None
    else:
        kc, table = build_paged(k, lens, page_size, gen=seeded(1))
        vc, _ = build_paged(v, lens, page_size, gen=seeded(1))
    out, lse = decode(backend, device, q, kc, vc, lens, table, softmax_scale=1.0, num_splits=num_splits)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)
    assert_fp32_logit_accuracy(out, ref64, v.abs().max().item())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_prefill_logits_near_1e4(backend, device, dtype, causal):
    gen = seeded(12)
    q, k = common_offset_qk((2, 21, HQ, D), (2, 37, HKV, D), dtype, gen)
    v = randn(2, 37, HKV, D, dtype=dtype, gen=gen)
    ref64, lse64 = reference.prefill_attention(q.double(), k.double(), v.double(), causal=causal, softmax_scale=1.0)
    assert lse64.abs().max() > 9e3
    ref, ref_lse = reference.prefill_attention(q, k, v, causal=causal, softmax_scale=1.0)
    ref_lp, _ = reference.prefill_attention(q, k, v, causal=causal, softmax_scale=1.0, upcast=False)
    out, lse = prefill(backend, device, q, k, v, causal=causal, softmax_scale=1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)
    assert_fp32_logit_accuracy(out, ref64, v.abs().max().item())


# ------------------------------------------------------------------- non-finite poison


def non_finite(dtype, n):
    """n poison values cycling +inf, -inf, NaN (float8_e4m3fn has no infinity: NaN only)."""
    cycle = [float("nan")] if dtype == FP8 else [float("inf"), float("-inf"), float("nan")]
    return torch.tensor([cycle[i % len(cycle)] for i in range(n)], dtype=torch.float32).to(dtype)


def poison_slot(cache, where, salt):
    """Fill one [Hkv, D] slot (an index into the cache) with a mix of non-finite values."""
    hkv, d = cache.shape[-2:]
    values = non_finite(cache.dtype, hkv * d + 3)
    cache[where] = values[salt % 3: salt % 3 + hkv * d].reshape(hkv, d)


def poison_unread(cache, lens, block_table, window_left):
    """Every slot a decode call must not read gets +inf/-inf/NaN: rows past each length, spare pages
    and rows (build_paged's NaN), and positions before the window start."""
    spare = torch.isnan(cache.float()).flatten(-2).any(-1)  # [..., rows] slots build_paged left empty
    for i, where in enumerate(spare.nonzero().tolist()):
        poison_slot(cache, tuple(where), i)
    for b, n in enumerate(lens.tolist()):
        capacity = cache.shape[1] if block_table is None else block_table.shape[1] * cache.shape[1]
        unread = list(range(n, capacity)) if block_table is None else []
        if window_left >= 0:
            unread += range(0, max(0, n - 1 - window_left))
        for p in unread:
            if block_table is None:
                where = (b, p)
            else:
                where = (int(block_table[b, p // cache.shape[1]]), p % cache.shape[1])
            poison_slot(cache, where, b + p)
    return cache


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("window_left", [-1, 20], ids=["full", "window20"])
@pytest.mark.parametrize("layout", ["contiguous", "page16", "page5", "fp8-page16"])
def test_non_finite_values_in_unread_slots_never_reach_outputs(backend, device, window_left, layout):
    gen = seeded(13)
    lens = lengths_tensor([1, 37, 70, 0])
    capacity = 80
    q = randn(4, HQ, D, gen=gen)
    k = randn(4, capacity, HKV, D, gen=gen)
    v = randn(4, capacity, HKV, D, gen=gen)
    scales = {}
    if layout.startswith("fp8"):
        scales = dict(k_scale=torch.tensor(0.05), v_scale=torch.tensor(0.02))
        k = reference.quantize(k, scales["k_scale"].expand(HKV), FP8)
        v = reference.quantize(v, scales["v_scale"].expand(HKV), FP8)
    norm = {n: s.expand(HKV) for n, s in scales.items()}
    ref, ref_lse = reference.decode_attention(q.float(), k, v, lens, window_left=window_left, **norm)
    ref_lp, _ = reference.decode_attention(q, k, v, lens, window_left=window_left, upcast=False, **norm)
    if layout == "contiguous":
        kc, vc, table = k.clone(), v.clone(), None
    else:
        page_size = int(layout.split("page")[1])
        kc, table = build_paged(k, lens, page_size, gen=seeded(2))
        vc, _ = build_paged(v, lens, page_size, gen=seeded(2))
    poison_unread(kc, lens, table, window_left)
    poison_unread(vc, lens, table, window_left)
    out, lse = decode(backend, device, q, kc, vc, lens, table, window_left=window_left, num_splits=3, **scales)
    assert torch.isfinite(out).all(), "a non-finite value from an unread slot reached the output"
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal,window", [(True, (7, -1)), (False, (4, 2))], ids=["causal-left7", "band4-2"])
def test_prefill_keys_no_query_sees_may_hold_non_finite_values(backend, device, causal, window):
    # Sq = 5, Sk = 40, bottom-right aligned: query i sees keys from i + 35 - left on, so keys below
    # 35 - left are seen by no query.
    gen = seeded(14)
    q = randn(2, 5, HQ, D, gen=gen)
    k = randn(2, 40, HKV, D, gen=gen)
    v = randn(2, 40, HKV, D, gen=gen)
    ref, ref_lse = reference.prefill_attention(q, k, v, causal=causal, window_size=window)
    ref_lp, _ = reference.prefill_attention(q, k, v, causal=causal, window_size=window, upcast=False)
    unseen = 35 - window[0]
    kp, vp = k.clone(), v.clone()
    for b in range(2):
        for j in range(unseen):
            poison_slot(kp, (b, j), j)
            poison_slot(vp, (b, j), j + 1)
    out, lse = prefill(backend, device, q, kp, vp, causal=causal, window_size=window)
    assert torch.isfinite(out).all()
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)


# ------------------------------------------------------------------------ masked rows


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (0, 0)), (True, (2, -1))],
                         ids=["causal", "diagonal-only", "causal-left2"])
def test_prefill_rows_that_see_nothing_give_zero_and_neg_inf(backend, device, causal, window):
    # varlen, bottom-right aligned per sequence: Sq > Sk leaves the first Sq - Sk rows without a key,
    # Sk = 0 leaves every row without one.
    lens_q, lens_k = [9, 3, 4, 6], [2, 0, 4, 6]
    gen = seeded(15)
    q = randn(sum(lens_q), HQ, D, gen=gen)
    k = randn(sum(lens_k), HKV, D, gen=gen)
    v = randn(sum(lens_k), HKV, D, gen=gen)
    cu = (lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32))
    kw = dict(causal=causal, window_size=window, cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k))
    ref, ref_lse = reference.prefill_attention(q, k, v, **kw)
    ref_lp, _ = reference.prefill_attention(q, k, v, upcast=False, **kw)
    out, lse = prefill(backend, device, q, k, v, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), **kw)
    empty = torch.isneginf(ref_lse[0])  # [Tq]: rows that see nothing (the same for every head)
    assert 9 <= int(empty.sum()) < sum(lens_q)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.isneginf(lse[:, empty]).all() and torch.isfinite(lse[:, ~empty]).all()
    assert torch.isfinite(out).all()
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)


# ------------------------------------------------------------------ empty batches, sequences

EMPTY_CASES = ["decode-contiguous", "decode-paged", "prefill-dense", "prefill-varlen", "append-contiguous",
               "append-paged", "append-fp8-paged", "append-slots"]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("op", EMPTY_CASES)
def test_empty_batch(backend, device, op):
    """B = 0 is valid input for every op: outputs of the right (empty) shape, caches untouched."""
    f16, i32 = torch.float16, torch.int32
    none = torch.zeros(0, dtype=i32)
    cache = torch.full((3, 16, HKV, D), float("nan"), dtype=FP8 if "fp8" in op else f16).to(device)
    before = cache.clone()
    if op.startswith("decode"):
        q = torch.empty(0, HQ, D, dtype=f16)
        kc = cache[:0] if op == "decode-contiguous" else cache
        table = torch.zeros(0, 2, dtype=i32) if op == "decode-paged" else None
        out, lse = decode(backend, device, q, kc, kc, none, table)
        assert out.shape == (0, HQ, D) and lse.shape == (0, HQ)
    elif op == "prefill-dense":
        out, lse = prefill(backend, device, torch.empty(0, 5, HQ, D, dtype=f16), torch.empty(0, 7, HKV, D, dtype=f16),
                           torch.empty(0, 7, HKV, D, dtype=f16), causal=True)
        assert out.shape == (0, 5, HQ, D) and lse.shape == (0, HQ, 5)
    elif op == "prefill-varlen":
        cu = torch.zeros(1, dtype=i32)
        out, lse = prefill(backend, device, torch.empty(0, HQ, D, dtype=f16), torch.empty(0, HKV, D, dtype=f16),
                           torch.empty(0, HKV, D, dtype=f16), cu_seqlens_q=cu, cu_seqlens_k=cu)
        assert out.shape == (0, HQ, D) and lse.shape == (HQ, 0)
    else:
        k = torch.empty(0, 2, HKV, D, dtype=f16, device=device)
        scales = dict(k_scale=torch.tensor(0.5, device=device), v_scale=torch.tensor(2.0, device=device)) \
            if "fp8" in op else {}
        if op == "append-slots":
            call = lambda: kvkernels.append_kv_slots(k[:, 0], k[:, 0], cache, cache, none.to(device),  # noqa: E731
                                                     backend=backend)
        else:
            kc = cache[:0] if op == "append-contiguous" else cache
            table = None if op == "append-contiguous" else torch.zeros(0, 2, dtype=i32, device=device)
            call = lambda: kvkernels.append_kv(k, k, kc, kc, none.to(device), block_table=table,  # noqa: E731
                                               backend=backend, **scales)
        assert run_or_skip(backend, call) is None
    assert torch.equal(bits(cache), bits(before))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "contiguous-no-rows", "paged", "paged-no-columns", "paged-no-pages"])
def test_decode_of_zero_length_sequences(backend, device, layout):
    """Every sequence empty, down to caches with no rows, no block-table columns or no pages: out 0,
    lse -inf, and nothing is read (the caches are NaN)."""
    q = randn(3, HQ, D, gen=seeded(16))
    rows = 0 if layout == "contiguous-no-rows" else 8
    pages = 0 if layout == "paged-no-pages" else 4
    cache = torch.full((3 if layout.startswith("contiguous") else pages, rows, HKV, D), float("nan"),
                       dtype=torch.float16)
    table = None
    if layout.startswith("paged"):
        table = torch.zeros(3, 0 if layout == "paged-no-columns" else 2, dtype=torch.int32)
    out, lse = decode(backend, device, q, cache, cache, lengths_tensor([0, 0, 0]), table, num_splits=2)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", ["no-keys", "no-queries", "varlen-no-keys", "varlen-empty-sequences"])
def test_prefill_of_zero_length_sequences(backend, device, case):
    gen = seeded(17)
    f16 = torch.float16
    cu = (lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32))
    if case == "no-keys":
        q, k = randn(2, 5, HQ, D, gen=gen), torch.empty(2, 0, HKV, D, dtype=f16)
        kw = dict(causal=True)
    elif case == "no-queries":
        q, k = torch.empty(2, 0, HQ, D, dtype=f16), randn(2, 7, HKV, D, gen=gen)
        kw = dict(causal=True)
    elif case == "varlen-no-keys":
        q, k = randn(6, HQ, D, gen=gen), torch.empty(0, HKV, D, dtype=f16)
        kw = dict(cu_seqlens_q=cu([2, 4]), cu_seqlens_k=cu([0, 0]))
    else:
        q, k = randn(3, HQ, D, gen=gen), randn(5, HKV, D, gen=gen)
        kw = dict(cu_seqlens_q=cu([0, 3, 0]), cu_seqlens_k=cu([5, 0, 0]), causal=True)
    out, lse = prefill(backend, device, q, k, k, **kw)
    ref, ref_lse = reference.prefill_attention(q, k, k, **kw)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(ref, torch.zeros_like(ref))
    assert torch.isneginf(lse).all() and lse.shape == ref_lse.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", ["contiguous", "paged", "fp8-paged", "slots-none", "slots-all-skipped"])
def test_append_of_nothing_changes_no_bit(backend, device, case):
    """S_new = 0 (whatever the lengths, even at capacity), no slots, or only skipped slots: a no-op."""
    dtype = FP8 if case.startswith("fp8") else torch.float16
    kc = torch.full((3, 8, HKV, D), float("nan"), dtype=dtype).to(device)
    vc = kc.clone()
    before_k, before_v = kc.clone(), vc.clone()
    scales = dict(k_scale=torch.tensor(0.5, device=device), v_scale=torch.tensor(2.0, device=device)) \
        if dtype == FP8 else {}
    if case.startswith("slots"):
        n = 0 if case == "slots-none" else 3
        src = randn(n, HKV, D, device=device)
        slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        call = lambda: kvkernels.append_kv_slots(src, src, kc, vc, slots, backend=backend)  # noqa: E731
    else:
        src = randn(3, 0, HKV, D, device=device)
        table = None if case == "contiguous" else torch.tensor([[0, 1], [2, 0], [1, 2]], dtype=torch.int32,
                                                                  device=device)
        lens = lengths_tensor([0, 8, 16] if table is not None else [0, 5, 8], device)  # full caches included
        call = lambda: kvkernels.append_kv(src, src, kc, vc, lens, block_table=table, backend=backend,  # noqa: E731
                                           **scales)
    assert run_or_skip(backend, call) is None
    assert torch.equal(bits(kc), bits(before_k)) and torch.equal(bits(vc), bits(before_v))


# ------------------------------------------------------------------------------ merge


def test_merge_with_an_empty_side_and_large_lse():
    gen = seeded(18)
    out_a = torch.randn(3, HQ, D, generator=gen)
    out_b = torch.randn(3, HQ, D, generator=gen)
    lse_a = 1e4 + torch.randn(3, HQ, generator=gen)
    lse_b = lse_a - 3.0 + torch.randn(3, HQ, generator=gen)
    # An empty side (lse -inf, out 0 as the ops return it) changes nothing, on either side.
    empty_out, empty_lse = torch.zeros_like(out_a), torch.full_like(lse_a, float("-inf"))
    out, lse = kvkernels.merge_attention_states(out_a, lse_a, empty_out, empty_lse)
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)
    out, lse = kvkernels.merge_attention_states(empty_out, empty_lse, out_b, lse_b)
    assert torch.equal(out, out_b) and torch.equal(lse, lse_b)
    out, lse = kvkernels.merge_attention_states(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(out, empty_out) and torch.isneginf(lse).all()
    out, lse = kvkernels.merge_attention_states(out_a[:0], lse_a[:0], out_b[:0], lse_b[:0])  # B = 0
    assert out.shape == (0, HQ, D) and lse.shape == (0, HQ)
    # lse near 1e4 on both sides: no exp(1e4) overflow. The weights come from differences of the two
    # lse values (exact in fp32 when they are close), so out is exact to a few fp32 epsilons; the
    # merged lse itself is an fp32 number near 1e4, exact to its ulp (~1e-3 there).
    out, lse = kvkernels.merge_attention_states(out_a, lse_a, out_b, lse_b)
    la, lb = lse_a.double(), lse_b.double()
    want_lse = torch.logaddexp(la, lb)
    want = (torch.exp(la - want_lse)[..., None] * out_a.double() + torch.exp(lb - want_lse)[..., None] * out_b.double())
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(want_lse.abs().max().item()))  # fp32
    scale = max(out_a.abs().max().item(), out_b.abs().max().item())
    torch.testing.assert_close(out.double(), want, atol=8 * torch.finfo(torch.float32).eps * scale, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=2 * ulp, rtol=0)


# ----------------------------------------------------------------------- import order


@pytest.mark.skipif(not kvkernels.triton.INTERPRET, reason="only the interpreter depends on import order")
def test_triton_interpreter_works_after_another_op_imported_triton():
    """In a fresh process, a reference call first (torch's custom-op machinery imports triton), then
    backend="triton" on CPU tensors: the interpreter mode must already be set when triton is first
    imported, or the kernels cannot call triton.language's jit helpers."""
    script = textwrap.dedent("""
        import torch, kvkernels
        q, k = torch.randn(1, 2, 16, dtype=torch.float16), torch.randn(1, 8, 2, 16, dtype=torch.float16)
        lens = torch.tensor([5], dtype=torch.int32)
        ref = kvkernels.decode_attention(q, k, k, lens, backend="reference")
        out = kvkernels.decode_attention(q, k, k, lens, backend="triton")
        assert (out.float() - ref.float()).abs().max().item() < 1e-2
        print("ok")
    """)
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
