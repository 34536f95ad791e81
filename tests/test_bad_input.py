"""Bad input gets a clear exception naming the argument, raised before anything is launched or
written: a failed append leaves both caches bit-identical."""

import pytest
import torch
from conftest import lengths_tensor, randn, seeded

import kvkernels

B, HQ, HKV, D, SMAX, PAGE = 2, 4, 2, 16, 8, 4


def decode_args(**over):
    gen = seeded(0)
    args = dict(q=randn(B, HQ, D, gen=gen), k_cache=randn(B, SMAX, HKV, D, gen=gen),
                v_cache=randn(B, SMAX, HKV, D, gen=gen), cache_seqlens=lengths_tensor([3, 8]))
    args.update(over)
    return args


def paged_decode_args(**over):
    gen = seeded(1)
    args = dict(q=randn(B, HQ, D, gen=gen), k_cache=randn(6, PAGE, HKV, D, gen=gen),
                v_cache=randn(6, PAGE, HKV, D, gen=gen), cache_seqlens=lengths_tensor([3, 8]),
                block_table=torch.tensor([[4, 0, 5], [1, 2, 5]], dtype=torch.int32))
    args.update(over)
    return args


def call_decode(args):
    a = dict(args)
    return kvkernels.decode_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), **a)


DECODE_CASES = {
    "q not a tensor": (decode_args(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    "q rank": (decode_args(q=randn(B, 1, HQ, D)), ValueError, "q must have 3 dimensions"),
    "q dtype int": (decode_args(q=torch.zeros(B, HQ, D, dtype=torch.int32)), TypeError, "q must have dtype"),
    "cache dtype differs from q": (decode_args(k_cache=randn(B, SMAX, HKV, D, dtype=torch.bfloat16),
                                               v_cache=randn(B, SMAX, HKV, D, dtype=torch.bfloat16)),
                                   TypeError, "k_cache/v_cache must have q's dtype"),
    "k and v caches differ": (decode_args(v_cache=randn(B, SMAX + 1, HKV, D)), ValueError, "same shape"),
    "head dim mismatch": (decode_args(q=randn(B, HQ, 8)), ValueError, "head dim"),
    "head dim too large": (decode_args(q=randn(B, HQ, 512), k_cache=randn(B, SMAX, HKV, 512),
                                       v_cache=randn(B, SMAX, HKV, 512)), ValueError, "head dim 512"),
    "Hq not a multiple of Hkv": (decode_args(q=randn(B, 3, D)), ValueError, "Hq % Hkv"),
    "batch mismatch": (decode_args(k_cache=randn(3, SMAX, HKV, D), v_cache=randn(3, SMAX, HKV, D)),
                       ValueError, "contiguous k_cache/v_cache must have shape"),
    "cache_seqlens dtype": (decode_args(cache_seqlens=torch.tensor([3, 8])), TypeError, "cache_seqlens must have dtype"),
    "cache_seqlens shape": (decode_args(cache_seqlens=lengths_tensor([3])), ValueError, "cache_seqlens must have shape"),
    "cache_seqlens past capacity": (decode_args(cache_seqlens=lengths_tensor([3, 9])), ValueError, "capacity 8"),
    "cache_seqlens negative": (decode_args(cache_seqlens=lengths_tensor([-1, 2])), ValueError, ">= 0"),
    "last dim not contiguous": (decode_args(q=randn(B, D, HQ).transpose(1, 2)), ValueError, "q must be contiguous"),
    "window_left below -1": (decode_args(window_left=-2), ValueError, "window_left"),
    "num_splits negative": (decode_args(num_splits=-1), ValueError, "num_splits"),
    "num_splits float": (decode_args(num_splits=1.5), TypeError, "num_splits"),
    "softcap negative": (decode_args(softcap=-1.0), ValueError, "softcap"),
    "softmax_scale inf": (decode_args(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    "16-bit cache scale shape": (decode_args(k_scale=torch.ones(3)), ValueError, r"k_scale must have shape \[\] or \[2\]"),
    "16-bit cache scale not positive": (decode_args(v_scale=0.0), ValueError, "v_scale must be finite and > 0"),
    "uint8 cache without kv_cache_dtype": (decode_args(k_cache=torch.zeros(B, SMAX, HKV, D, dtype=torch.uint8),
                                                       v_cache=torch.zeros(B, SMAX, HKV, D, dtype=torch.uint8)),
                                           TypeError, "kv_cache_dtype='fp8'"),
    "kv_cache_dtype fp8 on a 16-bit cache": (decode_args(kv_cache_dtype="fp8"), TypeError, "uint8 storage or float8"),
    "kv_cache_dtype unknown": (decode_args(kv_cache_dtype="int8"), ValueError, "kv_cache_dtype must be one of"),
    "kv_cache_dtype e5m2 on an e4m3 cache": (decode_args(k_cache=randn(B, SMAX, HKV, D).to(torch.float8_e4m3fn),
                                                         v_cache=randn(B, SMAX, HKV, D).to(torch.float8_e4m3fn),
                                                         kv_cache_dtype="fp8_e5m2"),
                                             TypeError, "reads k_cache as float8_e5m2"),
    "k e4m3, v e5m2": (decode_args(k_cache=randn(B, SMAX, HKV, D).to(torch.float8_e4m3fn),
                                   v_cache=randn(B, SMAX, HKV, D).to(torch.float8_e5m2)),
                       TypeError, "must use one fp8 format"),
    "fp8 scale shape": (decode_args(k_cache=randn(B, SMAX, HKV, D).to(torch.float8_e4m3fn),
                                    v_cache=randn(B, SMAX, HKV, D).to(torch.float8_e4m3fn),
                                    v_scale=torch.ones(3)), ValueError, r"v_scale must have shape \[\] or \[2\]"),
    "fp8 scale dtype": (decode_args(k_cache=randn(B, SMAX, HKV, D).to(torch.float8_e4m3fn),
                                    v_cache=randn(B, SMAX, HKV, D).to(torch.float8_e4m3fn),
                                    k_scale=torch.ones(2, dtype=torch.float16)), TypeError, "k_scale must have dtype"),
    "block_table dtype": (paged_decode_args(block_table=torch.zeros(B, 3, dtype=torch.int64)), TypeError, "block_table"),
    "block_table rows": (paged_decode_args(block_table=torch.zeros(1, 3, dtype=torch.int32)), ValueError, "block_table"),
    "block_table entry out of range": (paged_decode_args(block_table=torch.tensor([[4, 0, 5], [1, 6, 5]],
                                                                                  dtype=torch.int32)),
                                       ValueError, r"block_table\[1, 1\] = 6"),
    "paged past capacity": (paged_decode_args(cache_seqlens=lengths_tensor([3, 13])), ValueError, "capacity 12"),
    "unknown backend": (decode_args(backend="flashinfer"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_rejects(case):
    args, exc, match = DECODE_CASES[case]
    with pytest.raises(exc, match=match):
        call_decode(args)


def test_decode_unused_block_table_entries_may_hold_anything():
    # Only the pages a sequence's length needs are validated: -1 padding past them is fine.
    args = paged_decode_args(block_table=torch.tensor([[4, -1, -1], [1, 2, 5]], dtype=torch.int32))
    call_decode(args)


def prefill_args(**over):
    gen = seeded(2)
    args = dict(q=randn(B, 5, HQ, D, gen=gen), k=randn(B, 6, HKV, D, gen=gen), v=randn(B, 6, HKV, D, gen=gen))
    args.update(over)
    return args


def varlen_args(**over):
    gen = seeded(3)
    args = dict(q=randn(7, HQ, D, gen=gen), k=randn(9, HKV, D, gen=gen), v=randn(9, HKV, D, gen=gen),
                cu_seqlens_q=lengths_tensor([0, 3, 7]), cu_seqlens_k=lengths_tensor([0, 4, 9]))
    args.update(over)
    return args


PREFILL_CASES = {
    "q rank": (prefill_args(q=randn(5, D)), ValueError, "q must have 3 or 4 dimensions"),
    "k dtype": (prefill_args(k=randn(B, 6, HKV, D, dtype=torch.bfloat16)), TypeError, "k must have dtype"),
    "k and v shapes": (prefill_args(v=randn(B, 7, HKV, D)), ValueError, "k and v must have the same shape"),
    "batch mismatch": (prefill_args(k=randn(3, 6, HKV, D), v=randn(3, 6, HKV, D)), ValueError, "k must have batch"),
    "Hq % Hkv": (prefill_args(k=randn(B, 6, 3, D), v=randn(B, 6, 3, D)), ValueError, "Hq % Hkv"),
    "head dim": (prefill_args(k=randn(B, 6, HKV, 8), v=randn(B, 6, HKV, 8)), ValueError, "head dim"),
    "window type": (prefill_args(window_size=5), TypeError, "window_size"),
    "window value": (prefill_args(window_size=(-3, 0)), ValueError, "window_size"),
    "causal not bool": (prefill_args(causal=1), TypeError, "causal"),
    "cu_seqlens on dense": (prefill_args(cu_seqlens_q=lengths_tensor([0, 5])), ValueError, "cu_seqlens_q is only for varlen"),
    "varlen without cu_seqlens": (varlen_args(cu_seqlens_k=None), ValueError, "cu_seqlens_q and cu_seqlens_k are required"),
    "cu_seqlens not monotone": (varlen_args(cu_seqlens_q=lengths_tensor([0, 5, 3, 7]),
                                            cu_seqlens_k=lengths_tensor([0, 4, 6, 9])), ValueError, "non-decreasing"),
    "cu_seqlens total": (varlen_args(cu_seqlens_k=lengths_tensor([0, 4, 8])), ValueError, r"cu_seqlens_k\[-1\] = 8"),
    "cu_seqlens start": (varlen_args(cu_seqlens_q=lengths_tensor([1, 3, 7])), ValueError, r"cu_seqlens_q\[0\]"),
    "cu_seqlens batch differs": (varlen_args(cu_seqlens_k=lengths_tensor([0, 9])), ValueError, "both have shape"),
    "cu_seqlens dtype": (varlen_args(cu_seqlens_q=torch.tensor([0, 3, 7])), TypeError, "cu_seqlens_q"),
}


@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_rejects(case):
    args, exc, match = PREFILL_CASES[case]
    a = dict(args)
    with pytest.raises(exc, match=match):
        kvkernels.prefill_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)


def append_args(paged=False, fp8=False, **over):
    gen = seeded(4)
    cache_dtype = torch.float8_e4m3fn if fp8 else torch.float16
    shape = (6, PAGE, HKV, D) if paged else (B, SMAX, HKV, D)
    args = dict(k=randn(B, 2, HKV, D, gen=gen), v=randn(B, 2, HKV, D, gen=gen),
                k_cache=randn(*shape, gen=gen).to(cache_dtype), v_cache=randn(*shape, gen=gen).to(cache_dtype),
                cache_seqlens=lengths_tensor([3, 6]))
    if paged:
        args["block_table"] = torch.tensor([[4, 0, 5], [1, 2, 3]], dtype=torch.int32)
    args.update(over)
    return args


APPEND_CASES = {
    "past capacity": (append_args(cache_seqlens=lengths_tensor([3, 7])), ValueError, "run past the cache's capacity"),
    "paged past capacity": (append_args(paged=True, cache_seqlens=lengths_tensor([3, 11])), ValueError,
                            "run past the cache's capacity"),
    "paged bad page": (append_args(paged=True, block_table=torch.tensor([[4, 0, 5], [1, 9, 3]], dtype=torch.int32)),
                       ValueError, r"block_table\[1, 1\] = 9"),
    "negative length": (append_args(cache_seqlens=lengths_tensor([-1, 0])), ValueError, ">= 0"),
    "dtype differs from cache": (append_args(k=randn(B, 2, HKV, D, dtype=torch.bfloat16),
                                             v=randn(B, 2, HKV, D, dtype=torch.bfloat16)), TypeError, "cache's dtype"),
    "k and v differ": (append_args(v=randn(B, 3, HKV, D)), ValueError, "k and v must have the same shape"),
    "rows differ from cache": (append_args(k=randn(B, 2, 1, D), v=randn(B, 2, 1, D)), ValueError, r"\[Hkv, D\]"),
    "k rank": (append_args(k=randn(2, HKV, D), v=randn(2, HKV, D)), ValueError, "k must have 4 dimensions"),
    "fp8 scale shape": (append_args(fp8=True, k_scale=torch.ones(5)), ValueError, "k_scale must have shape"),
    "scale on fp16 not positive": (append_args(v_scale=torch.tensor(-1.0)), ValueError, "v_scale must be finite"),
    "scale on fp16 shape": (append_args(k_scale=torch.ones(5)), ValueError, "k_scale must have shape"),
    "kv_cache_dtype e5m2 on a 16-bit cache": (append_args(kv_cache_dtype="fp8_e5m2"), TypeError,
                                              "uint8 storage or float8_e5m2"),
    "k e4m3, v e5m2": (append_args(fp8=True, v_cache=randn(B, SMAX, HKV, D).to(torch.float8_e5m2)), TypeError,
                       "must use one fp8 format"),
    "cache_seqlens dtype": (append_args(cache_seqlens=torch.tensor([3, 6])), TypeError, "cache_seqlens"),
    "caches differ": (append_args(v_cache=randn(B, SMAX + 1, HKV, D)), ValueError, "same shape"),
}


def _snapshot(*tensors):
    return [t.clone() for t in tensors]


def _bit_identical(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("case", list(APPEND_CASES))
def test_append_rejects_and_leaves_caches_untouched(case):
    args, exc, match = APPEND_CASES[case]
    a = dict(args)
    before = _snapshot(a["k_cache"], a["v_cache"])
    with pytest.raises(exc, match=match):
        kvkernels.append_kv(a.pop("k"), a.pop("v"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), **a)
    assert _bit_identical(args["k_cache"], before[0]) and _bit_identical(args["v_cache"], before[1])


SLOT_CASES = {
    "slot past the cache": (torch.tensor([0, 24]), ValueError, "slot_mapping.max"),
    "slot twice": (torch.tensor([5, 5]), ValueError, "same slot twice"),
    "slot dtype": (torch.tensor([0.0, 1.0]), TypeError, "slot_mapping"),
    "slot shape": (torch.tensor([0, 1, 2]), ValueError, "slot_mapping must have shape"),
}


@pytest.mark.parametrize("case", list(SLOT_CASES))
def test_append_slots_rejects_and_leaves_caches_untouched(case):
    slots, exc, match = SLOT_CASES[case]
    gen = seeded(5)
    kc, vc = randn(6, PAGE, HKV, D, gen=gen), randn(6, PAGE, HKV, D, gen=gen)
    before = _snapshot(kc, vc)
    k = randn(2, HKV, D, gen=gen)
    with pytest.raises(exc, match=match):
        kvkernels.append_kv_slots(k, k, kc, vc, slots)
    assert _bit_identical(kc, before[0]) and _bit_identical(vc, before[1])


def test_tensors_on_different_devices_are_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to have two devices")
    args = decode_args(cache_seqlens=lengths_tensor([3, 8]).cuda())
    with pytest.raises(ValueError, match="k_cache is on cpu"):
        call_decode({**args, "q": args["q"].cuda()})


def test_device_values_unchecked_without_checked_mode_are_documented(monkeypatch):
    """On CUDA tensors, index values are read only in checked mode; the switch is what enables it."""
    from kvkernels import validation
    t = lengths_tensor([1])
    assert validation.values_checkable(t)  # CPU: free to check
    fake_cuda = torch.empty(1, device="meta")
    assert not validation.values_checkable(fake_cuda)
    with kvkernels.set_checked_mode():
        assert validation.values_checkable(fake_cuda)


def ragged_append_args(paged=False, **over):
    """Three sequences appending 2, 0 and 3 tokens (T = 5) to a cache of capacity 8 (paged: 3 pages of 4)."""
    gen = seeded(6)
    shape = (9, PAGE, HKV, D) if paged else (3, SMAX, HKV, D)
    args = dict(k=randn(5, HKV, D, gen=gen), v=randn(5, HKV, D, gen=gen), k_cache=randn(*shape, gen=gen),
                v_cache=randn(*shape, gen=gen), cache_seqlens=lengths_tensor([3, 8, 5]),
                cu_seqlens=lengths_tensor([0, 2, 2, 5]))
    if paged:
        args["block_table"] = torch.tensor([[4, 0, 5], [1, 2, 3], [6, 7, 8]], dtype=torch.int32)
    args.update(over)
    return args


RAGGED_APPEND_CASES = {
    "cu_seqlens with 4-D k": (ragged_append_args(k=randn(3, 2, HKV, D), v=randn(3, 2, HKV, D)), ValueError,
                              "cu_seqlens is only for ragged"),
    "3-D k without cu_seqlens": (ragged_append_args(cu_seqlens=None), ValueError, "needs cu_seqlens"),
    "cu_seqlens dtype": (ragged_append_args(cu_seqlens=torch.tensor([0, 2, 2, 5])), TypeError, "cu_seqlens"),
    "cu_seqlens rank": (ragged_append_args(cu_seqlens=lengths_tensor([0, 2, 2, 5]).reshape(2, 2)), ValueError,
                        "cu_seqlens must have 1 dimensions"),
    "cu_seqlens empty": (ragged_append_args(cu_seqlens=lengths_tensor([])), ValueError, r"\[batch \+ 1\]"),
    "cu_seqlens device": (ragged_append_args(cu_seqlens=torch.zeros(4, dtype=torch.int32, device="meta")),
                          ValueError, "cu_seqlens is on meta"),
    "cu_seqlens total": (ragged_append_args(cu_seqlens=lengths_tensor([0, 2, 2, 4])), ValueError,
                         r"cu_seqlens\[-1\] = 4 must equal the total number of tokens 5"),
    "cu_seqlens not monotone": (ragged_append_args(cu_seqlens=lengths_tensor([0, 3, 2, 5])), ValueError,
                                "non-decreasing"),
    "cu_seqlens start": (ragged_append_args(cu_seqlens=lengths_tensor([1, 2, 2, 5])), ValueError,
                         r"cu_seqlens\[0\] must be 0"),
    "cache_seqlens batch": (ragged_append_args(cache_seqlens=lengths_tensor([3, 8])), ValueError,
                            "cache_seqlens must have shape"),
    "contiguous batch": (ragged_append_args(k_cache=randn(2, SMAX, HKV, D), v_cache=randn(2, SMAX, HKV, D)),
                         ValueError, "contiguous k_cache/v_cache must have shape"),
    "block_table batch": (ragged_append_args(paged=True, block_table=torch.zeros(2, 3, dtype=torch.int32)),
                          ValueError, "block_table must have shape"),
    # sequence 2 holds 5 and adds 3 tokens (8: fits); sequence 0 at 7 adding 2 does not
    "past capacity": (ragged_append_args(cache_seqlens=lengths_tensor([7, 8, 5])), ValueError,
                      r"append of 2 tokens to sequence 0 would run past the cache's capacity: cache_seqlens\[0\] \+ 2 = 7 \+ 2"),
    "paged past capacity": (ragged_append_args(paged=True, cache_seqlens=lengths_tensor([3, 0, 10])), ValueError,
                            r"append of 3 tokens to sequence 2 would run past .* > 12"),
    "empty sequence past capacity": (ragged_append_args(cache_seqlens=lengths_tensor([3, 9, 5])), ValueError,
                                     r"sequence 1 would run past"),
    "negative length": (ragged_append_args(cache_seqlens=lengths_tensor([3, -1, 5])), ValueError, ">= 0"),
    "bad page": (ragged_append_args(paged=True, block_table=torch.tensor([[4, 0, 5], [1, 2, 3], [6, 9, 8]],
                                                                         dtype=torch.int32)),
                 ValueError, r"block_table\[2, 1\] = 9"),
    # sequences 0 and 2 share page 5 (a shared prefix); both append into its rows 3 and 0..: one slot twice
    "shared page written twice": (ragged_append_args(paged=True, cache_seqlens=lengths_tensor([3, 0, 3]),
                                                     block_table=torch.tensor([[4, 5, 0], [1, 2, 3], [4, 5, 8]],
                                                                              dtype=torch.int32)),
                                  ValueError, r"sequences \[0, 2\] would write the same cache slot \(page 4, row 3\) twice"),
    "k rows differ from cache": (ragged_append_args(k=randn(5, 1, D), v=randn(5, 1, D)), ValueError, r"\[Hkv, D\]"),
}


@pytest.mark.parametrize("case", list(RAGGED_APPEND_CASES))
def test_ragged_append_rejects_and_leaves_caches_untouched(case):
    args, exc, match = RAGGED_APPEND_CASES[case]
    a = dict(args)
    before = _snapshot(a["k_cache"], a["v_cache"])
    with pytest.raises(exc, match=match):
        kvkernels.append_kv(a.pop("k"), a.pop("v"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), **a)
    assert _bit_identical(args["k_cache"], before[0]) and _bit_identical(args["v_cache"], before[1])


def test_ragged_append_may_share_pages_it_does_not_write_twice():
    """Sharing a page is fine (a common prefix); only two writes to one slot are refused."""
    args = ragged_append_args(paged=True, cache_seqlens=lengths_tensor([4, 0, 8]),
                              block_table=torch.tensor([[4, 5, 0], [1, 2, 3], [4, 6, 8]], dtype=torch.int32))
    a = dict(args)
    kvkernels.append_kv(a.pop("k"), a.pop("v"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), **a)


def test_dense_append_into_a_shared_page_twice_is_rejected():
    args = append_args(paged=True, cache_seqlens=lengths_tensor([3, 3]),
                       block_table=torch.tensor([[4, 0, 5], [4, 2, 3]], dtype=torch.int32))
    a = dict(args)
    before = _snapshot(a["k_cache"], a["v_cache"])
    with pytest.raises(ValueError, match="twice"):
        kvkernels.append_kv(a.pop("k"), a.pop("v"), a.pop("k_cache"), a.pop("v_cache"), a.pop("cache_seqlens"), **a)
    assert _bit_identical(args["k_cache"], before[0]) and _bit_identical(args["v_cache"], before[1])
