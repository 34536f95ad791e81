"""The public API as a framework sees it: backend choice, torch.library registration (opcheck),
torch.compile(fullgraph=True), and the process-wide switches."""

import pytest
import torch
from conftest import build_paged, lengths_tensor, randn, seeded

import kvkernels
import kvkernels.triton
from kvkernels import api, config, reference

# Backends that run CPU tensors here: Triton only through its interpreter (no GPU in the process).
CPU_BACKENDS = ["reference"] + (["triton"] if kvkernels.triton.INTERPRET else [])


def small_decode_case(dtype=torch.float16, paged=False, fp8=False, gen=None):
    gen = gen or seeded(0)
    B, hq, hkv, d, smax = 2, 4, 2, 16, 9
    q = randn(B, hq, d, dtype=dtype, gen=gen)
    kd = randn(B, smax, hkv, d, dtype=dtype, gen=gen)
    vd = randn(B, smax, hkv, d, dtype=dtype, gen=gen)
    seqlens = lengths_tensor([5, 9])
    kw = {}
    if fp8:
        kd, vd = kd.to(torch.float8_e4m3fn), vd.to(torch.float8_e4m3fn)
        kw = {"k_scale": torch.tensor(0.5), "v_scale": torch.tensor([1.0, 2.0])}
    if paged:
        kd, table = build_paged(kd, seqlens, 4, gen=gen, poison=False)
        vd, _ = build_paged(vd, seqlens, 4, gen=seeded(1), poison=False)
        kw["block_table"] = table
    return q, kd, vd, seqlens, kw


# ------------------------------------------------------------------------------ backend choice


def test_auto_on_cpu_tensors_is_reference(monkeypatch):
    monkeypatch.delenv("KVKERNELS_BACKEND", raising=False)
    assert api.resolve_backend("decode", None, torch.device("cpu")) == "reference"


