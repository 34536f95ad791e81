"""Rotary embedding: apply_rotary and the rotation fused into append_kv / append_kv_slots.

The contract (kvkernels.api.append_kv): key i of sequence b is rotated at position
cache_seqlens[b] + i (append_kv_slots: positions[t]) over its first rotary_dim = 2 * cos.shape[1]
dims, GPT-NeoX halves (x[j], x[j + rotary_dim/2]) or GPT-J pairs (x[2j], x[2j+1]),
x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, in fp32, then rounded (or fp8-quantized) once; values
are stored unchanged. The oracle here is written independently of kvkernels.reference, in the
"rotate_half" form of the HF implementations (x * cos + rotate_half(x) * sin, with cos/sin spread over
the rotated dims): (-x2) * s is -(x2 * s) exactly and a + (-b) is a - b exactly, so both forms give the
same fp32 bits, and a kernel that fuses a multiply-add (or rounds twice) fails the comparison on the
fp32 caches (rounded on to fp16/bf16/fp8 the two usually agree, so those cases check the rest).
Every append is compared byte for byte against that rotation stored through reference.append_kv (fp32
keys, so rounded once), on NaN-poisoned caches whose unaddressed rows must keep their poison.
"""

from __future__ import annotations

import pytest
import torch

import kvkernels
from conftest import kernel_backends, lengths_tensor, run_or_skip, seeded
from kvkernels import reference

FP8 = torch.float8_e4m3fn
BACKENDS = [pytest.param("reference", "cpu", id="reference")] + kernel_backends()


# ------------------------------------------------------------------------- the independent oracle


def rope_table(max_position: int, rotary_dim: int, dtype=torch.float32, base: float = 10000.0):
    """cos/sin [max_position, rotary_dim / 2] of the usual rotary frequencies base^(-2j / rotary_dim)."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_fp32(x, cos, sin, positions, interleaved):
    """x [..., H, D] -> fp32, first rotary_dim dims rotated at positions [...] (rotate_half form)."""
    rd = 2 * cos.shape[1]
    x = x.float()
    c = cos.float()[positions.long()]  # [..., rd / 2]
    s = sin.float()[positions.long()]
    rot, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        c, s = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
        pairs = rot.unflatten(-1, (rd // 2, 2))
        half_turn = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:
        c, s = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)
        half_turn = torch.cat((-rot[..., rd // 2:], rot[..., :rd // 2]), dim=-1)
    out = rot * c.unsqueeze(-2) + half_turn * s.unsqueeze(-2)
    return torch.cat((out, rest), dim=-1)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32).to(dtype)


def sources(shape, dtype, gen, fp8):
    scale = 150.0 if fp8 else 1.0  # fp8: values past 448 / scale too, so saturation is exercised
    k = (torch.randn(*shape, generator=gen) * scale).to(dtype)
    v = (torch.randn(*shape, generator=gen) * scale).to(dtype)
    return k, v


# ------------------------------------------------------------------------------------ apply_rotary


@pytest.mark.parametrize("dtype,cos_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [64, 32, 2], ids=["full", "half", "one-pair"])
def test_apply_rotary_matches_the_independent_oracle(dtype, cos_dtype, interleaved, rotary_dim):
    gen = seeded(1)
    q = torch.randn(3, 5, 4, 64, generator=gen).to(dtype)
    positions = torch.randint(0, 300, (3, 5), generator=gen)
    cos, sin = rope_table(300, rotary_dim, cos_dtype)
    expect = rotate_fp32(q, cos, sin, positions, interleaved).to(dtype)
    assert torch.equal(bits(reference.apply_rotary(q, cos, sin, positions, interleaved=interleaved)), bits(expect))
    got = kvkernels.apply_rotary(q, cos, sin, positions, interleaved=interleaved)
    assert torch.equal(bits(got), bits(expect))
    assert torch.equal(bits(got[..., rotary_dim:]), bits(q[..., rotary_dim:])), "dims past rotary_dim changed"
    # ragged [T, H, D] with positions [T], and in place
    flat = q.flatten(0, 1).clone()
    out = kvkernels.apply_rotary(flat, cos, sin, positions.flatten().to(torch.int32), interleaved=interleaved,
                                 inplace=True)
    assert out is flat and torch.equal(bits(flat), bits(expect.flatten(0, 1)))


def test_apply_rotary_is_a_rotation():
    """Not just self-consistent: in fp64 terms each pair keeps its norm and turns by the table's angle."""
    gen = seeded(2)
    x = torch.randn(7, 2, 16, generator=gen)
    pos = torch.arange(7)
    cos, sin = rope_table(7, 16)
    out = kvkernels.apply_rotary(x, cos, sin, pos).double()
    x1, x2, o1, o2 = x[..., :8].double(), x[..., 8:].double(), out[..., :8], out[..., 8:]
    torch.testing.assert_close(o1 ** 2 + o2 ** 2, x1 ** 2 + x2 ** 2, rtol=1e-5, atol=1e-5)
    angle = torch.atan2(x1 * o2 - x2 * o1, x1 * o1 + x2 * o2)  # turn from (x1, x2) to (o1, o2)
    want = torch.atan2(sin.double(), cos.double())[pos].unsqueeze(1).expand_as(angle)
    torch.testing.assert_close(torch.remainder(angle - want + torch.pi, 2 * torch.pi) - torch.pi,
                               torch.zeros_like(angle), atol=1e-4, rtol=0)
    assert torch.equal(out[0].float(), x[0]), "position 0 (cos 1, sin 0) is the identity"


