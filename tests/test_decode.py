"""decode_attention against the oracle, for every backend, read like the contract (DESIGN.md 3-4).

Each case builds a dense cache in the kernel's dtype, computes the oracle on it (`ref`: fp32 math;
`ref_lp`: the same math naively in the low precision) and hands the backend the same data as a
contiguous cache with NaN past each sequence's length, or as shuffled pages with NaN in every
spare row and page. A backend that reads a slot it must not read returns NaN and fails.

Backends: "reference" (the oracle through the public API: gathering, poison, paging), "triton"
(interpreted on the CPU) and, on a GPU, "triton" and "cuda". A CUDA configuration the extension
declines (unsupported() gives a reason) is skipped with that reason; Triton never skips.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import (HAS_CUDA, assert_lse_close, assert_parity, build_paged, kernel_backends, lengths_tensor,
                      poison_contiguous, randn, run_or_skip, seeded)

import kvkernels
from kvkernels import api, decode_plan, reference

FP8 = torch.float8_e4m3fn
FP8_FORMATS = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]
BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *kernel_backends()]
KERNEL_BACKENDS = kernel_backends()


# ------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    q: torch.Tensor                  # [B, Hq, D] on the device
    k: torch.Tensor                  # dense [B, S, Hkv, D] on the CPU, kernel dtype (or fp8): the oracle's input
    v: torch.Tensor
    lens: torch.Tensor               # [B] int32 on the CPU
    k_cache: torch.Tensor            # what the backend gets (contiguous poisoned, or paged), on the device
    v_cache: torch.Tensor
    seqlens: torch.Tensor            # [B] int32 on the device
    block_table: torch.Tensor | None
    k_scale: torch.Tensor | None     # as passed to the API ([] or [Hkv]), on the device
    v_scale: torch.Tensor | None


def make_case(lens, *, hq=4, hkv=2, d=64, dtype=torch.float16, page_size=None, capacity=None, q_scale=1.0,
              fp8_scales=None, fp8=FP8, device="cpu", seed=0) -> Case:
    """page_size None: contiguous [B, capacity, Hkv, D]; else shuffled pages of that size.
    fp8_scales: None, "tensor" (shape []) or "head" (shape [Hkv]): the cache holds fp8 values of
    format fp8 (float8_e4m3fn or float8_e5m2)."""
    gen = seeded(seed)
    lens = lengths_tensor(lens)
    B = lens.numel()
    S = capacity if capacity is not None else max(lens.tolist(), default=0) + 3
    q = randn(B, hq, d, dtype=dtype, gen=gen, scale=q_scale)
    k = randn(B, S, hkv, d, dtype=dtype, gen=gen)
    v = randn(B, S, hkv, d, dtype=dtype, gen=gen)
    k_scale = v_scale = None
    if fp8_scales is not None:
        if fp8_scales == "tensor":
            k_scale, v_scale = torch.tensor(0.37), torch.tensor(1.9)
        else:
            k_scale = torch.rand(hkv, generator=gen) + 0.2
            v_scale = torch.rand(hkv, generator=gen) * 3 + 0.1
        # Values beyond e4m3's range saturate, as the cache would hold them.
        k = reference.quantize(k * 4, k_scale, fp8)
        v = reference.quantize(v * 4, v_scale, fp8)
    if page_size is None:
        kc, vc = poison_contiguous(k.clone(), lens), poison_contiguous(v.clone(), lens)
        table = None
    else:
        kc, table = build_paged(k, lens, page_size, gen=seeded(seed + 1))
        vc, table_v = build_paged(v, lens, page_size, gen=seeded(seed + 1))
        assert torch.equal(table, table_v)
    to = (lambda x: None if x is None else x.to(device))
    return Case(q=q.to(device), k=k, v=v, lens=lens, k_cache=kc.to(device), v_cache=vc.to(device),
                seqlens=lens.to(device), block_table=to(table), k_scale=to(k_scale), v_scale=to(v_scale))


def run(backend, case: Case, **kw):
    """decode_attention through the public API -> (out, lse) on the CPU."""
    out, lse = run_or_skip(backend, lambda: kvkernels.decode_attention(
        case.q, case.k_cache, case.v_cache, case.seqlens, block_table=case.block_table, k_scale=case.k_scale,
        v_scale=case.v_scale, return_lse=True, backend=backend, **kw))
    assert out.dtype == case.q.dtype and out.shape == case.q.shape and out.device == case.q.device
    assert lse.dtype == torch.float32 and lse.shape == case.q.shape[:2]
    return out.cpu(), lse.cpu()


def oracle_on(q, k, v, lens, *, k_scale=None, v_scale=None, **kw):
    """(ref out fp32, ref lse, ref_lp out): the fp32 oracle and the naive low-precision math on a dense
    [B, S, Hkv, D] cache (CPU)."""
    hkv = k.shape[2]
    norm = (lambda s: None if s is None else s.cpu().reshape(-1).expand(hkv))
    kw.update(k_scale=norm(k_scale), v_scale=norm(v_scale))
    q = q.cpu()
    ref, ref_lse = reference.decode_attention(q.float(), k, v, lens, **kw)
    ref_lp, _ = reference.decode_attention(q, k, v, lens, upcast=False, **kw)
    return ref, ref_lse, ref_lp


def oracle(case: Case, **kw):
    return oracle_on(case.q, case.k, case.v, case.lens, k_scale=case.k_scale, v_scale=case.v_scale, **kw)


def check(backend, case: Case, **kw):
    """Run the backend and hold it to the parity contract; returns (out, lse)."""
    out, lse = run(backend, case, **kw)
    oracle_kw = {k: kw[k] for k in ("softmax_scale", "window_left", "softcap") if k in kw}
    ref, ref_lse, ref_lp = oracle(case, **oracle_kw)
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)
    return out, lse


def boundary_lengths(page_size):
    """1, 17, 113 and both sides of a page (or KV tile) boundary."""
    p = page_size or 64
    return (1, 17, 113, 2 * p - 1, 2 * p + 1)


LAYOUTS = [pytest.param(None, id="contiguous"), pytest.param(1, id="page1"), pytest.param(16, id="page16"),
           pytest.param(5, id="page5"), pytest.param(48, id="page48")]


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("page_size", LAYOUTS)
def test_parity_contiguous_and_paged(backend, device, dtype, page_size):
    case = make_case(boundary_lengths(page_size), dtype=dtype, page_size=page_size, device=device)
    check(backend, case)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("page_size,num_splits", [(None, 1), (16, 4)], ids=["contiguous", "page16-4splits"])
def test_parity_with_large_magnitude_logits(backend, device, dtype, page_size, num_splits):
    # q * 30: logits in the hundreds, a near one-hot softmax; the running max must keep exp finite.
    case = make_case((1, 17, 113, 200), dtype=dtype, page_size=page_size, q_scale=30.0, device=device)
    check(backend, case, num_splits=num_splits)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("hq,hkv,page_size", [(2, 2, None), (2, 2, 16), (2, 2, 64), (4, 1, None), (4, 1, 64),
                                               (8, 1, 16), (16, 2, None), (6, 2, 5), (80, 1, 16)],
                         ids=["mha-contiguous", "mha-page16", "mha-page64", "group4-contiguous", "group4-page64",
                              "group8-page16", "group8x2-contiguous", "group3-page5", "group80-page16"])
def test_parity_across_gqa_groups(backend, device, hq, hkv, page_size):
    case = make_case((17, 65), hq=hq, hkv=hkv, d=32, page_size=page_size, device=device)
    check(backend, case)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("d,dtype", [(128, torch.float16), (128, torch.bfloat16), (8, torch.float16),
                                     (80, torch.bfloat16), (96, torch.float16), (256, torch.float16)],
                         ids=["d128-fp16", "d128-bf16", "d8", "d80", "d96", "d256"])
def test_parity_across_head_dims(backend, device, d, dtype):
    case = make_case((1, 70, 113), hq=4, hkv=2, d=d, dtype=dtype, page_size=16, device=device)
    check(backend, case)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("d", [32, 96, 128, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("page_size", [None, 1, 7, 32, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 4)])
def test_parity_large_grid(backend, device, d, dtype, page_size, hq, hkv):
    case = make_case((1, 17, 113, 511, 2 * (page_size or 64) + 1), hq=hq, hkv=hkv, d=d, dtype=dtype,
                     page_size=page_size, device=device, seed=d + hq)
    check(backend, case)


# ---------------------------------------------------------------------------- masking, empty


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_empty_sequences_give_zero_and_neg_inf(backend, device, page_size):
    case = make_case((0, 5, 0, 70), page_size=page_size, device=device)
    out, lse = check(backend, case, num_splits=2)
    for b in (0, 2):
        assert torch.equal(out[b], torch.zeros_like(out[b]))
        assert torch.isneginf(lse[b]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_sequences_empty_and_empty_batch(backend, device):
    case = make_case((0, 0), page_size=4, capacity=8, device=device)
    out, lse = run(backend, case)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    empty = make_case((), capacity=4, device=device)
    out, lse = run(backend, empty)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("window_left", [0, 5, 64, 200])
@pytest.mark.parametrize("page_size,num_splits", [(None, 1), (16, 3)], ids=["contiguous", "page16-3splits"])
def test_parity_with_window_left(backend, device, window_left, page_size, num_splits):
    case = make_case((1, 17, 113, 300), page_size=page_size, device=device)
    check(backend, case, window_left=window_left, num_splits=num_splits)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_window_never_reads_tiles_before_it(backend, device, page_size):
    # Positions in whole 256-token blocks before the window start are NaN: a kernel that loads them
    # (even to mask their scores afterwards) returns NaN. The oracle sees the clean cache.
    window_left = 100
    case = make_case((700, 300, 17), page_size=page_size, device=device)
    clean = make_case((700, 300, 17), page_size=page_size, device=device)
    for b, n in enumerate(case.lens.tolist()):
        cut = max(n - 1 - window_left, 0) // 256 * 256
        for cache in (case.k_cache, case.v_cache):
            if page_size is None:
                cache[b, :cut] = float("nan")
            else:
                for p in range(cut // page_size):
                    cache[int(case.block_table[b, p])] = float("nan")
    out, lse = run(backend, case, window_left=window_left)
    ref, ref_lse, ref_lp = oracle(clean, window_left=window_left)
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("softcap", [2.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_parity_with_softcap(backend, device, softcap, dtype):
    case = make_case((1, 17, 113), dtype=dtype, page_size=16, q_scale=10.0, device=device)
    check(backend, case, softcap=softcap, softmax_scale=0.3)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fp8", FP8_FORMATS)
@pytest.mark.parametrize("scales", ["tensor", "head"])
@pytest.mark.parametrize("dtype,page_size", [(torch.float16, None), (torch.bfloat16, 16), (torch.float16, 5)],
                         ids=["fp16-contiguous", "bf16-page16", "fp16-page5"])
def test_parity_with_fp8_cache(backend, device, scales, dtype, page_size, fp8):
    case = make_case((1, 17, 113, 65), hq=8, hkv=2, dtype=dtype, page_size=page_size, fp8_scales=scales, fp8=fp8,
                     device=device)
    check(backend, case)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fp8", FP8_FORMATS)
def test_parity_with_fp8_cache_mha_and_splits(backend, device, fp8):
    case = make_case((17, 200), hq=2, hkv=2, page_size=64, fp8_scales="head", fp8=fp8, device=device)
    check(backend, case, num_splits=3, softcap=20.0, window_left=150)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_e5m2_cache_reads_every_code_exactly(backend, device, dtype):
    """Every finite e5m2 code (subnormals, +-0, +-57344; +-inf sits past the lengths) reads back exactly: one-hot attention (one huge score per query head) returns the value
    row of the key it picks, times v_scale, which a widening that lost a bit would change."""
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[torch.isfinite(codes.view(torch.float8_e5m2).float())]  # 248 codes
    d, hq, hkv = 64, 4, 1
    rows = -(-finite.numel() // d)  # value rows holding every finite code once
    v = torch.zeros(rows + 1, d, dtype=torch.uint8)
    v.view(-1)[:finite.numel()] = finite
    v[rows, : d // 2], v[rows, d // 2:] = 0x7C, 0xFC  # +-inf: in the cache, past every sequence's length
    # key r is the one-hot direction r: query head h looks at key h (of the rows)
    k = torch.zeros(rows + 1, d, dtype=torch.uint8)
    for r in range(rows + 1):
        k[r, r] = 0x3C  # 1.0
    k = k.view(torch.float8_e5m2)
    v = v.view(torch.float8_e5m2)
    length = rows + 1
    kc = torch.zeros(hq, length + 3, hkv, d, dtype=torch.float8_e5m2)
    vc = torch.zeros_like(kc)
    kc[:, :length, 0] = k
    vc[:, :length, 0] = v
    q = torch.zeros(hq, hq, d, dtype=dtype)
    for b in range(hq):
        q[b, :, b] = 1000.0  # sequence b attends one-hot to key b ... of its first `rows` positions
    lens = torch.full((hq,), rows, dtype=torch.int32)
    out = run_or_skip(backend, lambda: kvkernels.decode_attention(
        q.to(device), kc.to(device), vc.to(device), lens.to(device), k_scale=1.0, v_scale=1.0, backend=backend))
    want = v[:hq].float()  # [hq (sequence b -> key b), D]
    assert torch.equal(out.cpu().float()[:, 0], want), "an e5m2 code did not read back exactly"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unused_block_table_entries_are_never_read(backend, device):
    # Columns past a sequence's last page may hold anything, even indices that are not pages.
    case = make_case((1, 17, 40), page_size=16, device=device)
    table = case.block_table.clone()
    for b, n in enumerate(case.lens.tolist()):
        used = -(-n // 16)
        table[b, used:] = -1 if b % 2 else 2 ** 31 - 1
    case.block_table = table
    check(backend, case)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_out_of_range_lengths_and_pages_are_skipped(backend, device):
    # Bad indices on device tensors are not checked (that would cost a synchronisation), yet a kernel
    # must never read outside the cache: a length past the capacity counts as the capacity, rows of
    # a page index outside [0, num_pages) are skipped. Called through the backend's entry point,
    # past the API's validation.
    entry = api.get_backend(backend).decode_attention
    scale = 0.125

    case = make_case((30, 48), capacity=48, device=device)  # sequence 1 fills the whole cache
    seqlens = lengths_tensor([30, 48 + 1000]).to(device)
    out, lse = entry(case.q, case.k_cache, case.v_cache, seqlens, None, scale, -1, 0.0, None, None, 0, False)
    ref, ref_lse, ref_lp = oracle_on(case.q, case.k, case.v, case.lens, softmax_scale=scale)
    assert_parity(out.cpu(), ref, ref_lp)
    assert_lse_close(lse.cpu(), ref_lse)

    case = make_case((40, 20), page_size=16, device=device)
    table = case.block_table.clone()
    table[0, 1] = -7                       # rows 16..31 of sequence 0 are skipped
    table[1, 0] = case.k_cache.shape[0]    # rows 0..15 of sequence 1 are skipped
    out, lse = entry(case.q, case.k_cache, case.v_cache, case.seqlens, table, scale, -1, 0.0, None, None, 0, False)
    kept = [torch.cat([torch.arange(0, 16), torch.arange(32, 40)]), torch.arange(16, 20)]
    k = torch.stack([torch.nn.functional.pad(case.k[b, i], (0, 0, 0, 0, 0, 24 - len(i))) for b, i in enumerate(kept)])
    v = torch.stack([torch.nn.functional.pad(case.v[b, i], (0, 0, 0, 0, 0, 24 - len(i))) for b, i in enumerate(kept)])
    ref, ref_lse, ref_lp = oracle_on(case.q, k, v, lengths_tensor([24, 4]), softmax_scale=scale)
    assert_parity(out.cpu(), ref, ref_lp)
    assert_lse_close(lse.cpu(), ref_lse)


# ------------------------------------------------------------------------------ split-KV


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 5, 64])
@pytest.mark.parametrize("hq,page_size", [(4, None), (2, 48)], ids=["group2-contiguous", "mha-page48"])
def test_parity_for_any_num_splits(backend, device, num_splits, hq, page_size):
    case = make_case((1, 17, 113, 600, 1025), hq=hq, hkv=2, page_size=page_size, capacity=1100, device=device)
    check(backend, case, num_splits=num_splits)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_reruns_are_bit_identical(backend, device, page_size):
    case = make_case((17, 300, 113), page_size=page_size, capacity=320, device=device)
    for num_splits in (0, 6):
        out1, lse1 = run(backend, case, num_splits=num_splits)
        out2, lse2 = run(backend, case, num_splits=num_splits)
        assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_batch_invariant_mode_gives_same_bits_alone_and_in_a_batch(backend, device, page_size):
    capacity, B, long = 8192, 16, 3001
    # Without batch-invariant mode the heuristic cuts this capacity differently for 1 and 16
    # sequences, so the same bits are not a given.
    assert (decode_plan.plan_splits(1, 1, capacity, granule=64) != decode_plan.plan_splits(B, 1, capacity, granule=64))
    lens = [long] + [int(x) for x in torch.randint(1, 300, (B - 1,), generator=seeded(3))]
    case = make_case(lens, hq=4, hkv=1, page_size=page_size, capacity=capacity, device=device)
    with kvkernels.set_batch_invariant():
        out_all, lse_all = run(backend, case)
        alone = Case(q=case.q[:1], k=case.k[:1], v=case.v[:1], lens=case.lens[:1],
                     k_cache=case.k_cache if page_size else case.k_cache[:1],
                     v_cache=case.v_cache if page_size else case.v_cache[:1],
                     seqlens=case.seqlens[:1], block_table=None if page_size is None else case.block_table[:1],
                     k_scale=None, v_scale=None)
        out_one, lse_one = run(backend, alone)
    assert torch.equal(out_one[0], out_all[0]) and torch.equal(lse_one[0], lse_all[0])
    ref, ref_lse, ref_lp = oracle(alone)
    assert_parity(out_one, ref, ref_lp)
    assert_lse_close(lse_one, ref_lse)


# ---------------------------------------------------------------------------------- strides


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_strided_views_are_read_through_their_strides(backend, device, page_size):
    # q a slice of a wider buffer; K and V halves of one [.., 2 * Hkv, D] allocation; cache_seqlens
    # and block_table every other element of a wider tensor.
    case = make_case((17, 113), hq=4, hkv=2, page_size=page_size, device=device)
    wide_q = torch.zeros(2, 4, 96, dtype=case.q.dtype, device=device)
    wide_q[..., :64] = case.q
    kv = torch.cat([case.k_cache, case.v_cache], dim=2)
    every_other = (lambda x: None if x is None else torch.stack([x, torch.full_like(x, -5)], dim=-1)[..., 0])
    strided = Case(q=wide_q[..., :64], k=case.k, v=case.v, lens=case.lens, k_cache=kv[:, :, :2],
                   v_cache=kv[:, :, 2:], seqlens=every_other(case.seqlens), block_table=every_other(case.block_table),
                   k_scale=None, v_scale=None)
    assert not strided.k_cache.is_contiguous() and not strided.q.is_contiguous()
    assert strided.seqlens.stride(0) == 2 and (page_size is None or strided.block_table.stride(1) == 2)
    out, lse = check(backend, strided)
    assert torch.equal(out, run(backend, case)[0])


# ------------------------------------------------------------------------------ GPU-only


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_follows_new_lengths(backend):
    case = make_case((17, 300, 5), hq=8, hkv=2, page_size=16, capacity=320, device="cuda")
    kw = dict(block_table=case.block_table, return_lse=True, backend=backend)
    run_or_skip(backend, lambda: kvkernels.decode_attention(case.q, case.k_cache, case.v_cache, case.seqlens, **kw),
                declining=("cuda", "triton"))  # compile, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = kvkernels.decode_attention(case.q, case.k_cache, case.v_cache, case.seqlens, **kw)
    # Same page counts (so the same cache shapes), new lengths, values, page order and queries.
    new = make_case((300, 17, 5), hq=8, hkv=2, page_size=16, capacity=320, device="cuda", seed=9)
    case.q.copy_(new.q)
    case.seqlens.copy_(new.seqlens)
    case.k_cache.copy_(new.k_cache)
    case.v_cache.copy_(new.v_cache)
    case.block_table.copy_(new.block_table)
    graph.replay()
    torch.cuda.synchronize()
    ref, ref_lse, ref_lp = oracle(new)
    assert_parity(out.cpu(), ref, ref_lp)
    assert_lse_close(lse.cpu(), ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("page_size", [None, 16, 7])
def test_triton_and_cuda_agree(dtype, page_size):
    case = make_case((1, 17, 113, 511, 4000), hq=32, hkv=8, d=128, dtype=dtype, page_size=page_size,
                     capacity=4096, device="cuda")
    tri, _ = run("triton", case)
    cu, _ = run("cuda", case)
    ref, _, ref_lp = oracle(case)
    # The two kernels differ by no more than the parity budget each has against the oracle.
    diff = (cu.double() - tri.double()).abs().max().item()
    budget = 2 * (ref_lp.double() - ref.double()).abs().max().item() + 1e-5
    assert diff <= budget, f"cuda vs triton: {diff:.3e} > {budget:.3e}"


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("what,match", [("fp32", "fp16/bf16"), ("page300", "page size 300")])
def test_triton_refuses_unsupported_configs_with_a_reason(what, match):
    device = "cuda" if HAS_CUDA else "cpu"
    if what == "fp32":
        case = make_case((3,), dtype=torch.float32, device=device)
    else:
        case = make_case((3,), page_size=300, device=device)
    with pytest.raises(ValueError, match=match):
        run("triton", case)
