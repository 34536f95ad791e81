"""Property-based tests (hypothesis) over shapes, page sizes, block-table permutations, windows and
split settings, against the reference. CI runs a fixed, derandomised profile of a dozen examples per
property; KVKERNELS_HYPOTHESIS=long runs 300 random ones."""

import os

import torch
from conftest import TRITON_DEVICE, assert_lse_close, assert_parity, build_paged, lengths_tensor, randn, seeded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvkernels
from kvkernels import reference

settings.register_profile("ci", max_examples=12, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("KVKERNELS_HYPOTHESIS", "ci"))


@st.composite
def decode_cases(draw):
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4, 5]))
    d = draw(st.sampled_from([16, 32, 64]))
    batch = draw(st.integers(1, 3))
    page_size = draw(st.sampled_from([1, 3, 4, 16]))
    lengths = draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch))
    return dict(
        hkv=hkv, hq=hkv * group, d=d, batch=batch, page_size=page_size, lengths=lengths,
        window_left=draw(st.sampled_from([-1, 0, 1, 7, 30])),
        softcap=draw(st.sampled_from([0.0, 0.0, 4.0])),
        num_splits=draw(st.sampled_from([0, 1, 2, 5])),
        dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])),
        logit_scale=draw(st.sampled_from([1.0, 8.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_decode_inputs(c):
    gen = seeded(c["seed"])
    smax = max(c["lengths"] + [1])
    q = randn(c["batch"], c["hq"], c["d"], dtype=c["dtype"], gen=gen, scale=c["logit_scale"])
    kd = randn(c["batch"], smax, c["hkv"], c["d"], dtype=c["dtype"], gen=gen)
    vd = randn(c["batch"], smax, c["hkv"], c["d"], dtype=c["dtype"], gen=gen)
    seqlens = lengths_tensor(c["lengths"])
    return q, kd, vd, seqlens


def paged_pair(kd, vd, seqlens, page_size, seed):
    kc, table = build_paged(kd, seqlens, page_size, gen=seeded(seed))
    vc, table_v = build_paged(vd, seqlens, page_size, gen=seeded(seed))
    assert torch.equal(table, table_v)  # same generator state: same page order for K and V
    return kc, vc, table


@given(decode_cases())
def test_paged_decode_equals_contiguous_decode_in_the_reference(c):
    q, kd, vd, seqlens = make_decode_inputs(c)
    kw = dict(window_left=c["window_left"], softcap=c["softcap"], return_lse=True, backend="reference")
    out_c, lse_c = kvkernels.decode_attention(q, kd, vd, seqlens, **kw)
    kc, vc, table = paged_pair(kd, vd, seqlens, c["page_size"], c["seed"])
    out_p, lse_p = kvkernels.decode_attention(q, kc, vc, seqlens, block_table=table, **kw)
    assert torch.equal(out_c, out_p) and torch.equal(lse_c, lse_p)


@given(decode_cases(), st.booleans())
def test_triton_decode_matches_reference(c, paged):
    q, kd, vd, seqlens = make_decode_inputs(c)
    if paged:
        kc, vc, table = paged_pair(kd, vd, seqlens, c["page_size"], c["seed"])
    else:
        kc, vc, table = kd, vd, None
    kw = dict(block_table=table, window_left=c["window_left"], softcap=c["softcap"])
    on = [x.to(TRITON_DEVICE) if x is not None else None for x in (q, kc, vc, seqlens, table)]
    out, lse = kvkernels.decode_attention(*on[:4], block_table=on[4], window_left=c["window_left"],
                                          softcap=c["softcap"], num_splits=c["num_splits"], return_lse=True,
                                          backend="triton")
    ref, ref_lse = reference.decode_attention(q, kc, vc, seqlens, **kw)
    ref_lp, _ = reference.decode_attention(q, kc, vc, seqlens, upcast=False, **kw)
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)


@st.composite
def append_cases(draw):
    batch = draw(st.integers(1, 3))
    page_size = draw(st.sampled_from([1, 2, 5, 16]))
    s_new = draw(st.integers(1, 6))
    starts = draw(st.lists(st.integers(0, 20), min_size=batch, max_size=batch))
    return dict(batch=batch, page_size=page_size, s_new=s_new, starts=starts, hkv=draw(st.sampled_from([1, 3])),
                d=draw(st.sampled_from([8, 64])), fp8=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                backend=draw(st.sampled_from(["reference", "triton"])))


@given(append_cases())
def test_paged_append_writes_only_its_slots_bit_exactly(c):
    gen = seeded(c["seed"])
    ps, b, s_new = c["page_size"], c["batch"], c["s_new"]
    pages_per_seq = -(-(max(c["starts"]) + s_new) // ps)
    num_pages = b * pages_per_seq + 2
    cache_dtype = torch.float8_e4m3fn if c["fp8"] else torch.float16
    kc = torch.full((num_pages, ps, c["hkv"], c["d"]), float("nan")).to(cache_dtype)
    vc = kc.clone()
    table = torch.randperm(num_pages, generator=gen)[:b * pages_per_seq].reshape(b, pages_per_seq).to(torch.int32)
    k = randn(b, s_new, c["hkv"], c["d"], gen=gen, scale=30.0)
    v = randn(b, s_new, c["hkv"], c["d"], gen=gen, scale=30.0)
    scales = dict(k_scale=torch.rand(c["hkv"], generator=gen) + 0.05, v_scale=torch.tensor(0.3)) if c["fp8"] else {}
    seqlens = lengths_tensor(c["starts"])
    expect_k, expect_v = kc.clone(), vc.clone()
    reference.append_kv(k, v, expect_k, expect_v, seqlens, block_table=table,
                        **{n: s.reshape(-1).expand(c["hkv"]) for n, s in scales.items()})
    dev = TRITON_DEVICE if c["backend"] == "triton" else "cpu"
    kc, vc = kc.to(dev), vc.to(dev)
    kvkernels.append_kv(k.to(dev), v.to(dev), kc, vc, seqlens.to(dev), block_table=table.to(dev),
                        backend=c["backend"], **{n: s.to(dev) for n, s in scales.items()})
    assert torch.equal(kc.cpu().view(torch.uint8), expect_k.view(torch.uint8))
    assert torch.equal(vc.cpu().view(torch.uint8), expect_v.view(torch.uint8))


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=4), st.booleans(),
       st.sampled_from([(-1, -1), (3, -1), (2, 2), (-1, 0)]), st.integers(0, 2**16))
def test_varlen_prefill_equals_per_sequence_dense(lens, causal, window, seed):
    gen = seeded(seed)
    hq, hkv, d = 4, 2, 16
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    cu_q = lengths_tensor([0] + torch.tensor(lq).cumsum(0).tolist())
    cu_k = lengths_tensor([0] + torch.tensor(lk).cumsum(0).tolist())
    q = randn(sum(lq), hq, d, gen=gen, dtype=torch.float32)
    k = randn(sum(lk), hkv, d, gen=gen, dtype=torch.float32)
    v = randn(sum(lk), hkv, d, gen=gen, dtype=torch.float32)
    out, lse = kvkernels.prefill_attention(q, k, v, causal=causal, window_size=window, cu_seqlens_q=cu_q,
                                           cu_seqlens_k=cu_k, return_lse=True)
    for i, (a, b) in enumerate(lens):
        qs, ks = int(cu_q[i]), int(cu_k[i])
        if a == 0:
            continue
        o, l = kvkernels.prefill_attention(q[qs:qs + a][None], k[ks:ks + b][None], v[ks:ks + b][None],
                                           causal=causal, window_size=window, return_lse=True)
        assert torch.equal(out[qs:qs + a], o[0])
        assert torch.equal(lse[:, qs:qs + a], l[0])