# ------------------------------------------------------------------------------- fused in the append

# name -> (cache dtype, key dtype, table dtype, scale kind, interleaved, rotary_dim of D = 64)
CASES = {
    "fp16-neox-full": (torch.float16, torch.float16, torch.float32, None, False, 64),
    "bf16-gptj-partial": (torch.bfloat16, torch.bfloat16, torch.bfloat16, None, True, 32),
    # fp32 caches keep every fp32 bit: they are the cases a fused multiply-add or a second rounding fails
    # (rounded to fp16/bf16/fp8 the two usually agree)
    "fp32-neox-partial": (torch.float32, torch.float32, torch.float32, None, False, 16),
    "fp32-gptj-full": (torch.float32, torch.float32, torch.float32, None, True, 64),
    "fp16-gptj-fp16-table": (torch.float16, torch.float16, torch.float16, None, True, 64),
    "fp8-from-bf16-per-head-neox": (FP8, torch.bfloat16, torch.float32, "head", False, 32),
    "fp8-from-fp16-per-tensor-gptj": (FP8, torch.float16, torch.float32, "tensor", True, 64),
    # rotary_dim / 2 not a multiple of the CUDA kernel's vector (8 fp16, 16 fp8): its element-load path
    "fp16-neox-rotary-dim-20": (torch.float16, torch.float16, torch.float32, None, False, 20),
    "fp8-from-fp32-per-head-neox-rotary-dim-48": (FP8, torch.float32, torch.float32, "head", False, 48),
}
LAYOUTS = ["dense-contiguous", "dense-paged", "ragged-paged", "ragged-contiguous", "slots"]
MAX_POSITION = 64


def scales(kind, hkv, gen):
    """(public kwargs, the oracle's fp32 [Hkv] kwargs)."""
    if kind is None:
        return {}, {}
    if kind == "tensor":
        ks, vs = torch.tensor(0.37), torch.tensor(1.9)
    else:
        ks, vs = torch.rand(hkv, generator=gen) + 0.05, torch.rand(hkv, generator=gen) * 3 + 0.1
    return {"k_scale": ks, "v_scale": vs}, {"k_scale": ks.reshape(-1).expand(hkv), "v_scale": vs.reshape(-1).expand(hkv)}


