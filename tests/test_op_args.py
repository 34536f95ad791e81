"""Op arguments a user gets wrong, checked where it is free (CPU index tensors, Python numbers):
fp8 scales as numbers or tensors and never <= 0, varlen max_seqlen not below a real length, no two
sequences appending to one slot, and a capacity error that names the sequence and shows the sum."""

from __future__ import annotations

import math

import pytest
import torch

import kvkernels

FP8 = torch.float8_e4m3fn


def _fp8_cache(B=2, S=16, hkv=2, d=64):
    kc = (torch.randn(B, S, hkv, d) * 0.5).to(FP8)
    return kc, kc.clone(), torch.tensor([3, 9], dtype=torch.int32)


def test_fp8_scales_may_be_python_numbers():
    kc, vc, lens = _fp8_cache()
    q = torch.randn(2, 4, 64, dtype=torch.float16)
    as_number = kvkernels.decode_attention(q, kc, vc, lens, k_scale=0.5, v_scale=2)
    as_tensor = kvkernels.decode_attention(q, kc, vc, lens, k_scale=torch.tensor(0.5), v_scale=torch.tensor(2.0))
    assert torch.equal(as_number, as_tensor)
    k = torch.randn(2, 1, 2, 64, dtype=torch.float16)
    kvkernels.append_kv(k, k, kc, vc, lens, k_scale=0.25, v_scale=0.25)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan, torch.tensor(0.0), torch.tensor([1.0, -2.0])],
                         ids=["zero", "negative", "inf", "nan", "tensor-zero", "per-head-negative"])
@pytest.mark.parametrize("op", ["decode", "append"])
def test_fp8_scales_must_be_finite_and_positive(op, scale):
    kc, vc, lens = _fp8_cache()
    before = kc.view(torch.uint8).clone()
    with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
        if op == "decode":
            kvkernels.decode_attention(torch.randn(2, 4, 64, dtype=torch.float16), kc, vc, lens, k_scale=scale)
        else:
            k = torch.randn(2, 1, 2, 64, dtype=torch.float16)
            kvkernels.append_kv(k, k, kc, vc, lens, k_scale=scale)
    assert torch.equal(kc.view(torch.uint8), before)


def test_fp8_scale_of_a_wrong_type():
    kc, vc, lens = _fp8_cache()
    with pytest.raises(TypeError, match="k_scale must be a number or an fp32 tensor"):
        kvkernels.decode_attention(torch.randn(2, 4, 64, dtype=torch.float16), kc, vc, lens, k_scale="0.5")


@pytest.mark.parametrize("which", ["q", "k"])
def test_varlen_max_seqlen_below_a_real_length_is_rejected(which):
    cu = torch.tensor([0, 17, 22], dtype=torch.int32)
    q, k = torch.randn(22, 4, 64), torch.randn(22, 2, 64)
    lengths = {"max_seqlen_q": 17, "max_seqlen_k": 17, f"max_seqlen_{which}": 4}
    with pytest.raises(ValueError, match=f"max_seqlen_{which} = 4 is smaller than sequence 0's length 17"):
        kvkernels.prefill_attention(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu, **lengths)
    kvkernels.prefill_attention(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=17, max_seqlen_k=20)


def test_append_where_two_sequences_share_a_slot_is_rejected():
    kc = torch.randn(4, 16, 2, 64, dtype=torch.float16)
    vc = kc.clone()
    table = torch.tensor([[0, 1], [2, 1]], dtype=torch.int32)        # page 1 shared by both sequences
    before = kc.clone()
    k = torch.randn(2, 2, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"sequences \[0, 1\] would write the same cache slot \(page 1, row 1\)"):
        kvkernels.append_kv(k, k, kc, vc, torch.tensor([16, 17], dtype=torch.int32), block_table=table)
    assert torch.equal(kc, before)
    # a shared page whose rows the two write apart is fine (e.g. a shared prefix page being filled)
    kvkernels.append_kv(k[:, :1], k[:, :1], kc, vc, torch.tensor([16, 17], dtype=torch.int32), block_table=table)


@pytest.mark.parametrize("new,expected", [
    (20, r"append of 20 tokens to sequence 1 would run past the cache's capacity: "
         r"cache_seqlens\[1\] \+ 20 = 33 \+ 20 = 53 > 48"),
    (16, r"append of 16 tokens to sequence 1 .* = 33 \+ 16 = 49 > 48"),
])
def test_append_capacity_error_names_the_sequence_and_the_sum(new, expected):
    kc = torch.randn(2, 48, 2, 64, dtype=torch.float16)
    k = torch.randn(2, new, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=expected):
        kvkernels.append_kv(k, k, kc, kc.clone(), torch.tensor([10, 33], dtype=torch.int32))


def test_append_of_one_token_says_token():
    kc = torch.randn(2, 48, 2, 64, dtype=torch.float16)
    k = torch.randn(2, 1, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"append of 1 token to sequence 0 .* 48 \+ 1 = 49 > 48"):
        kvkernels.append_kv(k, k, kc, kc.clone(), torch.tensor([48, 3], dtype=torch.int32))
