"""The oracle checked against the contract, written a second time as naive per-query fp64 loops.

kvkernels.reference is what every kernel is measured against, so it gets its own independent check:
the loops below read like DESIGN.md section 3, one query and one key at a time.
"""

import math

import pytest
import torch
from conftest import build_paged, lengths_tensor, poison_contiguous, seeded

from kvkernels import reference

F64 = torch.float64


def naive_attention_row(q_row, keys, values, visible, scale, softcap):
    """q_row [D]; keys/values: lists of [D]; visible: list of bools -> (out [D], lse) in fp64."""
    scores = []
    for k, ok in zip(keys, visible):
        if not ok:
            continue
        s = float(torch.dot(q_row, k)) * scale
        if softcap > 0:
            s = softcap * math.tanh(s / softcap)
        scores.append(s)
    if not scores:
        return torch.zeros_like(q_row), float("-inf")
    m = max(scores)
    lse = m + math.log(sum(math.exp(s - m) for s in scores))
    out = torch.zeros_like(q_row)
    i = 0
    for v, ok in zip(values, visible):
        if ok:
            out += math.exp(scores[i] - lse) * v
            i += 1
    return out, lse


def naive_visible(i, j, sq, sk, causal, left, right):
    diag = i + sk - sq
    if causal and j > diag:
        return False
    if left >= 0 and j < diag - left:
        return False
    if right >= 0 and j > diag + right:
        return False
    return True


