"""Caches past 2^31 elements: every offset is computed in 64 bits, nothing on the way refuses them.

CPU (no memory is allocated: meta tensors carry the shapes and strides):
  * the public API validates such calls and its custom ops give outputs of the right shapes;
  * the CUDA wrappers' unsupported() accepts them (shape and layout logic as for CUDA tensors), and
    the decode plan they launch meets the extension's own limits;
  * the Triton wrappers accept them and launch with the true (64-bit) strides and capacity;
  * the split planner handles capacities up to 2^40 tokens.
GPU (marked gpu; skipped when the device lacks the memory): paged fp16 and fp8 caches of more than
2^31 (fp8: 2^32) elements and a contiguous cache whose last sequence starts past 2^31 elements, with
every page and row written and read sitting past that mark: append (by position and by slot) is
bit-exact there and touches nothing else, decode matches the reference on the gathered pages.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import assert_lse_close, assert_parity, lengths_tensor, randn, reference, run_or_skip, seeded

import kvkernels
import kvkernels.cuda
from kvkernels import decode_plan

FP8 = torch.float8_e4m3fn
META = "meta"
INT32_MAX = 2**31 - 1
HKV, D, HQ = 8, 128, 32


def meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device=META)


def huge_paged(dtype=torch.float16):
    """[2^20 pages, 16, 8, 128]: 2^34 elements, block tables of 2^16 columns (2^20 positions)."""
    return meta(2**20, 16, HKV, D, dtype=dtype), meta(4, 2**16, dtype=torch.int32)


def huge_contiguous(dtype=torch.float16):
    """[4, 2^20 + 16, 8, 128]: each sequence holds > 2^30 elements, the cache > 2^32."""
    return meta(4, 2**20 + 16, HKV, D, dtype=dtype)


class OnCuda:
    """A meta tensor that reports a CUDA device: runs a wrapper's shape and layout checks on
    shapes far too large to allocate, exactly as for a CUDA tensor of those shapes."""

    device = torch.device("cuda", 0)

    def __init__(self, t: torch.Tensor):
        self._t = t

    def __getattr__(self, name):
        return getattr(self._t, name)


class Launch:
    """Stands in for a @triton.jit kernel: records grid and arguments instead of running."""

    def __init__(self):
        self.calls = []  # (grid, the int arguments, keyword arguments)

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, [a for a in args if type(a) is int], kw))


# ----------------------------------------------------------------------------------- API


@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8], ids=["fp16", "fp8"])
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_api_accepts_caches_past_2_31_elements(cache_dtype, layout):
    if layout == "paged":
        kc, table = huge_paged(cache_dtype)
        assert kc.numel() > 2**33
    else:
        kc, table = huge_contiguous(cache_dtype), None
        assert kc.numel() > 2**32 and kc.stride(0) > 2**30
    B = 4
    scales = dict(k_scale=torch.ones((), device=META), v_scale=torch.ones((), device=META)) if cache_dtype == FP8 else {}
    lens = meta(B, dtype=torch.int32)
    q = meta(B, HQ, D)
    out, lse = kvkernels.decode_attention(q, kc, kc, lens, block_table=table, window_left=1000, return_lse=True,
                                          **scales)
    assert out.shape == (B, HQ, D) and out.dtype == torch.float16 and lse.shape == (B, HQ)
    kvkernels.append_kv(meta(B, 7, HKV, D), meta(B, 7, HKV, D), kc, kc, lens, block_table=table, **scales)
    kvkernels.append_kv_slots(meta(5, HKV, D), meta(5, HKV, D), kc, kc, meta(5, dtype=torch.int64), **scales)


def test_api_accepts_prefill_inputs_past_2_31_elements():
    # varlen, 2^22 keys of 8 x 128: 2^32 elements per key tensor
    k = meta(2**22, HKV, D)
    q = meta(2**16, HQ, D)
    cu = meta(3, dtype=torch.int32)
    out, lse = kvkernels.prefill_attention(q, k, k, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                           max_seqlen_q=2**15, max_seqlen_k=2**21, return_lse=True)
    assert out.shape == q.shape and lse.shape == (HQ, 2**16)


# -------------------------------------------------------------------------- CUDA wrappers


needs_extension = pytest.mark.skipif(kvkernels.cuda.extension_reason() is not None,
                                     reason="the CUDA extension is not built")


@needs_extension
@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8], ids=["fp16", "fp8"])
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_cuda_wrappers_accept_caches_past_2_31_elements(cache_dtype, layout):
    from kvkernels.cuda import append, decode
    if not kvkernels.cuda.has_op("decode") or not kvkernels.cuda.has_op("append_kv"):
        pytest.skip("this build has no decode or append kernel")
    kc = huge_paged(cache_dtype)[0] if layout == "paged" else huge_contiguous(cache_dtype)
    q = meta(4, HQ, D)
    assert decode.unsupported("decode", q=OnCuda(q), k_cache=OnCuda(kc), v_cache=OnCuda(kc),
                              paged=layout == "paged") is None
    k = meta(4, 3, HKV, D)
    assert append.unsupported("append", k=OnCuda(k), v=OnCuda(k), k_cache=OnCuda(kc), v_cache=OnCuda(kc)) is None
    assert append.unsupported("append_slots", k=OnCuda(k[:, 0]), v=OnCuda(k[:, 0]), k_cache=OnCuda(kc),
                              v_cache=OnCuda(kc)) is None


@needs_extension
def test_paged_capacity_past_the_cuda_kernels_limit_goes_to_triton(monkeypatch):
    """The CUDA decode kernels count positions in int32 with slack (capacity < 2^30): a block table
    wide enough to pass that (max_pages * page_size >= 2^30) is declined with a reason, so auto
    selection gives the call to Triton instead of the extension raising."""
    from kvkernels import api
    from kvkernels.cuda import decode
    if not kvkernels.cuda.has_op("decode"):
        pytest.skip("this build has no decode kernel")
    q, kc = OnCuda(meta(4, HQ, D)), OnCuda(meta(64, 256, HKV, D))
    kw = dict(q=q, k_cache=kc, v_cache=kc, paged=True, window_left=-1, softcap=0.0)
    narrow, wide = OnCuda(meta(4, 2**22 - 1, dtype=torch.int32)), OnCuda(meta(4, 2**22, dtype=torch.int32))
    assert decode.unsupported("decode", block_table=narrow, **kw) is None
    assert "too large" in decode.unsupported("decode", block_table=wide, **kw)
    monkeypatch.delenv("KVKERNELS_BACKEND", raising=False)
    assert api.resolve_backend("decode", None, torch.device("cuda"), block_table=narrow, **kw) == "cuda"
    assert api.resolve_backend("decode", None, torch.device("cuda"), block_table=wide, **kw) == "triton"
    # ... and the public op hands the block table to that choice.
    seen = {}

    def recording(op, backend, device, **kw):
        seen.update(kw)
        return "reference"

    monkeypatch.setattr(api, "resolve_backend", recording)
    table = meta(4, 2**22, dtype=torch.int32)
    kvkernels.decode_attention(meta(4, HQ, D), kc._t, kc._t, meta(4, dtype=torch.int32), block_table=table)
    assert seen["block_table"] is table


@pytest.mark.parametrize("capacity,window_left,batch_invariant,num_splits", [
    (2**20 + 16, -1, False, 0), (2**30 - 64, -1, False, 0), (2**30 - 64, 4095, False, 0), (2**30 - 64, -1, False, 7),
    # batch-invariant splits are 2048 tokens whatever the capacity: 513 of them here
    (2**20 + 16, -1, True, 0), (2**30 - 64, 4095, True, 0),
])
def test_cuda_decode_plan_meets_the_extensions_limits(capacity, window_left, batch_invariant, num_splits):
    # What csrc/ops/decode.cpp checks before launching: 1 <= split_tokens < 2^30, the splits cover
    # every attended position, B * Hkv * num_splits fits int32.
    from kvkernels.cuda import decode
    for batch in (1, 512):
        plan = decode.plan(batch, HKV, HQ // HKV, D, capacity, window_left, num_splits=num_splits,
                           batch_invariant=batch_invariant)
        attended = decode.attended_capacity(capacity, window_left)
        assert 1 <= plan.split_tokens < 2**30 and plan.split_tokens % decode.tile_tokens(D) == 0
        assert plan.num_splits * plan.split_tokens >= attended
        assert (plan.num_splits - 1) * plan.split_tokens < attended  # no split wholly past the end
        assert batch * HKV * plan.num_splits <= INT32_MAX


# ------------------------------------------------------------------------ Triton wrappers


@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8], ids=["fp16", "fp8"])
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_triton_decode_launches_with_64_bit_strides(monkeypatch, cache_dtype, layout):
    from kvkernels.triton import decode
    if layout == "paged":
        kc, table = huge_paged(cache_dtype)
        capacity = table.shape[1] * kc.shape[1]
    else:
        kc, table = huge_contiguous(cache_dtype), None
        capacity = kc.shape[1]
    q = meta(4, HQ, D)
    assert decode.unsupported("decode", q=q, k_cache=kc, v_cache=kc, paged=table is not None) is None
    split, merge = Launch(), Launch()
    monkeypatch.setattr(decode, "_decode_split_kernel", split)
    monkeypatch.setattr(decode, "_decode_merge_kernel", merge)
    scale = torch.ones(HKV, device=META) if cache_dtype == FP8 else None
    out, lse = decode.decode(q, kc, kc, meta(4, dtype=torch.int32), table, 0.1, -1, 0.0, scale, scale, 0, False)
    assert out.shape == q.shape and lse.shape == (4, HQ)
    (grid, args, kw), = split.calls
    assert 1 <= grid[0] <= INT32_MAX and 1 <= grid[1] <= 65535
    # The kernel gets the cache's strides and capacity as they are (Triton passes ints past 2^31 as
    # 64-bit), and offsets within it are computed from 64-bit page / sequence indices.
    assert kc.stride(0) in args and kc.stride(1) in args and capacity in args
    if layout == "contiguous":
        assert kc.stride(0) * (kc.shape[0] - 1) > INT32_MAX  # the last sequence starts past 2^31
    assert len(merge.calls) == (grid[1] > 1)


@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8], ids=["fp16", "fp8"])
@pytest.mark.parametrize("op", ["paged", "contiguous", "slots"])
def test_triton_append_launches_with_64_bit_strides(monkeypatch, cache_dtype, op):
    from kvkernels.triton import append
    kc, table = huge_paged(cache_dtype)
    if op == "contiguous":
        kc, table = huge_contiguous(cache_dtype), None
    assert append.unsupported("append", k=meta(4, 3, HKV, D), k_cache=kc) is None
    launch = Launch()
    monkeypatch.setattr(append, "_append_kernel", launch)
    scale = torch.ones(HKV, device=META) if cache_dtype == FP8 else None
    if op == "slots":
        append.append_slots(meta(5, HKV, D), meta(5, HKV, D), kc, kc, meta(5, dtype=torch.int64), scale, scale)
    else:
        append.append(meta(4, 3, HKV, D), meta(4, 3, HKV, D), kc, kc, meta(4, dtype=torch.int32), table, scale, scale)
    (grid, args, kw), = launch.calls
    assert grid[0] == (5 if op == "slots" else 12) and grid[1] >= 1
    assert kc.stride(0) in args and kc.shape[0] in args and kc.shape[1] in args


# ------------------------------------------------------------------------------- planner


@pytest.mark.parametrize("capacity", [2**31 - 1, 2**31 + 16, 2**40])
@pytest.mark.parametrize("kw", [{}, {"batch_invariant": True}, {"num_splits": 3}, {"num_splits": 1}])
def test_split_planner_handles_huge_capacity(capacity, kw):
    for batch, heads in ((1, 1), (64, 8), (4096, 8)):
        plan = decode_plan.plan_splits(batch, heads, capacity, granule=64, **kw)
        assert 1 <= plan.num_splits <= max(decode_plan.MAX_SPLITS, kw.get("num_splits", 0),
                                           -(-capacity // decode_plan.BATCH_INVARIANT_SPLIT_TOKENS))
        assert plan.split_tokens % 64 == 0
        assert plan.num_splits * plan.split_tokens >= capacity
        assert (plan.num_splits - 1) * plan.split_tokens < capacity
        if "num_splits" in kw:
            assert plan.num_splits == kw["num_splits"]


# ------------------------------------------------------------------------------------- GPU


@pytest.fixture
def device_memory():
    """Gives the caches' memory back to the device after the test."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