def scenario(layout, cache_dtype, src_dtype, gen, hkv=2, d=64):
    """A poisoned cache and an append for one layout.

    -> (k, v, k_cache, v_cache, call kwargs (without rotary), fused_args(k, v) -> the expected-value
    call of reference.append_kv / append_kv_slots with already rotated fp32 keys, written bool mask
    [rows of cache.shape[:2]])."""
    fp8 = cache_dtype == FP8
    starts, counts = [3, 15, 0, 40], [2, 1, 6, 3]  # page boundaries of 16 crossed; ends <= MAX_POSITION
    B = len(starts)
    if layout.startswith("dense"):
        counts = [3] * B
    table = None
    if layout.endswith("contiguous"):
        shape = (B, 48, hkv, d)
    else:
        page_size, max_pages = 16, 3
        num_pages = B * max_pages + 2  # spare pages stay poisoned
        shape = (num_pages, page_size, hkv, d)
        table = torch.randperm(num_pages, generator=gen)[:B * max_pages].reshape(B, max_pages).to(torch.int32)
    kc, vc = poisoned(shape, cache_dtype), poisoned(shape, cache_dtype)
    written = torch.zeros(shape[:2], dtype=torch.bool)
    seqlens = lengths_tensor(starts)

    def row(b, pos):
        return (b, pos) if table is None else (int(table[b, pos // shape[1]]), pos % shape[1])

    if layout == "slots":
        # tokens of several sequences, one slot skipped (-1, its position is garbage on purpose)
        tok = [(b, starts[b] + i) for b in range(B) for i in range(counts[b])]
        slots, positions = [], []
        for t, (b, pos) in enumerate(tok):
            skip = t == 4
            r = row(b, pos)
            slots.append(-1 if skip else r[0] * shape[1] + r[1])
            positions.append(10 ** 6 if skip else pos)
            if not skip:
                written[r] = True
        k, v = sources((len(tok), hkv, d), src_dtype, gen, fp8)
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        pos_t = torch.tensor(positions, dtype=torch.int32)
        kw = dict(positions=pos_t)
        return k, v, kc, vc, ("slots", slot_mapping), kw, pos_t.clamp(max=MAX_POSITION - 1), written
    for b in range(B):
        for i in range(counts[b]):
            written[row(b, starts[b] + i)] = True
    if layout.startswith("dense"):
        k, v = sources((B, counts[0], hkv, d), src_dtype, gen, fp8)
        pos = seqlens.long()[:, None] + torch.arange(counts[0])
        kw = dict(block_table=table)
    else:
        k, v = sources((sum(counts), hkv, d), src_dtype, gen, fp8)
        cu = lengths_tensor([0] + torch.tensor(counts).cumsum(0).tolist())
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)])
        kw = dict(block_table=table, cu_seqlens=cu)
    return k, v, kc, vc, ("append", seqlens), kw, pos, written


def append(kind, index, k, v, kc, vc, kw):
    if kind == "slots":
        return kvkernels.append_kv_slots(k, v, kc, vc, index, **kw)
    return kvkernels.append_kv(k, v, kc, vc, index, **kw)


# Every dtype case on the richest layout (ragged over shuffled pages), every layout on two cases: the
# Triton interpreter runs one Python program per token, so the full product would cost minutes.
LAYOUT_CASES = [("ragged-paged", case) for case in CASES]
LAYOUT_CASES += [(layout, case) for layout in LAYOUTS if layout != "ragged-paged"
                 for case in ("fp16-neox-full", "fp8-from-bf16-per-head-neox")]
