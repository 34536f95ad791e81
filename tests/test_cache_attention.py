"""cache_attention against the oracle, for every backend, read like the contract (DESIGN.md 3-4).

Several new queries per sequence against a cache that already holds their keys and values: query i
of sequence b sits at p = cache_seqlens[b] - n_b + i and sees [0, p] (causal) or [0, L_b), and only
positions >= p - window_left with a window. Each case builds a dense cache in the kernel's dtype,
computes the oracle on it, and hands the backend the same data as a contiguous cache with NaN past
each sequence's length, or as shuffled pages with NaN in every spare row and page.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import (HAS_EMULATOR, assert_lse_close, assert_parity, build_paged, kernel_backends, lengths_tensor,
                      poison_contiguous, randn, run_or_skip, seeded)

import kvkernels
import kvkernels.cuda
from kvkernels import reference

FP8 = torch.float8_e4m3fn
FP8_FORMATS = [pytest.param(torch.float8_e4m3fn, id="e4m3"), pytest.param(torch.float8_e5m2, id="e5m2")]
BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *kernel_backends()]
KERNEL_BACKENDS = kernel_backends()


@dataclass
class Case:
    q: torch.Tensor                  # dense [B, Sq, Hq, D] or ragged [Tq, Hq, D], on the device
    cu_q: torch.Tensor | None        # ragged: int32 [B+1] on the device
    k: torch.Tensor                  # dense [B, S, Hkv, D] on the CPU: the oracle's input
    v: torch.Tensor
    lens: torch.Tensor               # [B] int32 on the CPU, counting the new tokens
    k_cache: torch.Tensor            # what the backend gets (contiguous poisoned, or paged), on the device
    v_cache: torch.Tensor
    seqlens: torch.Tensor
    block_table: torch.Tensor | None
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


def make_case(lens, n_q, *, hq=4, hkv=2, d=32, dtype=torch.float16, page_size=None, ragged=None, q_scale=1.0,
              fp8_scales=None, fp8=FP8, device="cpu", seed=0) -> Case:
    """lens: cached tokens per sequence (including the new ones); n_q: an int (dense q [B, n_q, ...])
    or a list of per-sequence query counts (ragged q). fp8_scales: the cache holds fp8 values of
    format fp8 (float8_e4m3fn or float8_e5m2)."""
    gen = seeded(seed)
    lens = lengths_tensor(lens)
    B = lens.numel()
    S = max(lens.tolist(), default=0) + 3
    ragged = not isinstance(n_q, int) if ragged is None else ragged
    if ragged:
        counts = list(n_q) if not isinstance(n_q, int) else [n_q] * B
        cu = torch.tensor([0] + torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
        q = randn(int(cu[-1]), hq, d, dtype=dtype, gen=gen, scale=q_scale)
    else:
        cu = None
        q = randn(B, n_q, hq, d, dtype=dtype, gen=gen, scale=q_scale)
    k = randn(B, S, hkv, d, dtype=dtype, gen=gen)
    v = randn(B, S, hkv, d, dtype=dtype, gen=gen)
    k_scale = v_scale = None
    if fp8_scales is not None:
        if fp8_scales == "tensor":
            k_scale, v_scale = torch.tensor(0.37), torch.tensor(1.9)
        else:
            k_scale = torch.rand(hkv, generator=gen) + 0.2
            v_scale = torch.rand(hkv, generator=gen) * 3 + 0.1
        k = reference.quantize(k * 4, k_scale, fp8)
        v = reference.quantize(v * 4, v_scale, fp8)
    if page_size is None:
        kc, vc, table = poison_contiguous(k.clone(), lens), poison_contiguous(v.clone(), lens), None
    else:
        kc, table = build_paged(k, lens, page_size, gen=seeded(seed + 1))
        vc, _ = build_paged(v, lens, page_size, gen=seeded(seed + 1))
    to = (lambda x: None if x is None else x.to(device))
    return Case(q=q.to(device), cu_q=to(cu), k=k, v=v, lens=lens, k_cache=kc.to(device), v_cache=vc.to(device),
                seqlens=lens.to(device), block_table=to(table), k_scale=to(k_scale), v_scale=to(v_scale))


def run(backend, case: Case, **kw):
    out, lse = run_or_skip(backend, lambda: kvkernels.cache_attention(
        case.q, case.k_cache, case.v_cache, case.seqlens, cu_seqlens_q=case.cu_q, block_table=case.block_table,
        k_scale=case.k_scale, v_scale=case.v_scale, return_lse=True, backend=backend, **kw))
    assert out.dtype == case.q.dtype and out.shape == case.q.shape and out.device == case.q.device
    want = (case.q.shape[1], case.q.shape[0]) if case.cu_q is not None else \
        (case.q.shape[0], case.q.shape[2], case.q.shape[1])
    assert lse.dtype == torch.float32 and tuple(lse.shape) == want
    return out.cpu(), lse.cpu()


def oracle(case: Case, **kw):
    """(ref out fp32, ref lse, ref_lp out) on the dense cache (CPU)."""
    hkv = case.k.shape[2]
    norm = (lambda s: None if s is None else s.cpu().reshape(-1).expand(hkv))
    kw = {key: kw[key] for key in ("softmax_scale", "window_left", "softcap", "causal") if key in kw}
    kw.update(k_scale=norm(case.k_scale), v_scale=norm(case.v_scale),
              cu_seqlens_q=None if case.cu_q is None else case.cu_q.cpu())
    q = case.q.cpu()
    ref, ref_lse = reference.cache_attention(q.float(), case.k, case.v, case.lens, **kw)
    ref_lp, _ = reference.cache_attention(q, case.k, case.v, case.lens, upcast=False, **kw)
    return ref, ref_lse, ref_lp


def check(backend, case: Case, **kw):
    out, lse = run(backend, case, **kw)
    ref, ref_lse, ref_lp = oracle(case, **kw)
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)
    return out, lse


# ------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n_q", [1, 2, 7], ids=lambda n: f"sq{n}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_parity_dense_queries(backend, device, n_q, causal, page_size):
    case = make_case((17, 113, 33, 7), n_q, page_size=page_size, device=device, seed=n_q)
    check(backend, case, causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 1, 16, 256], ids=["contiguous", "page1", "page16", "page256"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_parity_ragged_mixed_batch(backend, device, page_size, dtype):
    # A mixed batch: a decode (1 query), an idle sequence (0), a speculative step (7), a prompt
    # chunk (64) and a whole prompt (its queries are all its tokens).
    lens, counts = (40, 31, 70, 130, 64), (1, 0, 7, 64, 64)
    case = make_case(lens, counts, page_size=page_size, dtype=dtype, device=device, seed=page_size or 3)
    check(backend, case)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_parity_long_chunk_of_513_queries(backend, device):
    # More rows than one tile: row tiles above the causal diagonal are skipped, partial ones masked.
    case = make_case((600, 513), (513, 200), hq=1, hkv=1, d=16, page_size=16, device=device, seed=9)
    check(backend, case)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1), (16, 1)], ids=["mha", "group4", "group8", "group16"])
def test_parity_across_gqa_groups(backend, device, hq, hkv):
    case = make_case((50, 9), (5, 3), hq=hq, hkv=hkv, d=16, page_size=16, device=device, seed=hq)
    check(backend, case)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("d,dtype", [(64, torch.float16), (128, torch.bfloat16), (256, torch.float16),
                                     (80, torch.float16)], ids=["d64", "d128-bf16", "d256", "d80"])
def test_parity_across_head_dims(backend, device, d, dtype):
    case = make_case((70, 20), (3, 20), hq=2, hkv=1, d=d, dtype=dtype, page_size=16, device=device, seed=d)
    check(backend, case)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("window_left", [0, 3, 40])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_parity_with_window(backend, device, window_left, causal):
    case = make_case((90, 17, 6), (9, 4, 6), page_size=16, device=device, seed=window_left)
    check(backend, case, window_left=window_left, causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("softcap", [2.0, 30.0])
def test_parity_with_softcap_and_large_logits(backend, device, softcap):
    case = make_case((60, 17), 4, page_size=16, q_scale=10.0, device=device)
    check(backend, case, softcap=softcap, softmax_scale=0.3)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fp8", FP8_FORMATS)
@pytest.mark.parametrize("scales", ["tensor", "head"])
@pytest.mark.parametrize("page_size", [None, 5], ids=["contiguous", "page5"])
def test_parity_with_fp8_cache(backend, device, scales, page_size, fp8):
    case = make_case((40, 17), (4, 2), hq=8, hkv=2, page_size=page_size, fp8_scales=scales, fp8=fp8, device=device)
    check(backend, case)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("num_splits", [2, 5])
def test_parity_with_kv_splits(backend, device, num_splits):
    case = make_case((300, 45, 1), (4, 3, 1), page_size=16, device=device)
    check(backend, case, num_splits=num_splits)
    dense = make_case((300, 45), 3, device=device)
    check(backend, dense, num_splits=num_splits)


# ----------------------------------------------------------------------- the contract's corners


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_decode_is_cache_attention_with_one_query(backend, device):
    case = make_case((17, 113, 0, 64), 1, page_size=16, device=device)
    out, lse = run(backend, case)
    dec, dec_lse = run_or_skip(backend, lambda: kvkernels.decode_attention(
        case.q[:, 0], case.k_cache, case.v_cache, case.seqlens, block_table=case.block_table, return_lse=True,
        backend=backend))
    ref, ref_lse, ref_lp = oracle(case)
    assert_parity(dec.cpu(), ref[:, 0], ref_lp[:, 0])
    assert_parity(out[:, 0], ref[:, 0], ref_lp[:, 0])
    assert_lse_close(dec_lse.cpu(), lse[:, :, 0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_queries_that_see_nothing_and_empty_sequences(backend, device):
    # A sequence with no queries (n_b = 0) and one whose cache is empty: nothing is written for the
    # first, and every backend agrees on shapes; window 0 non-causal still sees the query's own position.
    case = make_case((0, 12, 5), (0, 3, 5), page_size=4, device=device)
    out, lse = check(backend, case)
    assert out.shape[0] == 8 and lse.shape == (4, 8)
    full = make_case((5,), 5, device=device)
    out, lse = check(backend, full, window_left=0, causal=False)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch_and_no_queries(backend, device):
    case = make_case((), 2, device=device)
    out, lse = run(backend, case)
    assert out.shape == (0, 2, 4, 32) and lse.shape == (0, 4, 2)
    none = make_case((3, 4), [0, 0], device=device)
    out, lse = run(backend, none)
    assert out.shape == (0, 4, 32) and lse.shape == (4, 0)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_results_do_not_depend_on_num_splits_beyond_rounding_and_are_deterministic(backend, device):
    case = make_case((300, 77), (6, 2), page_size=16, device=device)
    one, lse1 = run(backend, case, num_splits=1)
    four, lse4 = run(backend, case, num_splits=4)
    ref, _, ref_lp = oracle(case)
    assert_parity(one, ref, ref_lp)
    assert_parity(four, ref, ref_lp)
    torch.testing.assert_close(lse1, lse4, atol=1e-5, rtol=1e-6)
    again, lse_again = run(backend, case, num_splits=4)
    assert torch.equal(again, four) and torch.equal(lse_again, lse4)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_batch_invariant_mode_gives_each_sequence_the_same_bits(backend, device):
    big = make_case((2500, 40, 9), (3, 3, 3), page_size=16, device=device, seed=4)
    with kvkernels.set_batch_invariant():
        out_all, _ = run(backend, big)
        alone = Case(q=big.q[:3], cu_q=torch.tensor([0, 3], dtype=torch.int32, device=device), k=big.k[:1],
                     v=big.v[:1], lens=big.lens[:1], k_cache=big.k_cache, v_cache=big.v_cache,
                     seqlens=big.seqlens[:1], block_table=big.block_table[:1], k_scale=None, v_scale=None)
        out_one, _ = run(backend, alone)
    assert torch.equal(out_all[:3], out_one)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unused_block_table_entries_are_never_read(backend, device):
    case = make_case((20, 40), (2, 5), page_size=16, device=device)
    table = case.block_table.clone()
    for b, n in enumerate(case.lens.tolist()):
        table[b, -(-n // 16):] = -7  # past the last page: anything, even a non-page
    case.block_table = table
    check(backend, case)


# ----------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error_before_any_launch():
    case = make_case((5, 6), (2, 3))
    args = (case.k_cache, case.v_cache, case.seqlens)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        kvkernels.cache_attention(case.q, *args)
    with pytest.raises(ValueError, match="max_seqlen_q = 2 is smaller"):
        kvkernels.cache_attention(case.q, *args, cu_seqlens_q=case.cu_q, max_seqlen_q=2)
    with pytest.raises(ValueError, match="cu_seqlens_q\\[-1\\]"):
        kvkernels.cache_attention(case.q[:4], *args, cu_seqlens_q=case.cu_q)
    with pytest.raises(ValueError, match="the cache must already hold the queries"):
        kvkernels.cache_attention(case.q, case.k_cache, case.v_cache, lengths_tensor([5, 2]), cu_seqlens_q=case.cu_q)
    dense = make_case((5, 6), 2)
    with pytest.raises(ValueError, match="only for ragged"):
        kvkernels.cache_attention(dense.q, dense.k_cache, dense.v_cache, dense.seqlens, max_seqlen_q=2)
    with pytest.raises(TypeError, match="causal must be a bool"):
        kvkernels.cache_attention(dense.q, dense.k_cache, dense.v_cache, dense.seqlens, causal=1)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 99 exceeds the cache.s capacity"):
        kvkernels.cache_attention(dense.q, dense.k_cache, dense.v_cache, lengths_tensor([5, 99]))
    with pytest.raises(ValueError, match="whole multiple"):
        kvkernels.cache_attention(dense.q[:, :, :3], dense.k_cache, dense.v_cache, dense.seqlens)


# ---------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("ragged,paged", [(False, False), (True, True)])
def test_opcheck_and_compile(ragged, paged):
    case = make_case((9, 6), [3, 2] if ragged else 2, d=16, page_size=4 if paged else None)
    from kvkernels import api
    args = (case.q, case.k_cache, case.v_cache, case.seqlens, case.cu_q, 3 if ragged else 2, case.block_table,
            True, 0.25, -1, 0.0, None, None, 0, False, "reference")
    torch.library.opcheck(api._cache_attention_op, args, test_utils=("test_schema", "test_faketensor",
                                                                     "test_aot_dispatch_dynamic"))

    def step(q, kc, vc, sl, cu, bt):
        return kvkernels.cache_attention(q, kc, vc, sl, cu_seqlens_q=cu, max_seqlen_q=3 if ragged else None,
                                         block_table=bt)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(case.q, case.k_cache, case.v_cache, case.seqlens, case.cu_q, case.block_table)
    want = step(case.q, case.k_cache, case.v_cache, case.seqlens, case.cu_q, case.block_table)
    assert torch.equal(got, want)


# --------------------------------------------------------- the CUDA kernel (emulator / GPU)
#
# The CUDA kernels take head dims 64/128/256 only, so the d = 16/32 cases above skip for them; these
# run the same contract at the kernels' head dims (in the emulator on CPU tensors, where each CUDA
# thread is a fiber: shapes stay small, big cases are marked slow).

CUDA_BACKENDS = [p for p in KERNEL_BACKENDS if p.values[0] == "cuda"]


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("page_size", [None, 1, 16, 256], ids=["contiguous", "page1", "page16", "page256"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_parity_ragged_mixed_batch(backend, device, page_size, dtype):
    # decode (1 query), idle (0), speculative (7), prompt chunk (64), whole prompt (64 of 64)
    lens, counts = (40, 31, 70, 130, 64), (1, 0, 7, 64, 64)
    case = make_case(lens, counts, hq=4, hkv=1, d=64, page_size=page_size, dtype=dtype, device=device,
                     seed=page_size or 3)
    check(backend, case)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("n_q", [1, 3, 17], ids=lambda n: f"sq{n}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_cuda_parity_dense_queries(backend, device, n_q, causal, page_size):
    case = make_case((17, 113, 33, 18), n_q, hq=4, hkv=2, d=64, page_size=page_size, device=device, seed=n_q)
    check(backend, case, causal=causal)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (8, 1), (24, 1)], ids=["mha", "group4", "group8", "group24"])
def test_cuda_parity_across_gqa_groups(backend, device, hq, hkv):
    # group 24 with 5 queries: 120 rows, two 64-row tiles whose boundary falls inside a token
    case = make_case((50, 9), (5, 3), hq=hq, hkv=hkv, d=64, page_size=16, device=device, seed=hq)
    check(backend, case)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("d,dtype", [(64, torch.float16), (128, torch.bfloat16), (256, torch.float16)],
                         ids=["d64", "d128-bf16", "d256"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_parity_across_head_dims(backend, device, d, dtype, causal):
    case = make_case((70, 20), (3, 20), hq=2, hkv=1, d=d, dtype=dtype, page_size=16, device=device, seed=d)
    check(backend, case, causal=causal)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
def test_cuda_parity_long_chunk_of_150_queries(backend, device):
    # 150 rows: three 64-row tiles, each stopping at its own last row; the first sees 3 KV tiles
    # of 64, the last 4, sub-blocks above each warp's diagonal skipped.
    case = make_case((200, 150), (150, 60), hq=1, hkv=1, d=64, page_size=16, device=device, seed=9)
    check(backend, case)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
def test_cuda_parity_long_chunk_of_513_queries(backend, device):
    case = make_case((600, 513), (513, 200), hq=2, hkv=1, d=128, page_size=16, device=device, seed=9)
    check(backend, case)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("window_left", [0, 3, 40])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_parity_with_window(backend, device, window_left, causal):
    case = make_case((90, 17, 6), (9, 4, 6), hq=4, hkv=2, d=64, page_size=16, device=device, seed=window_left)
    check(backend, case, window_left=window_left, causal=causal)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("window_left", [-1, 20], ids=["nowindow", "window20"])
def test_cuda_parity_with_kv_splits(backend, device, num_splits, window_left):
    case = make_case((300, 45, 1), (4, 3, 1), hq=4, hkv=2, d=64, page_size=16, device=device)
    check(backend, case, num_splits=num_splits, window_left=window_left)
    dense = make_case((300, 45), 3, hq=4, hkv=2, d=64, device=device)
    check(backend, dense, num_splits=num_splits, window_left=window_left, causal=False)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("softcap", [2.0, 30.0])
def test_cuda_parity_with_softcap_and_large_logits(backend, device, softcap):
    case = make_case((60, 17), 4, hq=4, hkv=2, d=64, page_size=16, q_scale=10.0, device=device)
    check(backend, case, softcap=softcap, softmax_scale=0.3)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("scales", ["tensor", "head"])
@pytest.mark.parametrize("page_size", [None, 5], ids=["contiguous", "page5"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fp8", FP8_FORMATS)
def test_cuda_parity_with_fp8_cache(backend, device, scales, page_size, dtype, fp8):
    case = make_case((40, 17), (4, 2), hq=8, hkv=2, d=64, dtype=dtype, page_size=page_size, fp8_scales=scales,
                     fp8=fp8, device=device)
    check(backend, case)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16], ids=["contiguous", "page16"])
def test_cuda_decode_is_cache_attention_with_one_query(backend, device, page_size):
    # The same kernel template with one query per sequence and the same split plan: the same bits.
    case = make_case((17, 113, 0, 64), 1, hq=8, hkv=2, d=64, page_size=page_size, device=device)
    out, lse = run(backend, case)
    dec, dec_lse = kvkernels.decode_attention(case.q[:, 0], case.k_cache, case.v_cache, case.seqlens,
                                              block_table=case.block_table, return_lse=True, backend=backend)
    ref, ref_lse, ref_lp = oracle(case)
    assert_parity(out[:, 0], ref[:, 0], ref_lp[:, 0])
    assert_lse_close(lse, ref_lse)
    assert torch.equal(dec.cpu(), out[:, 0]) and torch.equal(dec_lse.cpu(), lse[:, :, 0])


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
def test_cuda_queries_that_see_nothing(backend, device):
    # An idle slot with queries (L = 0: they see nothing), n_b = 0, and a full prompt; then window 0
    # non-causal, where each query still sees its own position onwards.
    case = make_case((0, 12, 5), (3, 0, 5), hq=4, hkv=2, d=64, page_size=4, device=device)
    out, lse = check(backend, case, num_splits=2)
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and torch.isneginf(lse[:, :3]).all()
    full = make_case((5,), 5, hq=4, hkv=2, d=64, device=device)
    out, lse = check(backend, full, window_left=0, causal=False)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
def test_cuda_empty_batch_and_no_queries(backend, device):
    out, lse = run(backend, make_case((), 2, d=64, device=device))
    assert out.shape == (0, 2, 4, 64) and lse.shape == (0, 4, 2)
    out, lse = run(backend, make_case((3, 4), [0, 0], d=64, device=device))
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
def test_cuda_unused_block_table_entries_are_never_read(backend, device):
    case = make_case((20, 40), (2, 5), d=64, page_size=16, device=device)
    table = case.block_table.clone()
    for b, n in enumerate(case.lens.tolist()):
        table[b, -(-n // 16):] = -7
    case.block_table = table
    check(backend, case)


@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
def test_cuda_results_do_not_depend_on_num_splits_beyond_rounding_and_are_deterministic(backend, device):
    case = make_case((300, 77), (6, 2), d=64, page_size=16, device=device)
    one, lse1 = run(backend, case, num_splits=1)
    four, lse4 = run(backend, case, num_splits=4)
    ref, _, ref_lp = oracle(case)
    assert_parity(one, ref, ref_lp)
    assert_parity(four, ref, ref_lp)
    torch.testing.assert_close(lse1, lse4, atol=1e-5, rtol=1e-6)
    again, lse_again = run(backend, case, num_splits=4)
    assert torch.equal(again, four) and torch.equal(lse_again, lse4)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", CUDA_BACKENDS)
def test_cuda_batch_invariant_mode_gives_each_sequence_the_same_bits(backend, device):
    big = make_case((2500, 40, 9), (3, 3, 3), d=64, page_size=16, device=device, seed=4)
    with kvkernels.set_batch_invariant():
        out_all, _ = run(backend, big)
        alone = Case(q=big.q[:3], cu_q=torch.tensor([0, 3], dtype=torch.int32, device=device), k=big.k[:1],
                     v=big.v[:1], lens=big.lens[:1], k_cache=big.k_cache, v_cache=big.v_cache,
                     seqlens=big.seqlens[:1], block_table=big.block_table[:1], k_scale=None, v_scale=None)
        out_one, _ = run(backend, alone)
    assert torch.equal(out_all[:3], out_one)


# What the CUDA wrapper declines (auto then gives CUDA tensors to Triton), its split plan, the raw op.

def test_cuda_wrapper_declines_what_the_kernels_cannot_take():
    from kvkernels.cuda import cache_attn
    if not kvkernels.cuda.available():
        pytest.skip("the CUDA extension and the emulator are not built")
    ok = make_case((9,), 2, d=64)
    kw = dict(q=ok.q, k_cache=ok.k_cache, v_cache=ok.v_cache, paged=False, block_table=None, ragged=False,
              causal=True, window_left=-1, softcap=0.0)
    if kvkernels.cuda.emulator_available():
        assert cache_attn.unsupported("cache_attention", **kw) is None
    small = make_case((9,), 2, d=32)
    reason = cache_attn.unsupported("cache_attention", **{**kw, "q": small.q, "k_cache": small.k_cache,
                                                          "v_cache": small.v_cache})
    assert reason is not None and "head dim 32" in reason
    # CPU tensors with auto selection get the reference; only an explicit backend="cuda" emulates
    from kvkernels import api
    assert api.resolve_backend("cache_attention", None, ok.q.device, **kw) == "reference"


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("group", [1, 4, 24])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_plan_covers_what_every_row_tile_attends(d, group, causal):
    # Brute force: every row tile's range [first row's window start, last row's limit) fits the splits.
    from kvkernels.cuda import cache_attn
    for max_q, capacity, window_left in [(1, 300, -1), (7, 300, 5), (150, 1000, 40), (64, 64, 0), (3, 5000, 4095)]:
        p = cache_attn.plan(2, 2, group, d, capacity, window_left, causal, max_q)
        rows = max_q * group
        per_block = cache_attn.rows_per_block(rows, d)
        span = 0
        for n in range(1, max_q + 1):
            for length in (n, capacity):
                for r0 in range(0, n * group, per_block):
                    first, last = r0 // group, (min(r0 + per_block, n * group) - 1) // group
                    lo = max(0, length - n + first - window_left) if window_left >= 0 else 0
                    hi = min(length, length - n + last + 1) if causal else length
                    span = max(span, hi - lo)
        assert p.num_splits * p.split_tokens >= span
        assert p.split_tokens % (32 if d == 256 else 64) == 0


def _raw_case():
    case = make_case((40, 17), (4, 2), hq=4, hkv=2, d=64, page_size=16)
    out = torch.empty_like(case.q)
    lse = torch.empty(4, 6)
    return case, out, lse


@pytest.mark.emu
@pytest.mark.skipif(not HAS_EMULATOR, reason="the CUDA emulator is not built")
def test_cuda_raw_op_rejects_bad_metadata():
    case, out, lse = _raw_case()
    ws = torch.empty(0)
    cap = case.block_table.shape[1] * 16

    def raw(**kw):
        a = dict(q=case.q, cu=case.cu_q, out=out, lse=lse, max_q=4, num_splits=1, split_tokens=cap, window=-1)
        a.update(kw)
        torch.ops.kvkernels_emu.cache_attention(a["q"], case.k_cache, case.v_cache, case.seqlens, a["cu"],
                                                case.block_table, None, None, a["out"], a["lse"], ws, ws, a["max_q"],
                                                True, 0.1, a["window"], 0.0, a["num_splits"], a["split_tokens"])

    raw()  # the good call runs
    with pytest.raises(RuntimeError, match="do not cover"):
        raw(split_tokens=64)
    with pytest.raises(RuntimeError, match="workspace_out"):
        raw(num_splits=4, split_tokens=cap)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        raw(lse=torch.empty(6, 4))
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be int32"):
        raw(cu=case.cu_q.long())
    with pytest.raises(RuntimeError, match="q must be"):
        raw(cu=None)
    flat = torch.empty(case.q.numel() + 8, dtype=case.q.dtype)
    with pytest.raises(RuntimeError, match="16-byte"):
        raw(q=flat[1:case.q.numel() + 1].view(case.q.shape))
    # a window needs only its span covered
    raw(window=3, split_tokens=64)


# ------------------------------------------------------------------------- GPU (not run on CPU CI)

needs_cuda_kernel = pytest.mark.skipif(not kvkernels.cuda.has_op("cache_attention"),
                                       reason="the extension has no cache_attention kernel")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("d", [64, 128, 256])
def test_cuda_and_triton_agree_on_the_gpu(d):
    case = make_case((40, 31, 70, 700, 64), (1, 0, 7, 300, 64), hq=8, hkv=2, d=d, page_size=16, device="cuda")
    cuda_out, cuda_lse = check("cuda", case)
    tri_out, tri_lse = check("triton", case)  # both within the parity contract of the oracle
    torch.testing.assert_close(cuda_lse, tri_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_cuda_graph_replay_matches_eager_and_follows_new_lengths(num_splits):
    case = make_case((900, 37, 64), (4, 4, 4), hq=8, hkv=2, d=128, page_size=16, device="cuda")
    kw = dict(cu_seqlens_q=case.cu_q, max_seqlen_q=4, block_table=case.block_table, num_splits=num_splits,
              return_lse=True, backend="cuda")

    def call():
        return kvkernels.cache_attention(case.q, case.k_cache, case.v_cache, case.seqlens, **kw)

    eager_out, eager_lse = call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_lse = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out, eager_out) and torch.equal(graph_lse, eager_lse)
    # shorter sequences, same graph: the kernel reads the lengths from device memory
    new = lengths_tensor([500, 4, 0])
    case.seqlens.copy_(new.cuda())
    case.lens = new
    graph.replay()
    torch.cuda.synchronize()
    ref, ref_lse, ref_lp = oracle(case)
    assert_parity(graph_out.cpu(), ref, ref_lp)
    assert_lse_close(graph_lse.cpu(), ref_lse)
