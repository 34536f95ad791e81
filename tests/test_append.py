"""append_kv / append_kv_slots: the kernels against the oracle, bit for bit (DESIGN.md section 4).

Every cache starts NaN-poisoned; after an append it must equal the reference's result bit for bit
(compared as bytes: NaN != NaN as floats), and every row the append does not address must still hold
its poison. Runs the Triton kernels in the interpreter on the CPU, and the CUDA and Triton kernels
on a GPU (kernel_backends()).
"""

from __future__ import annotations

import pytest
import torch

import kvkernels
from conftest import kernel_backends, lengths_tensor, randn, seeded
from kvkernels import api, reference
from kvkernels.triton import INTERPRET

FP8 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_FORMATS = [pytest.param(FP8, id="e4m3"), pytest.param(E5M2, id="e5m2")]

# name -> (cache dtype, source dtype, scale kind)
DTYPE_CASES = {
    "fp16": (torch.float16, torch.float16, None),
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "fp8-from-fp16-per-tensor": (FP8, torch.float16, "tensor"),
    "fp8-from-bf16-per-head": (FP8, torch.bfloat16, "head"),
    "fp8-from-fp32-per-head": (FP8, torch.float32, "head"),
    "e5m2-from-fp16-per-head": (E5M2, torch.float16, "head"),
    "e5m2-from-bf16-per-tensor": (E5M2, torch.bfloat16, "tensor"),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (last dim contiguous), on the CPU: NaN compares equal to itself."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32).to(dtype).to(device)


def make_scales(kind, hkv, gen, device):
    """Public-API scales (shape [] or [Hkv]) and the oracle's normalised fp32 [Hkv] views."""
    if kind is None:
        return {}, {}
    if kind == "tensor":
        ks, vs = torch.tensor(0.37), torch.tensor(1.9)
    else:  # per head, not powers of two: the division really rounds
        ks, vs = torch.rand(hkv, generator=gen) + 0.05, torch.rand(hkv, generator=gen) * 3 + 0.1
    public = {"k_scale": ks.to(device), "v_scale": vs.to(device)}
    return public, {n: s.reshape(-1).expand(hkv) for n, s in public.items()}


def sources(shape, dtype, gen, device, fp8):
    """fp8: False, True (e4m3) or the fp8 cache dtype. fp8 caches get magnitudes past their largest
    value / scale too (448 e4m3, 57344 e5m2; fp16 sources then overflow to inf now and then), so
    saturation is exercised."""
    scale = 2.0**14 if fp8 is E5M2 else 150.0 if fp8 else 1.0
    return randn(*shape, dtype=dtype, gen=gen, device=device, scale=scale), \
        randn(*shape, dtype=dtype, gen=gen, device=device, scale=scale)


def fp8_of(cache_dtype):
    """The fp8 format of a cache dtype, or False."""
    return cache_dtype if cache_dtype in (FP8, E5M2) else False


def assert_only_rows_written(cache, before, expect, written):
    """cache == expect byte for byte; rows outside `written` [pages, page_size] hold their old bytes."""
    got, old = bits(cache), bits(before)
    assert torch.equal(got, bits(expect)), "append differs from the reference"
    assert torch.equal(got[~written], old[~written]), "a row the append does not address changed"


# ----------------------------------------------------------------------------------- append_kv


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("case", list(DTYPE_CASES))
@pytest.mark.parametrize("starts,s_new", [([0, 17, 40 - 5, 3], 5), ([39, 0, 22, 16], 1)],
                         ids=["multi-token-to-capacity", "decode-step"])
def test_contiguous_append_is_bit_exact(backend, device, case, starts, s_new):
    cache_dtype, src_dtype, scale_kind = DTYPE_CASES[case]
    gen = seeded(1)
    B, S_max, hkv, d = len(starts), 40, 2, 64
    kc, vc = poisoned((B, S_max, hkv, d), cache_dtype, device), poisoned((B, S_max, hkv, d), cache_dtype, device)
    k, v = sources((B, s_new, hkv, d), src_dtype, gen, device, fp8_of(cache_dtype))
    scales, ref_scales = make_scales(scale_kind, hkv, gen, device)
    seqlens = lengths_tensor(starts, device)
    before_k, before_v = kc.clone(), vc.clone()
    expect_k, expect_v = kc.clone(), vc.clone()
    reference.append_kv(k, v, expect_k, expect_v, seqlens, **ref_scales)

    kvkernels.append_kv(k, v, kc, vc, seqlens, backend=backend, **scales)

    written = torch.zeros(B, S_max, dtype=torch.bool)
    for b, start in enumerate(starts):
        written[b, start:start + s_new] = True
    assert_only_rows_written(kc, before_k, expect_k, written)
    assert_only_rows_written(vc, before_v, expect_v, written)


def shuffled_table(B, max_pages, num_pages, gen, device):
    return torch.randperm(num_pages, generator=gen)[:B * max_pages].reshape(B, max_pages).to(torch.int32).to(device)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("case", list(DTYPE_CASES))
@pytest.mark.parametrize("page_size,starts,s_new", [(16, [15, 16, 17, 0], 17), (16, [31, 1, 47, 32], 1),
                                                    (5, [4, 5, 6, 0], 11)],
                         ids=["page-boundary-pm1", "decode-step", "odd-page-size"])
def test_paged_append_is_bit_exact(backend, device, case, page_size, starts, s_new):
    cache_dtype, src_dtype, scale_kind = DTYPE_CASES[case]
    gen = seeded(2)
    B, hkv, d = len(starts), 2, 64
    max_pages = -(-(max(starts) + s_new) // page_size)
    num_pages = B * max_pages + 3  # spare pages stay poisoned
    shape = (num_pages, page_size, hkv, d)
    kc, vc = poisoned(shape, cache_dtype, device), poisoned(shape, cache_dtype, device)
    table = shuffled_table(B, max_pages, num_pages, gen, device)
    k, v = sources((B, s_new, hkv, d), src_dtype, gen, device, fp8_of(cache_dtype))
    scales, ref_scales = make_scales(scale_kind, hkv, gen, device)
    seqlens = lengths_tensor(starts, device)
    before_k, before_v = kc.clone(), vc.clone()
    expect_k, expect_v = kc.clone(), vc.clone()
    reference.append_kv(k, v, expect_k, expect_v, seqlens, block_table=table, **ref_scales)

    kvkernels.append_kv(k, v, kc, vc, seqlens, block_table=table, backend=backend, **scales)

    written = torch.zeros(num_pages, page_size, dtype=torch.bool)
    for b, start in enumerate(starts):
        for pos in range(start, start + s_new):
            written[int(table[b, pos // page_size]), pos % page_size] = True
    assert_only_rows_written(kc, before_k, expect_k, written)
    assert_only_rows_written(vc, before_v, expect_v, written)


# ---------------------------------------------------------------------------- ragged append_kv


def ragged_layout(layout, starts, counts, gen, device, cache_dtype, hkv=2, d=64):
    """Poisoned caches for a ragged append -> (k_cache, v_cache, block_table or None, written(seq, pos) -> rows).

    layout "contiguous" ([B, S_max, Hkv, D]) or "paged-<page_size>" (shuffled table over spare pages)."""
    B = len(starts)
    end = max((s + n for s, n in zip(starts, counts)), default=1)
    if layout == "contiguous":
        shape, table = (B, end + 3, hkv, d), None
    else:
        page_size = int(layout.split("-")[1])
        max_pages = -(-end // page_size) + 1  # one column more than needed
        num_pages = B * max_pages + 3  # spare pages stay poisoned
        shape = (num_pages, page_size, hkv, d)
        table = shuffled_table(B, max_pages, num_pages, gen, device)
    return poisoned(shape, cache_dtype, device), poisoned(shape, cache_dtype, device), table


def ragged_written(cache, table, starts, counts):
    """bool [rows of cache.shape[:2]]: the rows a ragged append of these sequences addresses."""
    written = torch.zeros(cache.shape[:2], dtype=torch.bool)
    for b, (start, n) in enumerate(zip(starts, counts)):
        for pos in range(start, start + n):
            if table is None:
                written[b, pos] = True
            else:
                page_size = cache.shape[1]
                written[int(table[b, pos // page_size]), pos % page_size] = True
    return written


def cu_tensor(counts, device="cpu"):
    return lengths_tensor([0] + torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist(), device)


# Decodes (1 token), nothing (0), a speculative step (7), a prompt chunk (LONG), crossing page boundaries.
RAGGED_STARTS = [0, 3, 15, 16, 255, 1, 40]


def ragged_counts(device):
    # The Triton interpreter runs one Python program per token (~0.1 s here): on the CPU the prompt
    # chunk is 40 tokens (still several pages of 16, 40 pages of 1), on a GPU 500.
    long = 500 if device == "cuda" else 40
    return [1, 0, 7, long, 1, 17, 0]


RAGGED_CASES = [(layout, case) for layout in ("contiguous", "paged-1", "paged-16", "paged-256")
                for case in ("fp16", "fp8-from-bf16-per-head")]
RAGGED_CASES += [("paged-16", case) for case in DTYPE_CASES if case not in ("fp16", "fp8-from-bf16-per-head")]


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("layout,case", RAGGED_CASES)
def test_ragged_append_is_bit_exact(backend, device, layout, case):
    """A mixed batch in one call: every sequence's n_b tokens land at cache_seqlens[b] + i, bit for bit
    the reference's, and every other row (other sequences' rows, spare pages) keeps its poison."""
    cache_dtype, src_dtype, scale_kind = DTYPE_CASES[case]
    gen = seeded(11)
    starts, counts = RAGGED_STARTS, ragged_counts(device)
    kc, vc, table = ragged_layout(layout, starts, counts, gen, device, cache_dtype)
    k, v = sources((sum(counts), 2, 64), src_dtype, gen, device, fp8_of(cache_dtype))
    scales, ref_scales = make_scales(scale_kind, 2, gen, device)
    seqlens, cu = lengths_tensor(starts, device), cu_tensor(counts, device)
    before_k, before_v = kc.clone(), vc.clone()
    expect_k, expect_v = kc.clone(), vc.clone()
    reference.append_kv(k, v, expect_k, expect_v, seqlens, block_table=table, cu_seqlens=cu, **ref_scales)

    kvkernels.append_kv(k, v, kc, vc, seqlens, block_table=table, cu_seqlens=cu, backend=backend, **scales)

    written = ragged_written(kc, None if table is None else table.cpu(), starts, counts)
    assert int(written.sum()) == sum(counts)
    assert_only_rows_written(kc, before_k, expect_k, written)
    assert_only_rows_written(vc, before_v, expect_v, written)


@pytest.mark.parametrize("layout", ["contiguous", "paged-1", "paged-16", "paged-256"])
@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_ragged_reference_is_a_per_token_write(layout, case):
    """The oracle itself, against a loop writing one token at a time (n_b up to 500)."""
    cache_dtype, src_dtype, scale_kind = DTYPE_CASES[case]
    gen = seeded(12)
    starts, counts = RAGGED_STARTS, ragged_counts("cuda")
    kc, vc, table = ragged_layout(layout, starts, counts, gen, "cpu", cache_dtype)
    k, v = sources((sum(counts), 2, 64), src_dtype, gen, "cpu", fp8_of(cache_dtype))
    _, scales = make_scales(scale_kind, 2, gen, "cpu")
    expect_k, expect_v = kc.clone(), vc.clone()
    t = 0
    for b, (start, n) in enumerate(zip(starts, counts)):
        for i in range(n):
            pos = start + i
            page, row = (b, pos) if table is None else (int(table[b, pos // kc.shape[1]]), pos % kc.shape[1])
            expect_k[page, row] = reference.quantize(k[t], scales.get("k_scale"), cache_dtype)
            expect_v[page, row] = reference.quantize(v[t], scales.get("v_scale"), cache_dtype)
            t += 1
    reference.append_kv(k, v, kc, vc, lengths_tensor(starts), block_table=table, cu_seqlens=cu_tensor(counts),
                        **scales)
    assert torch.equal(bits(kc), bits(expect_k)) and torch.equal(bits(vc), bits(expect_v))


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")] + kernel_backends())
def test_ragged_append_with_equal_counts_is_the_dense_append(backend, device):
    gen = seeded(13)
    B, s_new, hkv, d = 3, 5, 2, 64
    k, v = sources((B, s_new, hkv, d), torch.float16, gen, device, fp8=False)
    table = shuffled_table(B, 3, 11, gen, device)
    seqlens = lengths_tensor([0, 11, 27], device)
    dense_k, dense_v = poisoned((11, 16, hkv, d), torch.float16, device), poisoned((11, 16, hkv, d), torch.float16, device)
    ragged_k, ragged_v = dense_k.clone(), dense_v.clone()
    kvkernels.append_kv(k, v, dense_k, dense_v, seqlens, block_table=table, backend=backend)
    kvkernels.append_kv(k.flatten(0, 1), v.flatten(0, 1), ragged_k, ragged_v, seqlens, block_table=table,
                        cu_seqlens=cu_tensor([s_new] * B, device), backend=backend)
    assert torch.equal(bits(ragged_k), bits(dense_k)) and torch.equal(bits(ragged_v), bits(dense_v))


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")] + kernel_backends())
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_empty_ragged_appends_write_nothing(backend, device, paged):
    """B = 0 (cu_seqlens [0]), and sequences that all add 0 tokens (T = 0)."""
    hkv, d = 2, 64
    for B in (0, 3):
        shape = (5, 4, hkv, d) if paged else (B, 8, hkv, d)
        kc = poisoned(shape, torch.float16, device)
        vc = poisoned(shape, torch.float16, device)
        before_k, before_v = kc.clone(), vc.clone()
        table = torch.zeros(B, 2, dtype=torch.int32, device=device) if paged else None
        k = torch.empty(0, hkv, d, dtype=torch.float16, device=device)
        kvkernels.append_kv(k, k, kc, vc, lengths_tensor([1] * B, device), block_table=table,
                            cu_seqlens=cu_tensor([0] * B, device), backend=backend)
        assert torch.equal(bits(kc), bits(before_k)) and torch.equal(bits(vc), bits(before_v))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_ragged_kernels_skip_tokens_outside_every_sequence_or_the_cache(backend, device, paged):
    """Past the API's checks (device values unread without checked mode), a cu_seqlens that does not
    start at 0 or stops short of T leaves tokens in no sequence, and a sequence may run past its
    capacity: the kernels write the tokens that have a row and skip the rest, touching nothing else."""
    gen = seeded(14)
    hkv, d = 2, 64
    T = 12
    cu = [2, 4, 4, 9]  # tokens 0, 1 and 9..11 belong to no sequence; sequence 1 is empty
    starts = [3, 0, 5]  # sequence 2: positions 5..9, past a capacity of 8
    k, v = sources((T, hkv, d), torch.float16, gen, device, fp8=False)
    if paged:
        shape = (7, 4, hkv, d)
        table = torch.tensor([[5, 1], [0, 2], [3, -1]], dtype=torch.int32)  # sequence 2's 2nd page: not a page
    else:
        shape, table = (3, 8, hkv, d), None
    kc, vc = poisoned(shape, torch.float16, device), poisoned(shape, torch.float16, device)
    expect_k, expect_v = kc.clone(), vc.clone()
    for b in range(3):
        for i in range(cu[b + 1] - cu[b]):
            pos = starts[b] + i
            if table is None:
                if pos >= shape[1]:
                    continue
                page, row = b, pos
            else:
                page, row = int(table[b, pos // 4]) if pos // 4 < 2 else -1, pos % 4
                if page < 0:
                    continue
            expect_k[page, row] = k[cu[b] + i]
            expect_v[page, row] = v[cu[b] + i]
    impl = api.get_backend(backend)
    impl.append_kv(k, v, kc, vc, lengths_tensor(starts, device), None if table is None else table.to(device),
                   None, None, lengths_tensor(cu, device))
    assert torch.equal(bits(kc), bits(expect_k)) and torch.equal(bits(vc), bits(expect_v))


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if INTERPRET else []))
def test_opcheck_ragged_append(backend):
    """The custom op with cu_seqlens: schema (caches mutated), fake impl, AOT dispatch."""
    gen = seeded(15)
    kc, vc = randn(7, 4, 2, 16, gen=gen), randn(7, 4, 2, 16, gen=gen)
    k = randn(6, 2, 16, gen=gen)
    table = torch.tensor([[3, 0], [5, 1], [6, 2]], dtype=torch.int32)
    args = (k, k, kc, vc, lengths_tensor([1, 0, 6]), table, None, None, backend, cu_tensor([4, 0, 2]))
    torch.library.opcheck(torch.ops.kvkernels.append_kv.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiled_ragged_append_matches_eager():
    gen = seeded(16)
    kc = poisoned((6, 4, 2, 16), torch.float16, "cpu")
    vc = kc.clone()
    k, v = randn(5, 2, 16, gen=gen), randn(5, 2, 16, gen=gen)
    table = torch.tensor([[2, 4], [0, 5]], dtype=torch.int32)
    seqlens, cu = lengths_tensor([3, 1]), cu_tensor([1, 4])

    def step(k, v, kc, vc):
        kvkernels.append_kv(k, v, kc, vc, seqlens, block_table=table, cu_seqlens=cu)

    kc2, vc2 = kc.clone(), vc.clone()
    step(k, v, kc, vc)
    torch.compile(step, fullgraph=True, backend="aot_eager")(k, v, kc2, vc2)
    assert torch.equal(bits(kc), bits(kc2)) and torch.equal(bits(vc), bits(vc2))


def test_cuda_raw_op_schema_takes_optional_cu_seqlens():
    """The extension's raw op (no GPU needed to read its schema): cu_seqlens is an optional tensor
    defaulting to None, after the old arguments, so dense callers are unchanged; the caches are written."""
    from kvkernels import cuda

    if not cuda.has_op("append_kv"):
        pytest.skip("the CUDA extension is not built")
    schema = torch.ops.kvkernels_C.append_kv.default._schema
    names = [a.name for a in schema.arguments]
    assert names[:9] == ["k", "v", "k_cache", "v_cache", "cache_seqlens", "block_table", "k_scale", "v_scale",
                         "cu_seqlens"]
    assert names[9:] == ["rotary_cos", "rotary_sin", "rotary_interleaved"]  # later additions, all defaulted
    assert all(a.has_default_value() for a in schema.arguments[8:])
    cu = schema.arguments[8]
    assert str(cu.type) == "Optional[Tensor]" and cu.default_value is None and cu.has_default_value()
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"k_cache", "v_cache"} and len(schema.returns) == 0


# ----------------------------------------------------------------------------- append_kv_slots


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("case", list(DTYPE_CASES))
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("cache_shape", [(7, 16), (3, 40)], ids=["paged", "contiguous-as-flat-rows"])
def test_slot_append_is_bit_exact_and_skips_negative_slots(backend, device, case, slot_dtype, cache_shape):
    cache_dtype, src_dtype, scale_kind = DTYPE_CASES[case]
    gen = seeded(3)
    pages, page_size = cache_shape
    hkv, d, T = 2, 64, 12
    shape = (pages, page_size, hkv, d)
    kc, vc = poisoned(shape, cache_dtype, device), poisoned(shape, cache_dtype, device)
    slots = torch.randperm(pages * page_size, generator=gen)[:T]
    slots[[2, 7]] = torch.tensor([-1, -5])  # skipped tokens
    slots = slots.to(slot_dtype).to(device)
    k, v = sources((T, hkv, d), src_dtype, gen, device, fp8_of(cache_dtype))
    scales, ref_scales = make_scales(scale_kind, hkv, gen, device)
    before_k, before_v = kc.clone(), vc.clone()
    expect_k, expect_v = kc.clone(), vc.clone()
    reference.append_kv_slots(k, v, expect_k, expect_v, slots, **ref_scales)

    kvkernels.append_kv_slots(k, v, kc, vc, slots, backend=backend, **scales)

    written = torch.zeros(pages * page_size, dtype=torch.bool)
    kept = slots.cpu()[slots.cpu() >= 0].long()
    written[kept] = True
    written = written.reshape(pages, page_size)
    assert_only_rows_written(kc, before_k, expect_k, written)
    assert_only_rows_written(vc, before_v, expect_v, written)


# ------------------------------------------------------------------------------ fp8 rounding


def _special_fp32_bits(gen, n=4096):
    """Random fp32 bit patterns (every exponent: subnormals, NaN payloads of both signs, infinities)
    plus the rounding boundaries of e4m3 around 448, 464 and 480, and of e5m2 around 57344, 61440
    and its subnormals (steps of 2^-16)."""
    rand = torch.randint(-2**31, 2**31, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    edges = torch.tensor([448.0, 456.0, 464.0, 464.00003, 472.0, 480.0, 2.0**-6, 2.0**-7, 2.0**-9, 2.0**-10,
                          1.5 * 2.0**-10, 0.0302734375, 0.0, float("inf"), float("nan"),
                          53248.0, 57343.996, 57344.0, 57344.004, 61439.996, 61440.0, 61440.004, 65504.0, 65536.0,
                          2.0**-14, 2.0**-15, 2.0**-16, 2.0**-17, 1.5 * 2.0**-16, 2.5 * 2.0**-16, 3.5 * 2.0**-16])
    return torch.cat([rand, edges, -edges])


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("src_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fp8", FP8_FORMATS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter: x / scale of inf and NaN
def test_fp8_quantization_matches_reference_on_every_source_value(backend, device, src_dtype, fp8):
    """Every fp16 / bf16 bit pattern (NaN, inf, subnormals, values past 448 and 57344), or random fp32
    bit patterns plus the e4m3 and e5m2 rounding boundaries, each through a scale of 1 (exact division)
    and a scale that rounds: stored bits equal the oracle's, in either fp8 format."""
    gen = seeded(4)
    if src_dtype == torch.float32:
        values = _special_fp32_bits(gen)
    else:
        values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(src_dtype)
    heads, d = 16, 256  # heads 2j and 2j + 1 hold the same values, under scales 1.0 and 0.3
    per_token = heads // 2 * d
    values = torch.cat([values, values[: (-values.numel()) % per_token]]).reshape(-1, heads // 2, 1, d)
    values = values.expand(-1, -1, 2, d).reshape(-1, heads, d).contiguous().to(device)  # [T, 16, 256]
    T = values.shape[0]
    scales = torch.tensor([1.0, 0.3], device=device).repeat(heads // 2)
    kc, vc = poisoned((T, 1, heads, d), fp8, device), poisoned((T, 1, heads, d), fp8, device)
    expect_k, expect_v = kc.clone(), vc.clone()
    slots = torch.arange(T, device=device)
    reference.append_kv_slots(values, values, expect_k, expect_v, slots, k_scale=scales, v_scale=scales.flip(0))

    kvkernels.append_kv_slots(values, values, kc, vc, slots, k_scale=scales, v_scale=scales.flip(0),
                              backend=backend)

    for got, want in ((kc, expect_k), (vc, expect_v)):
        mismatch = (bits(got) != bits(want)).nonzero()
        assert mismatch.numel() == 0, (
            f"{mismatch.shape[0]} fp8 values differ; first at {mismatch[0].tolist()}: "
            f"source {values.cpu()[tuple(mismatch[0, [0, 2, 3]])].item()!r}")


# fp32 value -> the e5m2 byte cvt.rn.satfinite.e5m2x2.f32 gives (PTX ISA: round to nearest even;
# .satfinite: |x| > 57344 (inf included) -> +-57344, NaN -> NaN, canonical 0x7F), written out by hand.
E5M2_EDGES = [
    (57344.0, 0x7B), (57343.996, 0x7B), (-57344.0, 0xFB),    # the largest finite e5m2, 1.75 * 2^15
    (53248.0, 0x7A), (53248.004, 0x7B),                        # midpoint of 49152 and 57344: tie to even
    (57344.004, 0x7B), (61439.996, 0x7B),                      # just above 57344: rounds down anyway
    (61440.0, 0x7B), (-61440.0, 0xFB), (61440.004, 0x7B),      # the midpoint to 2^16, which RN rounds to inf
    (65504.0, 0x7B), (1e30, 0x7B), (float("inf"), 0x7B), (float("-inf"), 0xFB),  # saturated, never inf
    (float("nan"), 0x7F), (-float("nan"), 0x7F),              # canonical NaN, sign dropped
    (0.0, 0x00), (-0.0, 0x80), (1e-40, 0x00), (-1e-40, 0x80),  # zeros keep their sign (fp32 subnormals too)
    (2.0**-14, 0x04), (2.0**-16, 0x01), (3 * 2.0**-16, 0x03),  # smallest normal; subnormals are k * 2^-16
    (2.0**-17, 0x00), (-2.0**-17, 0x80), (2.0**-17 * 1.0001, 0x01),  # half the smallest: tie to even (0)
    (1.5 * 2.0**-16, 0x02), (2.5 * 2.0**-16, 0x02), (3.5 * 2.0**-16, 0x04),  # subnormal ties to even
    (1.0, 0x3C), (1.125, 0x3C), (1.375, 0x3E), (-1.75, 0xBF), (2.0**15, 0x78),
]


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")] + kernel_backends())
def test_e5m2_edge_values_are_bit_exact(backend, device):
    """The e5m2 conversion at its edges against bytes written out by hand (not the oracle): saturation
    at 57344 for finite values past it and for +-inf, the 61440 boundary, subnormals and their ties,
    signed zeros, NaN. Where torch's own cast differs (it rounds |x| >= 61440 and inf to inf and keeps
    a NaN's sign), the hardware's conversion is the contract."""
    values = torch.tensor([v for v, _ in E5M2_EDGES], dtype=torch.float32)
    want = torch.tensor([b for _, b in E5M2_EDGES], dtype=torch.uint8)
    n = values.numel()
    k = torch.zeros(n, 1, 16)
    k[:, 0, 0] = values
    kc = poisoned((n, 1, 1, 16), E5M2, device)
    vc = poisoned((n, 1, 1, 16), E5M2, device)
    k = k.to(device)
    kvkernels.append_kv_slots(k, k, kc, vc, torch.arange(n, device=device), k_scale=1.0, v_scale=1.0,
                              backend=backend)
    got = bits(kc)[:, 0, 0, 0]
    bad = [(E5M2_EDGES[i][0], hex(int(got[i])), hex(int(want[i]))) for i in range(n) if got[i] != want[i]]
    assert not bad, f"(value, stored, expected): {bad}"
    assert torch.equal(bits(vc), bits(kc))


def test_torch_e5m2_cast_differs_from_the_hardware():
    """Why kvkernels.reference.e5m2_satfinite is not a plain `.to(torch.float8_e5m2)`: torch rounds
    61440 and inf to inf and keeps a NaN's sign. If this fails, torch's cast changed: the reference's
    explicit clamp and NaN are still right, but the note in reference.py should say so."""
    x = torch.tensor([61440.0, float("inf"), -float("nan")])
    assert bits(x.to(E5M2)).tolist() == [0x7C, 0x7C, 0xFF]
    assert bits(reference.e5m2_satfinite(x)).tolist() == [0x7B, 0x7B, 0x7F]


@pytest.mark.skipif(not INTERPRET, reason="about the Triton interpreter")
def test_interpreter_fp8_cast_is_wrong():
    """Why the Triton kernel converts fp32 -> e4m3 with integer arithmetic instead of
    `.to(tl.float8e4nv)`: the interpreter's cast rounds wrongly (a carry into the exponent is lost,
    subnormals and NaN signs differ). If this test fails, the interpreter was fixed and the
    integer conversion in kvkernels/triton/append.py could become a plain cast."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N)
        tl.store(Y + offs, x.to(tl.float8e4nv), mask=offs < N)

    x = torch.tensor([0.0302734375, 0.0166015625, 0.0009775161743164062])  # e4m3 0x10, 0x08, 0x01
    y = torch.empty(3, dtype=FP8)
    cast[(1,)](x, y, 3, BLOCK=4)
    assert not torch.equal(bits(y), bits(x.to(FP8))), "the interpreter's fp8 cast now matches torch"


# --------------------------------------------------------------------------- other properties


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_append_is_deterministic(backend, device):
    gen = seeded(5)
    k, v = sources((3, 9, 2, 64), torch.bfloat16, gen, device, fp8=True)
    table = shuffled_table(3, 3, 10, gen, device)
    seqlens = lengths_tensor([0, 15, 30], device)
    results = []
    for _ in range(2):
        kc, vc = poisoned((10, 16, 2, 64), FP8, device), poisoned((10, 16, 2, 64), FP8, device)
        kvkernels.append_kv(k, v, kc, vc, seqlens, block_table=table, k_scale=torch.tensor(0.7, device=device),
                            v_scale=torch.tensor(1.3, device=device), backend=backend)
        results.append((bits(kc), bits(vc)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_strided_sources_and_caches(backend, device):
    """Views with padded heads / tokens (strides that are not the contiguous ones) read and write
    exactly the viewed elements; the padding stays poisoned."""
    gen = seeded(6)
    B, s_new, hkv, d, S_max = 2, 3, 2, 64, 8
    big_k = randn(B, s_new + 1, hkv + 1, d + 16, gen=gen, device=device)  # [B, S+1, H+1, D+16]
    big_v = randn(B, s_new + 1, hkv + 1, d + 16, gen=gen, device=device)
    k, v = big_k[:, 1:, 1:, :d], big_v[:, :s_new, :hkv, 8:8 + d]
    big_kc = poisoned((B, S_max, hkv + 2, d + 8), torch.float16, device)
    big_vc = poisoned((B, S_max, hkv + 2, d + 8), torch.float16, device)
    kc, vc = big_kc[:, :, 1:1 + hkv, :d], big_vc[:, :, 2:, 8:]
    before_k, before_v = big_kc.clone(), big_vc.clone()
    seqlens = lengths_tensor([2, 5], device)

    kvkernels.append_kv(k, v, kc, vc, seqlens, backend=backend)

    expect_k, expect_v = before_k.clone(), before_v.clone()
    reference.append_kv(k, v, expect_k[:, :, 1:1 + hkv, :d], expect_v[:, :, 2:, 8:], seqlens)
    assert torch.equal(bits(big_kc), bits(expect_k)) and torch.equal(bits(big_vc), bits(expect_v))


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_empty_appends_write_nothing(backend, device):
    kc = poisoned((2, 8, 2, 64), torch.float16, device)
    before = kc.clone()
    k = torch.empty(2, 0, 2, 64, dtype=torch.float16, device=device)
    kvkernels.append_kv(k, k, kc, kc, lengths_tensor([0, 3], device), backend=backend)
    kvkernels.append_kv_slots(k[0], k[0], kc, kc, torch.empty(0, dtype=torch.int64, device=device), backend=backend)
    assert torch.equal(bits(kc), bits(before))
    # a cache of zero rows (page_size 0) and only skipped slots: nothing to address, nothing to divide by
    no_rows = torch.empty(3, 0, 2, 64, dtype=torch.float16, device=device)
    new = randn(2, 2, 64, device=device)
    kvkernels.append_kv_slots(new, new, no_rows, no_rows, torch.tensor([-1, -2], device=device), backend=backend)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("mode", ["contiguous", "paged", "slots"])
def test_kernels_skip_positions_outside_the_cache(backend, device, mode):
    """Past the API's checks (device indices are not read without checked mode), a kernel given a
    position past the capacity, a block-table entry that is not a page, or a slot past the cache
    writes the valid tokens and skips the others, never touching memory outside the caches."""
    gen = seeded(7)
    hkv, d, page_size, num_pages = 2, 64, 4, 6
    impl = api.get_backend(backend)
    if mode == "slots":
        T = 6
        k, v = sources((T, hkv, d), torch.float16, gen, device, fp8=False)
        kc, vc = poisoned((num_pages, page_size, hkv, d), torch.float16, device), \
            poisoned((num_pages, page_size, hkv, d), torch.float16, device)
        slots = torch.tensor([0, num_pages * page_size, 5, -3, 2**40, num_pages * page_size - 1], device=device)
        expect_k, expect_v = kc.clone(), vc.clone()
        for t, s in enumerate(slots.tolist()):
            if 0 <= s < num_pages * page_size:
                expect_k[s // page_size, s % page_size] = k[t]
                expect_v[s // page_size, s % page_size] = v[t]
        impl.append_kv_slots(k, v, kc, vc, slots, None, None)
    else:
        B, s_new = 3, 5
        k, v = sources((B, s_new, hkv, d), torch.float16, gen, device, fp8=False)
        if mode == "contiguous":
            shape, table = (B, 8, hkv, d), None
            seqlens = [6, 0, 2**31 - 3]  # 6 + 5 and 2^31 - 3 + i run past S_max = 8
        else:
            shape = (num_pages, page_size, hkv, d)
            # b=0 runs past max_pages * page_size = 12 (a kernel reading on would find table[1, 0], a
            # valid page); b=1 meets a page index == num_pages, then 2^31 - 1; b=2 meets -1.
            table = torch.tensor([[1, 2, 3], [0, num_pages, 2**31 - 1], [4, -1, 5]], dtype=torch.int32)
            seqlens = [9, 7, 1]
            table = table.to(device)
        kc, vc = poisoned(shape, torch.float16, device), poisoned(shape, torch.float16, device)
        expect_k, expect_v = kc.clone(), vc.clone()
        for b in range(B):
            for i in range(s_new):
                pos = seqlens[b] + i
                if table is None:
                    page, row, ok = b, pos, pos < shape[1]
                else:
                    col, row = pos // page_size, pos % page_size
                    page = int(table[b, col]) if col < table.shape[1] else -1
                    ok = 0 <= page < num_pages
                if ok:
                    expect_k[page, row] = k[b, i]
                    expect_v[page, row] = v[b, i]
        impl.append_kv(k, v, kc, vc, lengths_tensor(seqlens, device), table, None, None)
    assert torch.equal(bits(kc), bits(expect_k)) and torch.equal(bits(vc), bits(expect_v))


def _bad_append(kind, device):
    gen = seeded(8)
    hkv, d = 2, 64
    kw = {}
    cache_dtype = torch.float16
    k, v = sources((2, 3, hkv, d), torch.float16, gen, device, fp8=False)
    seqlens = lengths_tensor([2, 5], device)
    shape = (2, 8, hkv, d)
    if kind == "past capacity":
        seqlens = lengths_tensor([2, 6], device)  # 6 + 3 > 8
    elif kind in ("paged past capacity", "bad page", "negative page"):
        shape = (5, 4, hkv, d)
        table = {"paged past capacity": [[0, 1], [2, 3]], "bad page": [[0, 1], [2, 5]],
                 "negative page": [[0, -1], [2, 3]]}[kind]
        kw["block_table"] = torch.tensor(table, dtype=torch.int32, device=device)
        if kind == "paged past capacity":
            seqlens = lengths_tensor([2, 6], device)  # 6 + 3 > 2 pages * 4
    elif kind == "source dtype":
        k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
    elif kind == "fp8 from an integer source":
        cache_dtype = FP8
        k, v = k.to(torch.int16), v.to(torch.int16)
    kc, vc = poisoned(shape, cache_dtype, device), poisoned(shape, cache_dtype, device)
    return (k, v, kc, vc, seqlens), kw


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("kind,error", [("past capacity", ValueError), ("paged past capacity", ValueError),
                                        ("bad page", ValueError), ("negative page", ValueError),
                                        ("source dtype", TypeError), ("fp8 from an integer source", TypeError)])
def test_bad_input_is_rejected_and_leaves_caches_untouched(backend, device, kind, error):
    args, kw = _bad_append(kind, device)
    kc, vc = args[2], args[3]
    before_k, before_v = bits(kc), bits(vc)
    with kvkernels.set_checked_mode():  # device-side indices are read on CUDA tensors too
        with pytest.raises(error):
            kvkernels.append_kv(*args, backend=backend, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(bits(kc), before_k) and torch.equal(bits(vc), before_v)


# ------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_append_is_cuda_graph_capturable(backend):
    gen = seeded(9)
    k, v = sources((4, 1, 8, 128), torch.bfloat16, gen, "cuda", fp8=False)
    kc, vc = poisoned((4, 64, 8, 128), torch.bfloat16, "cuda"), poisoned((4, 64, 8, 128), torch.bfloat16, "cuda")
    seqlens = lengths_tensor([0, 5, 17, 63], "cuda")
    kvkernels.append_kv(k, v, kc, vc, seqlens, backend=backend)  # warm-up (Triton compiles here)
    kc.fill_(float("nan"))
    vc.fill_(float("nan"))
    expect_k, expect_v = kc.clone(), vc.clone()
    reference.append_kv(k, v, expect_k, expect_v, seqlens)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kvkernels.append_kv(k, v, kc, vc, seqlens, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(kc), bits(expect_k)) and torch.equal(bits(vc), bits(expect_v))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_ragged_append_is_cuda_graph_capturable(backend):
    """One captured launch for a mixed batch; replayed with new lengths and offsets (same shapes)."""
    gen = seeded(17)
    k, v = sources((40, 8, 128), torch.bfloat16, gen, "cuda", fp8=False)
    kc, vc = poisoned((64, 16, 8, 128), torch.bfloat16, "cuda"), poisoned((64, 16, 8, 128), torch.bfloat16, "cuda")
    table = shuffled_table(4, 16, 64, gen, "cuda")
    seqlens, cu = lengths_tensor([0, 5, 17, 100], "cuda"), cu_tensor([1, 30, 0, 9], "cuda")
    kvkernels.append_kv(k, v, kc, vc, seqlens, block_table=table, cu_seqlens=cu, backend=backend)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kvkernels.append_kv(k, v, kc, vc, seqlens, block_table=table, cu_seqlens=cu, backend=backend)
    for lens, counts in (([0, 5, 17, 100], [1, 30, 0, 9]), ([3, 0, 200, 7], [20, 1, 19, 0])):
        kc.fill_(float("nan"))
        vc.fill_(float("nan"))
        seqlens.copy_(lengths_tensor(lens, "cuda"))
        cu.copy_(cu_tensor(counts, "cuda"))
        expect_k, expect_v = kc.clone(), vc.clone()
        reference.append_kv(k, v, expect_k, expect_v, seqlens, block_table=table, cu_seqlens=cu)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(bits(kc), bits(expect_k)) and torch.equal(bits(vc), bits(expect_v))


@pytest.mark.gpu
def test_cuda_declines_misaligned_layouts_and_auto_falls_back_to_triton():
    from kvkernels.cuda import append as cuda_append

    gen = seeded(10)
    big = randn(2, 3, 2, 64 + 1, gen=gen, device="cuda")
    k = big[..., 1:]  # starts 2 bytes past a 16-byte boundary
    kc, vc = poisoned((2, 8, 2, 64), torch.float16, "cuda"), poisoned((2, 8, 2, 64), torch.float16, "cuda")
    reason = cuda_append.unsupported("append", k=k, v=k, k_cache=kc, v_cache=vc, paged=False)
    assert reason and "aligned" in reason
    seqlens = lengths_tensor([1, 4], "cuda")
    expect_k, expect_v = kc.clone(), vc.clone()
    reference.append_kv(k, k, expect_k, expect_v, seqlens)
    kvkernels.append_kv(k, k, kc, vc, seqlens)  # auto: Triton takes it
    assert torch.equal(bits(kc), bits(expect_k)) and torch.equal(bits(vc), bits(expect_v))


def test_cuda_layout_rules():
    """The alignment gate in front of the CUDA kernels (pure metadata: runs without a GPU)."""
    from kvkernels.cuda import layout_reason

    x = torch.zeros(4, 3, 2, 64, dtype=torch.float16)
    assert layout_reason("k", x) is None
    assert layout_reason("k", x[:, :, :, 8:]) is None          # offset of 16 bytes
    assert "aligned" in layout_reason("k", x[:, :, :, 1:])      # offset of 2 bytes
    assert "stride" in layout_reason("k", x[..., :60].contiguous().view(4, 3, 2, 60)[:, :, :, :56])
    assert layout_reason("k", x[:, :1].expand(4, 1, 2, 64)) is None  # size-1 dims: stride unused