def test_env_override_and_explicit_backend(monkeypatch):
    monkeypatch.setenv("KVKERNELS_BACKEND", "reference")
    assert api.resolve_backend("decode", None, torch.device("cuda")) == "reference"
    monkeypatch.setenv("KVKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="KVKERNELS_BACKEND"):
        api.resolve_backend("decode", None, torch.device("cpu"))
    monkeypatch.delenv("KVKERNELS_BACKEND")
    with pytest.raises(ValueError, match="backend must be one of"):
        kvkernels.decode_attention(*small_decode_case()[:4], backend="flash")


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    q, kc, vc, seqlens, _ = small_decode_case()
    with pytest.raises(ValueError, match="backend 'cuda'"):
        kvkernels.decode_attention(q, kc, vc, seqlens, backend="cuda")


@pytest.mark.skipif(not kvkernels.triton.INTERPRET, reason="Triton on CPU tensors needs the interpreter")
def test_every_backend_gives_the_same_answer_on_cpu():
    q, kc, vc, seqlens, kw = small_decode_case(paged=True)
    ref = kvkernels.decode_attention(q, kc, vc, seqlens, backend="reference", **kw)
    tri = kvkernels.decode_attention(q, kc, vc, seqlens, backend="triton", **kw)
    torch.testing.assert_close(tri, ref, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------- torch.library


def _opcheck(op, args, schema=True):
    # test_autograd_registration is for ops with autograd; these are inference ops. test_schema compares
    # inputs with arithmetic that CPU float8 does not implement, so fp8 cases skip only that utility.
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") + (("test_schema",) if schema else ())
    torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("paged,fp8", [(False, False), (True, False), (True, True)])
def test_opcheck_decode(backend, paged, fp8):
    q, kc, vc, seqlens, kw = small_decode_case(paged=paged, fp8=fp8)
    ks = kw.get("k_scale")
    vs = kw.get("v_scale")
    ks = None if ks is None else ks.reshape(-1).expand(2)
    vs = None if vs is None else vs.reshape(-1).expand(2)
    _opcheck(torch.ops.kvkernels.decode_attention.default,
             (q, kc, vc, seqlens, kw.get("block_table"), 0.25, -1, 0.0, ks, vs, 0, False, backend), schema=not fp8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck_prefill(backend, varlen):
    gen = seeded(2)
    if varlen:
        q, k = randn(7, 4, 16, gen=gen), randn(9, 2, 16, gen=gen)
        cu_q, cu_k = lengths_tensor([0, 3, 7]), lengths_tensor([0, 4, 9])
        args = (q, k, k, cu_q, cu_k, 4, 5)
    else:
        q, k = randn(2, 5, 4, 16, gen=gen), randn(2, 6, 2, 16, gen=gen)
        args = (q, k, k, None, None, 5, 6)
    _opcheck(torch.ops.kvkernels.prefill_attention.default, args + (0.25, -1, 0, 0.0, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_appends(backend):
    gen = seeded(3)
    kc = randn(2, 8, 2, 16, gen=gen)
    vc = randn(2, 8, 2, 16, gen=gen)
    k = randn(2, 3, 2, 16, gen=gen)
    _opcheck(torch.ops.kvkernels.append_kv.default, (k, k, kc, vc, lengths_tensor([0, 5]), None, None, None, backend))
    slots = torch.tensor([3, -1, 12], dtype=torch.int64)
    _opcheck(torch.ops.kvkernels.append_kv_slots.default, (k[0], k[0], kc, vc, slots, None, None, backend))


# --------------------------------------------------------------------------- torch.compile


def test_compiled_decode_and_append_match_eager():
    q, kc, vc, seqlens, kw = small_decode_case(paged=True)
    new_k = randn(2, 1, 2, 16, gen=seeded(4))

    def step(q, new_k, kc, vc, seqlens, table):
        kvkernels.append_kv(new_k, new_k, kc, vc, seqlens, block_table=table)
        return kvkernels.decode_attention(q, kc, vc, seqlens + 1, block_table=table, return_lse=True)

    table = kw["block_table"]
    seqlens = lengths_tensor([5, 7])
    kc2, vc2 = kc.clone(), vc.clone()
    eager = step(q, new_k, kc, vc, seqlens, table)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, new_k, kc2, vc2, seqlens, table)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2), "the compiled append must mutate the caches"
    torch.testing.assert_close(compiled[0], eager[0], atol=0, rtol=0)
    torch.testing.assert_close(compiled[1], eager[1], atol=0, rtol=0)


def test_compiled_prefill_matches_eager():
    gen = seeded(5)
    q, k = randn(1, 6, 4, 16, gen=gen), randn(1, 6, 2, 16, gen=gen)
    f = torch.compile(lambda q, k: kvkernels.prefill_attention(q, k, k, causal=True, return_lse=True),
                      fullgraph=True)
    out, lse = f(q, k)
    ref_out, ref_lse = kvkernels.prefill_attention(q, k, k, causal=True, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


# ------------------------------------------------------------------------------------ switches


def test_set_batch_invariant_applies_now_and_restores_in_with():
    assert not config.batch_invariant()
    with kvkernels.set_batch_invariant():
        assert config.batch_invariant()
    assert not config.batch_invariant()
    kvkernels.set_batch_invariant(True)
    try:
        assert config.batch_invariant()
    finally:
        kvkernels.set_batch_invariant(False)


def test_return_lse_shapes_and_empty_sequence():
    q, kc, vc, _, _ = small_decode_case()
    out, lse = kvkernels.decode_attention(q, kc, vc, lengths_tensor([0, 3]), return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4) and lse.dtype == torch.float32
    assert torch.all(out[0] == 0) and torch.isneginf(lse[0]).all()


def test_merge_attention_states_public():
    gen = seeded(6)
    out_a, out_b = randn(3, 4, 8, gen=gen), randn(3, 4, 8, gen=gen)
    lse_a, lse_b = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    out, lse = kvkernels.merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    with pytest.raises(ValueError, match="lse_b"):
        kvkernels.merge_attention_states(out_a, lse_a, out_b, lse_b[:, :2])