LAYOUT_CASES += [("slots", "bf16-gptj-partial"), ("dense-contiguous", "fp32-neox-partial"), ("slots", "fp32-gptj-full")]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout,case", LAYOUT_CASES)
def test_fused_rotary_append_is_bit_exact(backend, device, layout, case):
    cache_dtype, src_dtype, table_dtype, scale_kind, interleaved, rotary_dim = CASES[case]
    gen = seeded(3)
    k, v, kc, vc, (kind, index), kw, pos, written = scenario(layout, cache_dtype, src_dtype, gen)
    cos, sin = rope_table(MAX_POSITION, rotary_dim, table_dtype)
    public_scales, ref_scales = scales(scale_kind, k.shape[-2], gen)
    before_k, before_v = kc.clone(), vc.clone()

    # expected: the independent rotation in fp32, stored by the reference (rounded / quantized once)
    expect_k, expect_v = kc.clone(), vc.clone()
    k_rot = rotate_fp32(k, cos, sin, pos, interleaved)
    if kind == "slots":
        reference.append_kv_slots(k_rot, v, expect_k, expect_v, index, **ref_scales)
    else:
        reference.append_kv(k_rot, v, expect_k, expect_v, index, block_table=kw["block_table"],
                            cu_seqlens=kw.get("cu_seqlens"), **ref_scales)

    run_or_skip(backend, lambda: append(kind, index, k, v, kc, vc, dict(
        kw, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, backend=backend, **public_scales)))

    for got, old, want in ((kc, before_k, expect_k), (vc, before_v, expect_v)):
        assert torch.equal(bits(got), bits(want)), "fused rotary append differs from rotate-then-store"
        assert torch.equal(bits(got)[~written], bits(old)[~written]), "a row the append does not address changed"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_equals_rotate_then_append_in_two_launches(backend, device):
    """For a cache of k's dtype the fused append is exactly apply_rotary followed by a plain append."""
    gen = seeded(4)
    k, v, kc, vc, (kind, seqlens), kw, pos, _ = scenario("ragged-paged", torch.bfloat16, torch.bfloat16, gen)
    cos, sin = rope_table(MAX_POSITION, 48)
    kc2, vc2 = kc.clone(), vc.clone()
    run_or_skip(backend, lambda: kvkernels.append_kv(k, v, kc, vc, seqlens, rotary_cos=cos, rotary_sin=sin,
                                                     backend=backend, **kw))
    k_rot = kvkernels.apply_rotary(k, cos, sin, pos)
    kvkernels.append_kv(k_rot, v, kc2, vc2, seqlens, backend=backend, **kw)
    assert torch.equal(bits(kc), bits(kc2)) and torch.equal(bits(vc), bits(vc2))


# ---------------------------------------------------------------------------------------- bad input


def _dense_case(dtype=torch.float16, S_max=32):
    gen = seeded(5)
    kc, vc = poisoned((2, S_max, 2, 64), dtype), poisoned((2, S_max, 2, 64), dtype)
    k = torch.randn(2, 3, 2, 64, generator=gen).to(dtype)
    return k, kc, vc, lengths_tensor([4, 20])


def _table(n=24, rd=64, dtype=torch.float32):
    return rope_table(n, rd, dtype)


cos24, sin24 = _table()
BAD_APPEND = {
    "cos-without-sin": (dict(rotary_cos=cos24), ValueError, "rotary_cos was given without rotary_sin"),
    "sin-without-cos": (dict(rotary_sin=sin24), ValueError, "rotary_sin was given without rotary_cos"),
    "shapes-differ": (dict(rotary_cos=cos24, rotary_sin=sin24[:, :16]), ValueError, "same shape and dtype"),
    "dtypes-differ": (dict(rotary_cos=cos24, rotary_sin=sin24.half()), ValueError, "same shape and dtype"),
    "rotary-dim-past-head-dim": (dict(zip(("rotary_cos", "rotary_sin"), _table(24, 128))), ValueError,
                                 r"2 <= rotary_dim <= head dim 64 .*rotary_dim = 128"),
    "table-1-d": (dict(rotary_cos=cos24[0], rotary_sin=sin24[0]), ValueError, "rotary_cos must have 2 dimensions"),
    "table-dtype": (dict(zip(("rotary_cos", "rotary_sin"), _table(24, 64, torch.bfloat16))), TypeError,
                    "rotary_cos must have dtype in"),
    "table-too-short": (dict(zip(("rotary_cos", "rotary_sin"), _table(22, 64))), ValueError,
                        r"sequence 1's appended positions run to cache_seqlens\[1\] \+ 3 - 1 = 22, past the "
                        r"cos/sin table's 22 positions"),
    "interleaved-not-bool": (dict(rotary_cos=cos24, rotary_sin=sin24, rotary_interleaved=1), TypeError,
                             "rotary_interleaved must be a bool"),
}