def naive_prefill(q, k, v, causal, left, right, scale, softcap):
    """One sequence: q [Sq, Hq, D], k/v [Sk, Hkv, D] (fp64) -> out [Sq, Hq, D], lse [Hq, Sq]."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    out = torch.zeros_like(q)
    lse = torch.empty(hq, sq, dtype=F64)
    for h in range(hq):
        g = h // (hq // hkv)
        for i in range(sq):
            vis = [naive_visible(i, j, sq, sk, causal, left, right) for j in range(sk)]
            out[i, h], lse[h, i] = naive_attention_row(q[i, h], list(k[:, g]), list(v[:, g]), vis, scale, softcap)
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 1), (5, 9), (9, 5), (7, 7)])
@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((3, -1), 0.0), ((2, 1), 5.0), ((-1, 0), 0.0)])
def test_prefill_dense_matches_naive_loop(causal, sq, sk, window, softcap):
    gen = seeded(sq * 100 + sk)
    B, hq, hkv, d = 2, 4, 2, 8
    q = torch.randn(B, sq, hq, d, generator=gen, dtype=F64)
    k = torch.randn(B, sk, hkv, d, generator=gen, dtype=F64)
    v = torch.randn(B, sk, hkv, d, generator=gen, dtype=F64)
    scale = 0.7
    out, lse = reference.prefill_attention(q, k, v, causal=causal, softmax_scale=scale, window_size=window,
                                           softcap=softcap)
    assert out.shape == q.shape and lse.shape == (B, hq, sq)
    for b in range(B):
        o, l = naive_prefill(q[b], k[b], v[b], causal, *window, scale, softcap)
        torch.testing.assert_close(out[b], o, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(lse[b], l, atol=1e-12, rtol=1e-10)


def test_prefill_fully_masked_rows_are_zero_with_neg_inf_lse():
    gen = seeded(1)
    q = torch.randn(1, 6, 2, 8, generator=gen, dtype=F64)
    k = torch.randn(1, 3, 2, 8, generator=gen, dtype=F64)
    # Sq > Sk under causal: the first Sq - Sk query rows see no key.
    out, lse = reference.prefill_attention(q, k, k, causal=True)
    assert torch.all(out[0, :3] == 0) and torch.all(torch.isneginf(lse[0, :, :3]))
    assert torch.isfinite(lse[0, :, 3:]).all() and not torch.isnan(out).any()


def test_prefill_varlen_matches_per_sequence_dense():
    gen = seeded(2)
    lens_q, lens_k = [3, 0, 5, 1], [4, 2, 5, 6]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 8, generator=gen, dtype=F64)
    k = torch.randn(sum(lens_k), 2, 8, generator=gen, dtype=F64)
    v = torch.randn(sum(lens_k), 2, 8, generator=gen, dtype=F64)
    out, lse = reference.prefill_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert lse.shape == (4, sum(lens_q))
    for b in range(4):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        o, l = naive_prefill(q[qs:qe], k[ks:ke], v[ks:ke], True, -1, -1, 1 / math.sqrt(8), 0.0)
        torch.testing.assert_close(out[qs:qe], o, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(lse[:, qs:qe], l, atol=1e-12, rtol=1e-10)


def naive_decode(q, keys_of, values_of, lengths, window_left, scale, softcap):
    """q [B, Hq, D]; keys_of(b, p) -> [Hkv, D] (fp64) -> out [B, Hq, D], lse [B, Hq]."""
    B, hq, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.empty(B, hq, dtype=F64)
    for b in range(B):
        n = lengths[b]
        keys = [keys_of(b, p) for p in range(n)]
        values = [values_of(b, p) for p in range(n)]
        for h in range(len(q[b])):
            hkv = keys[0].shape[0] if keys else 1
            g = h // (hq // hkv)
            vis = [window_left < 0 or p >= n - 1 - window_left for p in range(n)]
            out[b, h], lse[b, h] = naive_attention_row(q[b, h], [x[g] for x in keys], [x[g] for x in values], vis,
                                                       scale, softcap)
    return out, lse


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("window_left,softcap", [(-1, 0.0), (0, 0.0), (4, 3.0)])
def test_decode_matches_naive_loop(paged, window_left, softcap):
    gen = seeded(3)
    B, hq, hkv, d, smax, page = 4, 6, 2, 8, 21, 4
    lengths = [0, 1, 9, 21]
    q = torch.randn(B, hq, d, generator=gen, dtype=F64)
    kd = torch.randn(B, smax, hkv, d, generator=gen, dtype=F64)
    vd = torch.randn(B, smax, hkv, d, generator=gen, dtype=F64)
    seqlens = lengths_tensor(lengths)
    if paged:
        kc, table = build_paged(kd, seqlens, page, gen=gen)
        vc, _ = build_paged(vd, seqlens, page, gen=seeded(3))
        # the two builders must agree on the page order: rebuild v with k's table
        vc = torch.full_like(kc, float("nan"))
        for b, n in enumerate(lengths):
            for p in range(n):
                vc[table[b, p // page], p % page] = vd[b, p]
    else:
        kc, vc, table = poison_contiguous(kd.clone(), seqlens), poison_contiguous(vd.clone(), seqlens), None
    out, lse = reference.decode_attention(q, kc, vc, seqlens, block_table=table, softmax_scale=0.4,
                                          window_left=window_left, softcap=softcap)
    o, l = naive_decode(q, lambda b, p: kd[b, p], lambda b, p: vd[b, p], lengths, window_left, 0.4, softcap)
    torch.testing.assert_close(out, o, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, l, atol=1e-12, rtol=1e-10)
    assert torch.all(out[0] == 0) and torch.isneginf(lse[0]).all()


@pytest.mark.parametrize("per_head", [False, True])
def test_decode_dequantizes_fp8_with_scales(per_head):
    gen = seeded(4)
    B, hq, hkv, d, smax = 2, 4, 2, 16, 7
    q = torch.randn(B, hq, d, generator=gen, dtype=F64)
    k8 = (torch.randn(B, smax, hkv, d, generator=gen) * 20).to(torch.float8_e4m3fn)
    v8 = (torch.randn(B, smax, hkv, d, generator=gen) * 20).to(torch.float8_e4m3fn)
    ks = torch.tensor([0.02, 0.05] if per_head else 0.03, dtype=torch.float32)
    vs = torch.tensor([0.5, 0.25] if per_head else 0.1, dtype=torch.float32)
    # dequantization is an fp32 product (as in the kernels); the attention math after it is fp64
    kscale = ks.reshape(-1).expand(hkv)
    vscale = vs.reshape(-1).expand(hkv)
    lengths = [5, 7]
    out, lse = reference.decode_attention(q, k8, v8, lengths_tensor(lengths), k_scale=ks, v_scale=vs)
    o, l = naive_decode(q, lambda b, p: (k8[b, p].float() * kscale[:, None]).double(),
                        lambda b, p: (v8[b, p].float() * vscale[:, None]).double(), lengths, -1, 1 / math.sqrt(d), 0.0)
    torch.testing.assert_close(out, o, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, l, atol=1e-12, rtol=1e-10)


def test_quantize_saturates_and_rounds_to_nearest_even():
    x = torch.tensor([[[1000.0, -1000.0, 0.5 * (1.0 + 1.125), 3.0]]])  # [1, 1, 4]
    scale = torch.tensor(1.0)
    q = reference.quantize(x, scale, torch.float8_e4m3fn).float()
    # 1.0625 is halfway between 1.0 and 1.125 in e4m3: ties go to the even mantissa (1.0).
    assert q.tolist() == [[[448.0, -448.0, 1.0, 3.0]]]


@pytest.mark.parametrize("paged", [False, True])
def test_append_writes_exactly_the_positions_asked(paged):
    gen = seeded(5)
    B, s_new, hkv, d, smax, page = 3, 3, 2, 8, 12, 4
    k = torch.randn(B, s_new, hkv, d, generator=gen)
    v = torch.randn(B, s_new, hkv, d, generator=gen)
    start = [0, 4, 9]
    if paged:
        kc = torch.randn(9, page, hkv, d, generator=gen)
        table = torch.randperm(9, generator=gen)[:B * 3].reshape(B, 3).to(torch.int32)
    else:
        kc, table = torch.randn(B, smax, hkv, d, generator=gen), None
    vc = kc.clone() + 1
    k_before, v_before = kc.clone(), vc.clone()
    reference.append_kv(k, v, kc, vc, lengths_tensor(start), block_table=table)
    k_expect, v_expect = k_before.clone(), v_before.clone()
    for b in range(B):
        for i in range(s_new):
            p = start[b] + i
            where = (table[b, p // page].item(), p % page) if paged else (b, p)
            k_expect[where] = k[b, i]
            v_expect[where] = v[b, i]
    assert torch.equal(kc, k_expect) and torch.equal(vc, v_expect)


def test_append_slots_skips_negative_and_addresses_contiguous_rows():
    gen = seeded(6)
    cache = torch.randn(2, 5, 1, 4, generator=gen)  # contiguous [B=2, S_max=5]: 10 rows
    before = cache.clone()
    k = torch.randn(3, 1, 4, generator=gen)
    slots = torch.tensor([7, -1, 0])
    reference.append_kv_slots(k, k, cache, cache, slots)
    expect = before.clone()
    expect[1, 2] = k[0]  # slot 7 -> row 7 // 5 = 1, 7 % 5 = 2
    expect[0, 0] = k[2]
    assert torch.equal(cache, expect)


def test_merge_of_two_halves_equals_attention_over_all_keys():
    gen = seeded(7)
    q = torch.randn(1, 3, 2, 8, generator=gen, dtype=F64)
    k = torch.randn(1, 10, 2, 8, generator=gen, dtype=F64)
    v = torch.randn(1, 10, 2, 8, generator=gen, dtype=F64)
    full, lse = reference.prefill_attention(q, k, v)
    a, la = reference.prefill_attention(q, k[:, :4], v[:, :4])
    b, lb = reference.prefill_attention(q, k[:, 4:], v[:, 4:])
    # out [B, Sq, H, D] with lse [B, H, Sq]: put lse in out's layout without D
    out, merged = reference.merge_attention_states(a, la.transpose(1, 2), b, lb.transpose(1, 2))
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(merged.double(), lse.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_merge_with_empty_sides():
    out_a = torch.randn(2, 3, 4)
    lse_a = torch.tensor([[0.5, float("-inf"), 1.0], [float("-inf")] * 3])
    out_b = torch.randn(2, 3, 4)
    lse_b = torch.full((2, 3), float("-inf"))
    out, lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert torch.equal(lse, lse_a)
    torch.testing.assert_close(out[0, 0], out_a[0, 0])
    assert torch.all(out[1] == 0) and torch.all(out[0, 1] == 0) and not torch.isnan(out).any()


# ------------------------------------------------------------------------------ extreme logits
#
# Integer-valued q and k (exact in fp16 and bf16) and power-of-two scales make every score an
# exactly representable number, so the only error left is the oracle's own softmax: it must match
# the fp64 loops to the output dtype's rounding even at |logits| ~ 1e5, where one fp32 step of the
# lse is 0.008 (probabilities computed as exp(s - lse) would be off by that much).

LOGIT_SCALES = {1e2: 2.0 ** -4, 1e4: 2.0 ** 2, 1e5: 2.0 ** 5}
OUT_TOL = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 4e-7}


def integer_inputs(gen, shape, low, high, dtype, sign=1.0):
    return (torch.randint(low, high + 1, shape, generator=gen).to(torch.float64) * sign).to(dtype)


def extreme_case(gen, dtype, magnitude, B=2, sq=3, sk=13, hq=4, hkv=2, d=16):
    """q entries in {64, 128, 192, 256} (bf16-exact), k in [-8, 8]: |q.k| <= 32768; the scale
    brings the largest logits to about `magnitude`. Two keys of each sequence are duplicates, so
    two weights tie at the maximum."""
    q = integer_inputs(gen, (B, sq, hq, d), 1, 4, torch.float64) * 64
    q = (q * torch.where(torch.rand(q.shape, generator=gen) < 0.2, -1.0, 1.0)).to(dtype)
    k = integer_inputs(gen, (B, sk, hkv, d), -8, 8, dtype)
    k[:, 1] = k[:, 0]
    v = torch.randn(B, sk, hkv, d, generator=gen).to(dtype)
    return q, k, v, LOGIT_SCALES[magnitude]


def assert_close_to_naive(out, lse, ref_out, ref_lse, dtype):
    scale_v = ref_out.abs().max().item() + 1.0
    err = (out.double() - ref_out).abs().max().item()
    assert err <= OUT_TOL[dtype] * scale_v, f"out error {err:.3e} > {OUT_TOL[dtype] * scale_v:.3e}"
    finite = torch.isfinite(ref_lse)
    lse_tol = ref_lse.abs().clamp_min(1.0) * 2.0 ** -22 + 1e-6  # two fp32 steps of the lse
    assert torch.equal(torch.isneginf(lse.double()), ~finite)
    assert bool(((lse.double() - ref_lse).abs()[finite] <= lse_tol[finite]).all()), \
        f"lse error {(lse.double() - ref_lse).abs()[finite].max():.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("magnitude", [1e2, 1e4, 1e5])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_prefill_exact_at_extreme_logits(dtype, magnitude, sign):
    gen = seeded(int(magnitude) % 97 + (sign > 0))
    q, k, v, scale = extreme_case(gen, dtype, magnitude)
    k = k * sign
    out, lse = reference.prefill_attention(q, k, v, causal=True, softmax_scale=scale)
    assert out.dtype == dtype
    for b in range(q.shape[0]):
        o, l = naive_prefill(q[b].double(), k[b].double(), v[b].double(), True, -1, -1, scale, 0.0)
        assert_close_to_naive(out[b], lse[b], o, l, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("magnitude", [1e2, 1e4, 1e5])
@pytest.mark.parametrize("paged", [False, True])
def test_append_then_decode_exact_at_extreme_logits(dtype, magnitude, paged):
    gen = seeded(int(magnitude) % 89 + paged)
    q4, k, v, scale = extreme_case(gen, dtype, magnitude, sq=1, sk=19)
    q = q4[:, 0]
    B, sk, hkv, d = k.shape
    lengths = [sk, 7]
    seqlens = lengths_tensor(lengths)
    k_cache = poison_contiguous(torch.zeros(B, 24, hkv, d, dtype=dtype), torch.zeros(B, dtype=torch.int32))
    v_cache = k_cache.clone()
    table = None
    if paged:
        k_cache, table = build_paged(k_cache, lengths_tensor([24] * B), 4, gen=seeded(5))
        v_cache = k_cache.clone()
    # Every sequence appends its sk tokens at positions 0..sk-1; decode then reads its first n_b.
    reference.append_kv(k, v, k_cache, v_cache, torch.zeros(B, dtype=torch.int32), block_table=table)
    out, lse = reference.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, softmax_scale=scale)
    ref_out, ref_lse = naive_decode(q.double(), lambda b, p: k[b, p].double(), lambda b, p: v[b, p].double(),
                                    lengths, -1, scale, 0.0)
    assert_close_to_naive(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_two_identical_keys_give_exactly_v_at_logits_near_minus_46000(dtype):
    # q = 64, k = -64 over D = 128: every score is -46341 (1/sqrt(128) scale); v = 1 -> out exactly 1.
    q = torch.full((1, 1, 1, 128), 64.0, dtype=dtype)
    k = torch.full((1, 2, 1, 128), -64.0, dtype=dtype)
    v = torch.ones(1, 2, 1, 128, dtype=dtype)
    out, lse = reference.prefill_attention(q, k, v)
    assert torch.equal(out, torch.ones_like(out))
    assert abs(lse.item() - (-64 * 64 * 128 / math.sqrt(128) + math.log(2))) < 0.01
    dec, _ = reference.decode_attention(q[:, 0], k, v, lengths_tensor([2]))
    assert torch.equal(dec, torch.ones_like(dec))


# --------------------------------------------------------------------------- merges of N states


def test_merge_states_of_n_parts_equals_attention_over_all_keys():
    gen = seeded(11)
    q = torch.randn(1, 3, 2, 8, generator=gen, dtype=F64)
    k = torch.randn(1, 17, 2, 8, generator=gen, dtype=F64)
    v = torch.randn(1, 17, 2, 8, generator=gen, dtype=F64)
    full, lse = reference.prefill_attention(q, k, v)
    cuts = [0, 3, 4, 11, 17]
    parts = [reference.prefill_attention(q, k[:, a:b], v[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    outs = torch.stack([o for o, _ in parts])
    lses = torch.stack([l.transpose(1, 2) for _, l in parts])
    out, merged = reference.merge_states(outs, lses)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(merged, lse.transpose(1, 2), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("empty", [float("-inf"), float("inf")])
def test_merge_treats_both_empty_conventions_alike_and_never_reads_an_empty_out(empty):
    gen = seeded(12)
    out_a = torch.randn(2, 3, 4, generator=gen)
    lse_a = torch.tensor([[0.5, empty, 1.0], [empty] * 3])
    out_b = torch.full((2, 3, 4), float("nan"))  # an empty state's out may be anything
    lse_b = torch.full((2, 3), empty)
    out, lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[0, 0], out_a[0, 0]) and torch.equal(out[0, 2], out_a[0, 2])
    assert torch.all(out[1] == 0) and torch.all(out[0, 1] == 0)
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, 1])
    assert lse[0, 0] == 0.5 and lse[0, 2] == 1.0
    out3, lse3 = reference.merge_states(torch.stack([out_b, out_a, out_b]), torch.stack([lse_b, lse_a, lse_b]))
    assert torch.equal(out3, out) and torch.equal(lse3, lse)


def test_merge_states_is_exact_at_large_lse_and_deterministic():
    gen = seeded(13)
    outs = torch.randn(5, 4, 3, 8, generator=gen)
    lses = (1e4 + torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)).float()
    ref_out, ref_lse = reference.merge_states(outs.double(), lses.double())
    out, lse = reference.merge_states(outs, lses)
    torch.testing.assert_close(out.double(), ref_out, atol=8 * 2.0 ** -23, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2.0 ** -10, rtol=0)
    again = reference.merge_states(outs, lses)
    assert torch.equal(again[0], out) and torch.equal(again[1], lse)