def need_memory(nbytes: int):
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes + 2**30:
        pytest.skip(f"needs {(nbytes + 2**30) / 2**30:.1f} GiB of free device memory, {free / 2**30:.1f} GiB free")


def all_nan(x: torch.Tensor) -> bool:
    return bool(torch.isnan(x.float()).all())


def nan_cache(shape, dtype):
    """A NaN-filled device cache, filled byte-wise (no temporary of another dtype)."""
    cache = torch.empty(shape, dtype=dtype, device="cuda")
    cache.view(torch.uint8).fill_(0x7F if dtype == FP8 else 0xFF)  # e4m3 0x7F and fp16/bf16 0xFFFF are NaN
    return cache


def stored(x: torch.Tensor, scale, cache_dtype) -> torch.Tensor:
    """What a cache of cache_dtype holds for x (CPU): x itself, or its fp8 quantization."""
    return reference.quantize(x, scale.cpu().reshape(-1).expand(x.shape[-2]), FP8) if cache_dtype == FP8 else x


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("cache_dtype,pages_log2", [(torch.float16, 17), (FP8, 18)], ids=["fp16", "fp8"])
def test_paged_cache_past_2_31_elements(backend, cache_dtype, pages_log2, device_memory):
    page_size = 16
    per_page = page_size * HKV * D  # 2^14 elements
    mark = 2**pages_log2              # first page whose offset is >= 2^31 (fp16) or 2^32 (fp8) elements
    num_pages = mark + 512
    assert mark * per_page >= 2**31
    need_memory(2 * num_pages * per_page * torch.finfo(cache_dtype).bits // 8)
    torch.cuda.empty_cache()
    dev = "cuda"
    gen = seeded(21)
    lens = [300, 17, 129]
    B = len(lens)
    kc = nan_cache((num_pages, page_size, HKV, D), cache_dtype)
    vc = nan_cache((num_pages, page_size, HKV, D), cache_dtype)
    # Every page a sequence uses lies past the mark (the very last page of the cache among them);
    # one page below it stays untouched next to them.
    pages_needed = [-(-n // page_size) for n in lens]
    pool = torch.randperm(num_pages - mark - 1, generator=gen)[: sum(pages_needed) - 1] + mark
    pool = torch.cat([pool, torch.tensor([num_pages - 1])])[torch.randperm(sum(pages_needed), generator=gen)]
    max_pages = max(pages_needed) + 2
    table = torch.full((B, max_pages), mark - 1, dtype=torch.int32)  # unused columns: an untouched NaN page
    cursor = 0
    for b, n in enumerate(pages_needed):
        table[b, :n] = pool[cursor:cursor + n].to(torch.int32)
        cursor += n
    scales = {}
    k_scale = v_scale = None
    if cache_dtype == FP8:
        k_scale, v_scale = torch.tensor(0.02, device=dev), torch.tensor(0.01, device=dev)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    S = max(lens)
    k = randn(B, S, HKV, D, gen=gen)
    v = randn(B, S, HKV, D, gen=gen)
    q = randn(B, HQ, D, gen=gen)
    lens_t = lengths_tensor(lens)

    # Each prompt but its last token by position (one sequence per call), then the last token of
    # every sequence by slot.
    for b, n in enumerate(lens):
        run_or_skip(backend, lambda: kvkernels.append_kv(
            k[b:b + 1, : n - 1].to(dev), v[b:b + 1, : n - 1].to(dev), kc, vc, lengths_tensor([0], dev),
            block_table=table[b:b + 1].to(dev), backend=backend, **scales))
    slots = torch.tensor([int(table[b, (n - 1) // page_size]) * page_size + (n - 1) % page_size
                          for b, n in enumerate(lens)], dtype=torch.int64)
    assert int(slots.min()) * HKV * D >= 2**31
    last = torch.stack([k[b, n - 1] for b, n in enumerate(lens)]), torch.stack([v[b, n - 1] for b, n in enumerate(lens)])
    run_or_skip(backend, lambda: kvkernels.append_kv_slots(last[0].to(dev), last[1].to(dev), kc, vc, slots.to(dev),
                                                           backend=backend, **scales))
    torch.cuda.synchronize()

    # Bit-exact where written, NaN (untouched) everywhere else on the pages involved and beside them.
    norm = (lambda s: None if s is None else s.cpu().reshape(-1).expand(HKV))
    k_want, v_want = stored(k, k_scale, cache_dtype), stored(v, v_scale, cache_dtype)
    used = table[:, :max(pages_needed)].clone()
    k_pages = kc[used.flatten().long().to(dev)].cpu().reshape(B, -1, HKV, D)
    v_pages = vc[used.flatten().long().to(dev)].cpu().reshape(B, -1, HKV, D)
    for b, n in enumerate(lens):
        assert torch.equal(k_pages[b, :n].view(torch.uint8), k_want[b, :n].contiguous().view(torch.uint8))
        assert torch.equal(v_pages[b, :n].view(torch.uint8), v_want[b, :n].contiguous().view(torch.uint8))
        assert all_nan(k_pages[b, n:pages_needed[b] * page_size]) and all_nan(v_pages[b, n:pages_needed[b] * page_size])
    assert all_nan(kc[mark - 1]) and all_nan(vc[mark - 1])
    assert all_nan(kc[mark - 2 : mark - 1]) and all_nan(kc[0])

    # Decode over those pages against the reference on the gathered (dense) cache.
    k_dense, v_dense = k_want[:, :S], v_want[:, :S]
    ref, ref_lse = reference.decode_attention(q.float(), k_dense, v_dense, lens_t, k_scale=norm(k_scale),
                                              v_scale=norm(v_scale))
    ref_lp, _ = reference.decode_attention(q, k_dense, v_dense, lens_t, k_scale=norm(k_scale), v_scale=norm(v_scale),
                                           upcast=False)
    for num_splits in (0, 1, 3):
        out, lse = run_or_skip(backend, lambda: kvkernels.decode_attention(
            q.to(dev), kc, vc, lens_t.to(dev), block_table=table.to(dev), num_splits=num_splits, return_lse=True,
            backend=backend, **scales))
        assert_parity(out.cpu(), ref, ref_lp)
        assert_lse_close(lse.cpu(), ref_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8], ids=["fp16", "fp8"])
def test_contiguous_cache_past_2_31_elements(backend, cache_dtype, device_memory):
    # [3, 2^21, 4, 128]: 2^30 elements per sequence, so sequence 2 starts at element 2^31 and the
    # rows written and read near its end sit past 3 * 2^30 - 2^16.
    hkv, s_max, window, s_new = 4, 2**21, 63, 3
    dev = "cuda"
    need_memory(2 * 3 * s_max * hkv * D * torch.finfo(cache_dtype).bits // 8)
    torch.cuda.empty_cache()
    kc = nan_cache((3, s_max, hkv, D), cache_dtype)
    vc = nan_cache((3, s_max, hkv, D), cache_dtype)
    gen = seeded(22)
    lens = [100, s_max - 5 - s_new, s_max - 40]
    before = lengths_tensor(lens)
    after = [n + s_new for n in lens]
    scales, k_scale, v_scale = {}, None, None
    if cache_dtype == FP8:
        k_scale, v_scale = torch.tensor(0.02, device=dev), torch.tensor(0.01, device=dev)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    norm = (lambda s: None if s is None else s.cpu().reshape(-1).expand(hkv))
    # The window's positions before the new tokens, then the new tokens through append_kv.
    hist = randn(3, window + 1, hkv, D, gen=gen)
    v_hist = randn(3, window + 1, hkv, D, gen=gen)
    want_k, want_v = stored(hist, k_scale, cache_dtype), stored(v_hist, v_scale, cache_dtype)
    for b, n in enumerate(lens):
        kc[b, n - (window + 1 - s_new):n] = want_k[b, : window + 1 - s_new].to(dev)
        vc[b, n - (window + 1 - s_new):n] = want_v[b, : window + 1 - s_new].to(dev)
    new_k, new_v = hist[:, -s_new:].contiguous(), v_hist[:, -s_new:].contiguous()
    run_or_skip(backend, lambda: kvkernels.append_kv(new_k.to(dev), new_v.to(dev), kc, vc, before.to(dev),
                                                     backend=backend, **scales))
    torch.cuda.synchronize()
    for b, n in enumerate(after):
        got_k = kc[b, n - (window + 1):n].cpu()
        got_v = vc[b, n - (window + 1):n].cpu()
        assert torch.equal(got_k.view(torch.uint8), want_k[b].contiguous().view(torch.uint8))
        assert torch.equal(got_v.view(torch.uint8), want_v[b].contiguous().view(torch.uint8))
        assert all_nan(kc[b, n:n + 64]) and all_nan(kc[b, max(0, n - window - 65):n - window - 1])
    q = randn(3, HQ, D, gen=gen)
    lens_t = lengths_tensor([window + 1] * 3)
    ref, ref_lse = reference.decode_attention(q.float(), want_k, want_v, lens_t, k_scale=norm(k_scale),
                                              v_scale=norm(v_scale))
    ref_lp, _ = reference.decode_attention(q, want_k, want_v, lens_t, k_scale=norm(k_scale), v_scale=norm(v_scale),
                                           upcast=False)
    for num_splits in (0, 2):
        out, lse = run_or_skip(backend, lambda: kvkernels.decode_attention(
            q.to(dev), kc, vc, lengths_tensor(after, dev), window_left=window, num_splits=num_splits, return_lse=True,
            backend=backend, **scales))
        assert_parity(out.cpu(), ref, ref_lp)
        assert_lse_close(lse.cpu(), ref_lse)