@pytest.mark.parametrize("case", list(BAD_APPEND))
def test_bad_rotary_append_raises_and_writes_nothing(case):
    kwargs, exc, match = BAD_APPEND[case]
    k, kc, vc, seqlens = _dense_case()
    before_k, before_v = bits(kc).clone(), bits(vc).clone()
    with pytest.raises(exc, match=match):
        kvkernels.append_kv(k, k, kc, vc, seqlens, **kwargs)
    assert torch.equal(bits(kc), before_k) and torch.equal(bits(vc), before_v)


def test_rotary_keys_must_be_fp16_bf16_or_fp32():
    k, kc, vc, seqlens = _dense_case(torch.float64)
    with pytest.raises(TypeError, match="rotary embedding: k must be float16, bfloat16 or float32"):
        kvkernels.append_kv(k, k, kc, vc, seqlens, rotary_cos=cos24.double(), rotary_sin=sin24.double())


BAD_SLOTS = {
    "rotary-without-positions": (dict(rotary_cos=cos24, rotary_sin=sin24), ValueError, "needs positions"),
    "positions-without-rotary": (dict(positions=torch.arange(3)), ValueError, "positions is only used by the rotary"),
    "positions-wrong-length": (dict(rotary_cos=cos24, rotary_sin=sin24, positions=torch.arange(4)), ValueError,
                               r"positions must have shape \[3\]"),
    "positions-float": (dict(rotary_cos=cos24, rotary_sin=sin24, positions=torch.arange(3.0)), TypeError,
                        "positions must have dtype in"),
    "position-past-table": (dict(rotary_cos=cos24, rotary_sin=sin24, positions=torch.tensor([0, 24, 5])),
                            ValueError, r"positions.max\(\) = 24 is past the cos/sin table's 24 positions"),
    "negative-position": (dict(rotary_cos=cos24, rotary_sin=sin24, positions=torch.tensor([0, -2, 5])),
                          ValueError, "positions must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_SLOTS))
def test_bad_rotary_slot_append_raises_and_writes_nothing(case):
    kwargs, exc, match = BAD_SLOTS[case]
    k, kc, vc, _ = _dense_case()
    k = k[0]  # [T = 3, Hkv, D]
    slots = torch.tensor([0, 40, 7], dtype=torch.int32)
    before_k, before_v = bits(kc).clone(), bits(vc).clone()
    with pytest.raises(exc, match=match):
        kvkernels.append_kv_slots(k, k, kc, vc, slots, **kwargs)
    assert torch.equal(bits(kc), before_k) and torch.equal(bits(vc), before_v)


def test_a_skipped_slot_needs_no_valid_position():
    k, kc, vc, _ = _dense_case()
    slots = torch.tensor([0, -1, 7], dtype=torch.int32)
    kvkernels.append_kv_slots(k[0], k[0], kc, vc, slots, rotary_cos=cos24, rotary_sin=sin24,
                              positions=torch.tensor([0, 999, 5]))


def test_ragged_table_check_names_the_sequence():
    k, kc, vc, seqlens = _dense_case()
    cu = lengths_tensor([0, 1, 6])
    kt = k.flatten(0, 1)
    before = bits(kc).clone()
    with pytest.raises(ValueError, match=r"sequence 1's appended positions run to cache_seqlens\[1\] \+ 5 - 1 = 24"):
        kvkernels.append_kv(kt, kt, kc, vc, seqlens, cu_seqlens=cu, rotary_cos=cos24, rotary_sin=sin24)
    assert torch.equal(bits(kc), before)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(positions=torch.arange(5)), ValueError, r"positions must have shape \[3, 5\]"),
    (dict(positions=torch.full((3, 5), 24)), ValueError, "past the cos/sin table's 24 positions"),
    (dict(sin=None), ValueError, "needs both cos and sin"),
    (dict(zip(("cos", "sin"), _table(24, 80))), ValueError, "rotary_dim = 80"),
    (dict(inplace=1), TypeError, "inplace must be a bool"),
], ids=["positions-not-per-token", "position-past-table", "no-sin", "rotary-dim-past-head-dim", "inplace-not-bool"])
def test_bad_apply_rotary_raises(bad, exc, match):
    q = torch.randn(3, 5, 4, 64, generator=seeded(6)).half()
    args = dict(cos=cos24, sin=sin24, positions=torch.zeros(3, 5, dtype=torch.int64))
    opts = {k: bad.pop(k) for k in ("inplace",) if k in bad}
    args.update(bad)
    before = q.clone()
    with pytest.raises(exc, match=match):
        kvkernels.apply_rotary(q, args["cos"], args["sin"], args["positions"], **opts)
    assert torch.equal(q, before)


