"""prefill_attention against the oracle: every kernel backend, dense and varlen.

Each test states one property of the contract (DESIGN.md sections 3 and 4). Outputs meet the
FlashAttention criterion against the fp32 oracle (error at most twice that of the same math done
naively in the low precision), LSE is within 1e-4, a row that sees no key has out 0 and lse -inf.
CPU runs the Triton kernel in the interpreter, so the default grid keeps heads and batches small;
sequences of 511 and the GPU-sized cases are behind the slow / gpu marks.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from triton.runtime import interpreter

import kvkernels
from kvkernels.triton import INTERPRET
from conftest import assert_lse_close, assert_parity, kernel_backends, randn, reference, run_or_skip, seeded

# The emulator runs the sm_80 kernel by default; "cuda-emu-sm90" runs the same cases on the sm_90a
# wgmma/TMA kernel (KVKERNELS_PREFILL_PATH=90, set by the fixture below).
SM90_EMU = [pytest.param("cuda", "cpu", id="cuda-emu-sm90", marks=p.marks)
            for p in kernel_backends() if p.id == "cuda-emu"]
BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *kernel_backends(), *SM90_EMU]
TRITON = [p for p in kernel_backends() if p.values[0] == "triton"]
GPU = [p for p in kernel_backends() if p.values[1] == "cuda"]
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture(autouse=True)
def _sm90_emulated(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "cuda-emu-sm90" in callspec.id:
        monkeypatch.setenv("KVKERNELS_PREFILL_PATH", "90")


def _qkv(b, sq, sk, hq, hkv, d, dtype, *, seed=0, scale=1.0):
    gen = seeded(seed)
    q = randn(b, sq, hq, d, dtype=dtype, gen=gen, scale=scale)
    k = randn(b, sk, hkv, d, dtype=dtype, gen=gen, scale=scale)
    v = randn(b, sk, hkv, d, dtype=dtype, gen=gen)
    return q, k, v


def _varlen_qkv(lens_q, lens_k, hq, hkv, d, dtype, *, seed=0):
    gen = seeded(seed)
    q = randn(sum(lens_q), hq, d, dtype=dtype, gen=gen)
    k = randn(sum(lens_k), hkv, d, dtype=dtype, gen=gen)
    v = randn(sum(lens_k), hkv, d, dtype=dtype, gen=gen)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


def _run(backend, device, q, k, v, **kw):
    """kvkernels.prefill_attention on `device` -> (out, lse) back on the CPU."""
    moved = {name: x.to(device) if isinstance(x, torch.Tensor) else x for name, x in kw.items()}
    out, lse = run_or_skip(backend, lambda: kvkernels.prefill_attention(
        q.to(device), k.to(device), v.to(device), return_lse=True, backend=backend, **moved))
    return out.cpu(), lse.cpu()


def _check(backend, device, q, k, v, **kw):
    """Run one call and hold it to the parity contract; returns (out, lse, ref_lse)."""
    out, lse = _run(backend, device, q, k, v, **kw)
    ref_kw = {name: x for name, x in kw.items() if name not in ("max_seqlen_q", "max_seqlen_k")}
    ref, ref_lse = reference.prefill_attention(q, k, v, **ref_kw)
    ref_lp, _ = reference.prefill_attention(q, k, v, upcast=False, **ref_kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.shape == ref_lse.shape
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)
    return out, lse, ref_lse


# ------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk,d", [(1, 17, 64), (17, 1, 64), (17, 17, 128), (113, 113, 64), (17, 113, 128),
                                     (113, 17, 64)])
def test_dense_parity(backend, device, dtype, causal, sq, sk, d):
    q, k, v = _qkv(2, sq, sk, 2, 1, d, dtype)
    _check(backend, device, q, k, v, causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 256])
def test_many_key_tiles(backend, device, causal, d):
    # The keys span several tiles and every pipeline stage several times over (the kernels' key
    # tiles are at most 128 rows, their pipelines a few stages deep); two query row blocks.
    q, k, v = _qkv(1, 130, 300, 1, 1, d, torch.float16, seed=14)
    _check(backend, device, q, k, v, causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_reads_shared_kv_head(backend, device, hq, hkv, causal):
    q, k, v = _qkv(1, 33, 47, hq, hkv, 64, torch.float16, seed=1)
    _check(backend, device, q, k, v, causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,window", [
    (False, (16, -1)),  # left only
    (False, (-1, 8)),  # right only
    (False, (16, 4)),  # both
    (False, (0, 0)),  # the diagonal alone
    (True, (16, -1)),  # sliding-window causal
    (True, (40, 5)),  # causal clips the right side to 0
])
@pytest.mark.parametrize("sq,sk", [(113, 113), (17, 113), (113, 40)])
def test_sliding_window(backend, device, dtype, causal, window, sq, sk):
    q, k, v = _qkv(1, sq, sk, 2, 1, 64, dtype, seed=2)
    _check(backend, device, q, k, v, causal=causal, window_size=window)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(backend, device, dtype, causal):
    # q, k scaled so that many scores pass the cap: tanh saturation is exercised, not just its linear part
    q, k, v = _qkv(1, 113, 113, 2, 1, 64, dtype, seed=3, scale=3.0)
    out, _, _ = _check(backend, device, q, k, v, causal=causal, softcap=20.0)
    uncapped, _ = reference.prefill_attention(q, k, v, causal=causal)
    assert (out.float() - uncapped.float()).abs().max() > 1e-2, "softcap must change the result here"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_large_magnitude_logits(backend, device, dtype, causal):
    # scores of a few hundred: exp overflows unless the running max is subtracted
    q, k, v = _qkv(1, 113, 113, 2, 1, 64, dtype, seed=4, scale=8.0)
    _, lse, _ = _check(backend, device, q, k, v, causal=causal, softmax_scale=1.0)
    assert lse.abs().max() > 100.0


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_any_finite_softmax_scale(backend, device, scale):
    # a zero scale gives uniform weights; a negative one reverses the order of the scores
    q, k, v = _qkv(1, 17, 50, 2, 1, 64, torch.float16, seed=17)
    _check(backend, device, q, k, v, causal=True, softmax_scale=scale)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [256, 80, 40])
def test_other_head_dims(backend, device, dtype, d):
    # 256 is native; 80 and 40 are padded to the next power of two inside the kernel
    q, k, v = _qkv(1, 17, 50, 2, 1, d, dtype, seed=5)
    _check(backend, device, q, k, v, causal=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, 0)), (True, (3, -1))])
def test_rows_that_see_no_key(backend, device, causal, window):
    # Sq > Sk, bottom-right aligned: query i sees keys up to i + Sk - Sq, so the first Sq - Sk rows see none
    sq, sk = 113, 17
    q, k, v = _qkv(2, sq, sk, 2, 1, 64, torch.float16, seed=6)
    out, lse, _ = _check(backend, device, q, k, v, causal=causal, window_size=window)
    empty = sq - sk
    assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
    assert torch.isneginf(lse[:, :, :empty]).all()
    assert torch.isfinite(lse[:, :, empty:]).all()


# -------------------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens_q,lens_k", [
    ([17, 0, 113, 1, 40], [17, 0, 113, 1, 40]),  # self-attention, one empty sequence
    ([5, 17, 0, 30], [40, 3, 9, 0]),  # Sq != Sk both ways; empty keys for a non-empty query
])
def test_varlen_parity(backend, device, dtype, causal, lens_q, lens_k):
    q, k, v, cu_q, cu_k = _varlen_qkv(lens_q, lens_k, 4, 2, 64, dtype, seed=7)
    _check(backend, device, q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
           max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_varlen_window_softcap_gqa(backend, device):
    lens_q, lens_k = [33, 1, 70], [60, 20, 70]
    q, k, v, cu_q, cu_k = _varlen_qkv(lens_q, lens_k, 8, 2, 128, torch.bfloat16, seed=8)
    _check(backend, device, q, k, v, causal=True, window_size=(24, -1), softcap=15.0, cu_seqlens_q=cu_q,
           cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "cuda"])
def test_varlen_matches_dense_per_sequence(backend, device):
    # The same sequence gives the same bits alone (dense) or packed with others (varlen): one kernel
    # serves both layouts through per-batch offsets.
    lens = [17, 50, 9]
    q, k, v, cu_q, cu_k = _varlen_qkv(lens, lens, 2, 1, 64, torch.float16, seed=9)
    packed, packed_lse = _run(backend, device, q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    s, e = int(cu_q[1]), int(cu_q[2])
    alone, alone_lse = _run(backend, device, q[None, s:e], k[None, s:e], v[None, s:e], causal=True)
    assert torch.equal(packed[s:e], alone[0])
    assert torch.equal(packed_lse[:, s:e], alone_lse[0])


# ----------------------------------------------------------------------------- layout, determinism


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_inputs(backend, device):
    # q, k, v as views into one packed [B, S, 3, H, D] projection (row stride 3*H*D), kv heads strided too
    b, s, h, d = 2, 45, 2, 64
    qkv = randn(b, s, 3, h, d, dtype=torch.float16, gen=seeded(10), device=device)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert q.stride(1) == 3 * h * d
    out, lse = kvkernels.prefill_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    out_c, lse_c = kvkernels.prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True,
                                               return_lse=True, backend=backend)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    _check(backend, device, q.cpu(), k.cpu(), v.cpu(), causal=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(backend, device, dtype):
    q, k, v = _qkv(1, 113, 113, 2, 2, 64, dtype, seed=11)
    first = _run(backend, device, q, k, v, causal=True, window_size=(30, -1))
    second = _run(backend, device, q, k, v, causal=True, window_size=(30, -1))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "reference"])
@pytest.mark.parametrize("causal,window", [(True, (20, -1)), (False, (8, -1))])
def test_keys_outside_the_band_never_reach_the_output(backend, device, causal, window):
    # Keys no query of the call can see are NaN. A kernel that loaded them and only masked the scores
    # would multiply probability 0 by NaN values (a whole tile loaded from before the window's start);
    # skipped tiles, masked edge loads and zeroed edge rows never let them in.
    sq, sk = 17, 113
    q, k, v = _qkv(1, sq, sk, 2, 1, 64, torch.float16, seed=12)
    first_seen = sk - sq - window[0]
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :first_seen] = float("nan")
    v_bad[:, :first_seen] = float("nan")
    out, lse = _run(backend, device, q, k_bad, v_bad, causal=causal, window_size=window)
    ref, ref_lse = reference.prefill_attention(q, k, v, causal=causal, window_size=window)
    ref_lp, _ = reference.prefill_attention(q, k, v, causal=causal, window_size=window, upcast=False)
    assert_parity(out, ref, ref_lp)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "reference"])
def test_varlen_never_reads_the_next_sequence_or_the_padding(backend, device):
    # Sequence 1's keys are NaN, and so is the memory past the last key (k and v are views of longer
    # buffers whose 16 rows past cu_seqlens_k[-1] are NaN). Sequence 0 ends mid-tile (its last key
    # tile runs into sequence 1) and sequence 2's tile runs past the end: their outputs stay exact.
    lens = [70, 50, 3]
    q, k, v, cu_q, cu_k = _varlen_qkv(lens, lens, 2, 1, 64, torch.float16, seed=13)
    nan_rows = torch.full((16, *k.shape[1:]), float("nan"), dtype=k.dtype)
    k_bad, v_bad = torch.cat([k, nan_rows])[:len(k)], torch.cat([v, nan_rows])[:len(v)]
    k_bad[70:120] = float("nan")
    v_bad[70:120] = float("nan")
    kw = dict(causal=False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out, lse = _run(backend, device, q, k_bad, v_bad, max_seqlen_q=70, max_seqlen_k=70, **kw)
    ref, ref_lse = reference.prefill_attention(q, k, v, **kw)
    ref_lp, _ = reference.prefill_attention(q, k, v, upcast=False, **kw)
    for s, e in ((0, 70), (120, 123)):
        assert_parity(out[s:e], ref[s:e], ref_lp[s:e])
        assert_lse_close(lse[:, s:e], ref_lse[:, s:e])


@pytest.mark.skipif(not INTERPRET, reason="counts tile visits through the Triton interpreter")
@pytest.mark.parametrize("causal,window,sq,sk", [
    (True, (20, -1), 17, 113),
    (True, (-1, -1), 113, 113),
    (False, (16, 4), 113, 113),
    (True, (-1, -1), 113, 40),
    (False, (-1, -1), 17, 50),
])
def test_triton_visits_only_key_tiles_in_the_band(monkeypatch, causal, window, sq, sk):
    # Each visited key tile costs two dots (q k^T and p v). A query block must visit exactly the key
    # tiles that meet the union of its rows' bands: the others are skipped by the loop bounds, not masked.
    prefill_module = importlib.import_module("kvkernels.triton.prefill")
    block_m, block_n = prefill_module._INTERPRET_CONFIG["BLOCK_M"], prefill_module._INTERPRET_CONFIG["BLOCK_N"]
    dots = []
    create_dot = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, *a, **kw: dots.append(1) or create_dot(self, *a, **kw))
    hq = 2
    q, k, v = _qkv(1, sq, sk, hq, 1, 64, torch.float16, seed=16)
    _check("triton", "cpu", q, k, v, causal=causal, window_size=window)

    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    left = sk if left < 0 else left
    right = sq if right < 0 else right
    tiles = 0
    for m0 in range(0, sq, block_m):
        last = min(m0 + block_m, sq) - 1
        lo = max(0, m0 + sk - sq - left)
        hi = min(sk, last + sk - sq + right + 1)
        if hi > lo:
            tiles += -(-hi // block_n) - lo // block_n
    assert len(dots) == 2 * tiles * hq


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_triton_declines_wide_floats_with_a_reason(backend, device, dtype):
    """fp32/fp64 prefill is left to the reference (fp32 tiles overflow shared memory and IEEE fp32
    dots have no tensor cores): an explicit Triton call names the reason, auto choice falls back."""
    q, k, v = _qkv(1, 4, 4, 1, 1, 64, dtype)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=f"float16/bfloat16 tiles; {name} inputs go to the reference"):
        _run(backend, device, q, k, v)


# -------------------------------------------------------------------------------- larger grids


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (100, -1)), (False, (64, 32))])
@pytest.mark.parametrize("sq,sk,d", [(511, 511, 128), (113, 511, 64), (511, 113, 128)])
def test_slow_long_sequences(backend, device, dtype, causal, window, sq, sk, d):
    q, k, v = _qkv(1, sq, sk, 4, 2, d, dtype, seed=13)
    _check(backend, device, q, k, v, causal=causal, window_size=window)


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_slow_varlen_mixed(backend, device, dtype, d):
    lens_q, lens_k = [511, 0, 1, 130, 257], [511, 7, 0, 300, 257]
    q, k, v, cu_q, cu_k = _varlen_qkv(lens_q, lens_k, 4, 1, d, dtype, seed=14)
    _check(backend, device, q, k, v, causal=True, softcap=30.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
           max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))


@pytest.mark.parametrize("backend,device", GPU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (1000, -1))])
@pytest.mark.parametrize("sq,sk,d", [(2048, 2048, 128), (1999, 4097, 64), (1024, 1024, 256)])
def test_gpu_sized(backend, device, dtype, causal, window, sq, sk, d):
    # sizes where the GPU tiles (64-128 rows) cross many band edges and every loop phase runs
    q, k, v = _qkv(2, sq, sk, 4, 2, d, dtype, seed=15)
    out, lse = _run(backend, device, q, k, v, causal=causal, window_size=window)
    qc, kc, vc = q.to(device), k.to(device), v.to(device)
    ref, ref_lse = reference.prefill_attention(qc, kc, vc, causal=causal, window_size=window)
    ref_lp, _ = reference.prefill_attention(qc, kc, vc, causal=causal, window_size=window, upcast=False)
    assert_parity(out, ref.cpu(), ref_lp.cpu())
    assert_lse_close(lse, ref_lse)