# ------------------------------------------------------------------------------- torch.library / compile


def test_opcheck_rotary_appends():
    gen = seeded(7)
    kc = torch.randn(2, 8, 2, 16, generator=gen)
    vc = torch.randn(2, 8, 2, 16, generator=gen)
    k = torch.randn(2, 3, 2, 16, generator=gen)
    cos, sin = rope_table(8, 12)
    utils = ("test_faketensor", "test_aot_dispatch_dynamic", "test_schema")
    torch.library.opcheck(torch.ops.kvkernels.append_kv.default,
                          (k, k, kc, vc, lengths_tensor([0, 5]), None, None, None, "reference", None, cos, sin, True),
                          test_utils=utils)
    slots = torch.tensor([3, -1, 12], dtype=torch.int64)
    torch.library.opcheck(torch.ops.kvkernels.append_kv_slots.default,
                          (k[0], k[0], kc, vc, slots, None, None, "reference", torch.tensor([1, 0, 4]), cos, sin,
                           False), test_utils=utils)


def test_compiled_rotary_step_matches_eager():
    gen = seeded(8)
    kc = torch.randn(2, 16, 2, 16, generator=gen)
    vc = torch.randn(2, 16, 2, 16, generator=gen)
    q, k = torch.randn(2, 1, 4, 16, generator=gen), torch.randn(2, 1, 2, 16, generator=gen)
    cos, sin = rope_table(16, 16)
    seqlens = lengths_tensor([5, 9])

    def step(q, k, kc, vc, seqlens):
        kvkernels.append_kv(k, k, kc, vc, seqlens, rotary_cos=cos, rotary_sin=sin)
        q = kvkernels.apply_rotary(q, cos, sin, seqlens[:, None])
        return kvkernels.decode_attention(q[:, 0], kc, vc, seqlens + 1)

    kc2, vc2 = kc.clone(), vc.clone()
    eager = step(q, k, kc, vc, seqlens)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, kc2, vc2, seqlens)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2), "the compiled append must mutate the caches"
    assert torch.equal(compiled, eager)


# ------------------------------------------------------------------------------------------ benchmark


def test_bench_script_lists_its_scenarios_and_checks_bits_on_cpu(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_append_rotary.py"
    spec = importlib.util.spec_from_file_location("bench_append_rotary", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--list", "--batch", "1,4", "--new-tokens", "1"]) == 0
    assert capsys.readouterr().out.count("fused vs unfused") == 4  # 2 shapes x cuda, triton
    if not torch.cuda.is_available():  # tiny shapes, same bits fused and unfused (no timing claimed)
        assert bench.main(["--cpu-smoke", "--backend", "reference", "--interleaved"]) == 0
        assert "same bits: True" in capsys.readouterr().out
