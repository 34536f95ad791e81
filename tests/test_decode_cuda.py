"""The CUDA decode backend beyond parity (tests/test_decode.py holds parity for every backend).

CPU (no GPU needed): what unsupported() declines and why, the split plan and workspace the wrapper
derives from shapes, the raw op's registration, and the kernels' host-testable helpers compiled for
the host with nvcc (the fp8 widening and the page-size division, the exact code the kernels run).
GPU: CUDA-graph capture and replay, the raw op's argument checks, output strides, group sizes that
span several MMA tiles and blocks.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import kvkernels.cuda
from conftest import HAS_CUDA, assert_lse_close, assert_parity, build_paged, lengths_tensor, randn, seeded

from kvkernels import api, decode_plan, reference
from kvkernels.cuda import decode as cuda_decode

ROOT = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn


def _extension_has_decode() -> bool:
    from kvkernels import cuda
    return cuda.has_op("decode")


# ---------------------------------------------------------------------------------- unsupported


def _tensors(d=128, dtype=torch.float16, cache_dtype=None, hq=8, hkv=2, B=2, S=32):
    q = torch.zeros(B, hq, d, dtype=dtype)
    cache = torch.zeros(B, S, hkv, d, dtype=cache_dtype or dtype)
    return q, cache, cache.clone()


@pytest.mark.parametrize("make,reason", [
    (lambda: _tensors(dtype=torch.float32), "float16/bfloat16 queries"),
    (lambda: _tensors(d=96), "head dim 96"),
    (lambda: _tensors(d=32), "head dim 32"),
    (lambda: (_tensors()[0], *_tensors(dtype=torch.bfloat16)[1:]), "must be q's dtype"),
    # a view one element past an aligned start: 2-byte aligned only
    (lambda: (torch.zeros(2 * 8 * 128 + 1, dtype=torch.float16)[1:].view(2, 8, 128), *_tensors()[1:]),
     "q does not start at a 16-byte aligned address"),
    # heads 4 elements apart: a stride of 8 bytes
    (lambda: (_tensors()[0], torch.zeros(2, 32, 2, 132, dtype=torch.float16)[..., :128], _tensors()[2]),
     "k_cache stride"),
    # 8 bytes past an aligned start
    (lambda: (*_tensors()[:2], torch.zeros(2 * 32 * 2 * 128 + 4, dtype=torch.float16)[4:].view(2, 32, 2, 128)),
     "v_cache does not start at a 16-byte aligned address"),
], ids=["fp32-q", "d96", "d32", "cache-dtype", "q-misaligned", "k-stride", "v-misaligned"])
def test_config_reason_names_what_the_kernels_cannot_take(make, reason):
    q, k_cache, v_cache = make()
    got = cuda_decode.config_reason(q, k_cache, v_cache)
    assert got is not None and reason in got, got


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                               (torch.bfloat16, FP8), (torch.float16, FP8),
                                               (torch.bfloat16, torch.float8_e5m2)],
                         ids=["fp16", "bf16", "bf16-fp8", "fp16-fp8", "bf16-e5m2"])
def test_config_reason_accepts_supported_layouts(d, dtype, cache_dtype):
    q, k_cache, v_cache = _tensors(d=d, dtype=dtype, cache_dtype=cache_dtype)
    assert cuda_decode.config_reason(q, k_cache, v_cache) is None
    # strided but 16-byte aligned views are fine: q a slice of a fused qkv, caches a slice of a fused KV
    qkv = torch.zeros(2, 12, d, dtype=dtype)
    kv = torch.zeros(2, 32, 2, 2, d, dtype=cache_dtype or dtype)
    assert cuda_decode.config_reason(qkv[:, :8], kv[:, :, 0], kv[:, :, 1]) is None


def test_cpu_tensors_run_in_the_emulator_or_are_declined():
    q, k_cache, v_cache = _tensors()
    reason = cuda_decode.unsupported("decode", q=q, k_cache=k_cache, v_cache=v_cache, paged=False,
                                     window_left=-1, softcap=0.0)
    if kvkernels.cuda.emulator_available():
        assert reason is None
    else:
        assert reason is not None and "emulator" in reason


# ----------------------------------------------------------------------------- plan, workspace


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("num_splits", [0, 1, 3, 128])
def test_plan_splits_cover_the_attended_positions_in_whole_tiles(d, num_splits):
    shapes = [(1, 1, 1), (1, 8, 8), (3, 2, 80), (64, 8, 4), (512, 32, 1)]
    caches = [(1, -1), (17, -1), (4096, -1), (131072, -1), (131072, 4095), (300, 1000), (0, -1)]
    for (batch, kv_heads, group), (capacity, window_left) in itertools.product(shapes, caches):
        p = cuda_decode.plan(batch, kv_heads, group, d, capacity, window_left, num_splits=num_splits)
        attended = capacity if window_left < 0 else min(capacity, window_left + 1)
        assert p.split_tokens % cuda_decode.tile_tokens(d) == 0
        assert p.num_splits * p.split_tokens >= attended           # the glue refuses a plan that does not cover
        assert (p.num_splits - 1) * p.split_tokens < max(attended, 1)  # no split starts past every sequence
        if num_splits:
            assert p.num_splits <= num_splits


def test_plan_counts_the_window_not_the_cache():
    # A 4K window in a 128K cache is cut like a 4K cache: the splits start at the window's first position.
    assert (cuda_decode.plan(1, 8, 4, 128, 131072, 4095)
            == decode_plan.plan_splits(1, 8, 4096, granule=64)
            != decode_plan.plan_splits(1, 8, 131072, granule=64))


def test_plan_counts_every_block_of_a_large_group():
    # Groups above 64 heads (32 at D = 256) take several blocks per KV head, which the occupancy
    # heuristic counts as programs.
    assert cuda_decode.head_chunks(64, 128) == 1 and cuda_decode.head_chunks(65, 128) == 2
    assert cuda_decode.head_chunks(32, 256) == 1 and cuda_decode.head_chunks(33, 256) == 2
    assert cuda_decode.plan(1, 1, 128, 128, 65536, -1) == decode_plan.plan_splits(1, 2, 65536, granule=64)


@pytest.mark.parametrize("batch", [1, 7, 256])
@pytest.mark.parametrize("num_sms", [108, 132])
def test_batch_invariant_plan_fixes_split_boundaries_in_tokens(batch, num_sms):
    p = cuda_decode.plan(batch, 8, 4, 128, 20000, -1, batch_invariant=True, num_sms=num_sms)
    assert p.split_tokens == decode_plan.BATCH_INVARIANT_SPLIT_TOKENS
    assert p.num_splits == -(-20000 // decode_plan.BATCH_INVARIANT_SPLIT_TOKENS)


@pytest.mark.parametrize("num_splits,expected", [
    (1, ((0,), (0,))),
    (6, ((6, 3, 16, 128), (6, 3, 16))),
])
def test_workspace_is_sized_from_shapes(num_splits, expected):
    p = decode_plan.SplitPlan(num_splits=num_splits, split_tokens=64)
    assert cuda_decode.workspace_shapes(p, 3, 16, 128) == expected


# ------------------------------------------------------------------------- raw op registration


@pytest.mark.skipif(not _extension_has_decode(), reason="the extension is not built")
def test_extension_registers_the_raw_op_with_its_mutated_outputs():
    schema = torch.ops.kvkernels_C.decode.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"out", "lse", "workspace_out", "workspace_lse"}
    assert len(schema.returns) == 0


@pytest.mark.skipif(not _extension_has_decode(), reason="the extension is not built")
def test_raw_op_has_no_cpu_kernel():
    q, k_cache, v_cache = _tensors()
    seqlens = torch.full((2,), 5, dtype=torch.int32)
    out, lse = torch.empty_like(q), torch.empty(2, 8)
    ws = torch.empty(0)
    with pytest.raises(NotImplementedError):
        torch.ops.kvkernels_C.decode(q, k_cache, v_cache, seqlens, None, None, None, out, lse, ws, ws.clone(),
                                     0.1, -1, 0.0, 1, 64)


# --------------------------------------------------------------- host-compiled kernel helpers

HOST_PROGRAM = r"""
#include <cstdio>
#include <cstring>
#include <cstdint>
#include <cuda_fp8.h>
#include "common/dtype.cuh"
#include "kernels/decode_params.h"
#include "kernels/decode_util.cuh"
#include "launch/decode.h"

// Checks n / d for n in [0, 2^20), around multiples of d up to 2^31 and just below 2^31.
static int check_div(uint32_t d) {
  const kvk::FastDivmod f(d);
  auto bad = [&](uint32_t n) {
    uint32_t q, r;
    f.divmod(n, q, r);
    return q != n / d || r != n % d;
  };
  for (uint32_t n = 0; n < (1u << 20); ++n) if (bad(n)) return 1;
  for (uint64_t m = d; m < (1ull << 31); m = m * 3 + 7) {
    const uint64_t k = m / d * d;
    for (int64_t e = -2; e <= 2; ++e) {
      const int64_t n = static_cast<int64_t>(k) + e;
      if (n >= 0 && n < (1ll << 31) && bad(static_cast<uint32_t>(n))) return 1;
    }
  }
  for (uint32_t n = (1u << 31) - 4096; n < (1u << 31); ++n) if (bad(n)) return 1;
  return 0;
}

// The portable fp32 -> e5m2 conversion (what sm_80 and the emulator run) against the toolkit's host
// code for cvt.rn.satfinite.e5m2x2.f32, __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2), on
// every fp32 whose top 20 bits (sign, exponent, 11 mantissa bits) are anything and whose low 12 bits
// are one of 0, 1, 0x7FF, 0x800, 0x801, 0xFFF: every exponent and NaN/inf, the rounding bit and the
// sticky bits around each tie (6 * 2^20 values; all 2^32 agree too, checked by hand in 10 s).
static long check_e5m2() {
  const uint32_t lows[] = {0x000u, 0x001u, 0x7FFu, 0x800u, 0x801u, 0xFFFu};
  long bad = 0;
  for (uint32_t top = 0; top < (1u << 20); ++top) {
    for (uint32_t low : lows) {
      const uint32_t b = (top << 12) | low;
      float x;
      memcpy(&x, &b, 4);
      if (kvk::e5m2_from_float_portable(x) != __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2)) ++bad;
    }
  }
  return bad;
}

int main(int argc, char** argv) {
  if (argc > 1 && (!strcmp(argv[1], "fp8") || !strcmp(argv[1], "e5m2"))) {
    const bool e5m2 = !strcmp(argv[1], "e5m2");
    // code i in byte i % 4 of a word whose other bytes are other codes: every code in every lane
    for (int i = 0; i < 256; ++i) {
      uint32_t w = 0;
      for (int k = 0; k < 4; ++k) w |= static_cast<uint32_t>((i + 97 * k) & 0xFF) << (8 * ((i + k) % 4));
      uint32_t h[2];
      if (e5m2) {
        kvk::decode::e5m2x4_to_half2x2(w, h[0], h[1]);
      } else {
        kvk::decode::e4m3x4_to_half2x2(w, h[0], h[1]);
      }
      const int byte = i % 4;
      printf("%d %u\n", i, (h[byte / 2] >> (16 * (byte % 2))) & 0xFFFFu);
    }
    return 0;
  }
  if (argc > 1 && !strcmp(argv[1], "e5m2-convert")) {
    printf("%ld\n", check_e5m2());
    return 0;
  }
  if (argc > 1 && !strcmp(argv[1], "rows")) {
    // decode_rows_per_block and cache_attention_span, which kvkernels/cuda/cache_attn.py mirrors
    const int dims[] = {64, 128, 256};
    for (int d : dims) {
      for (long long rows = 1; rows <= 300; rows += 7) printf("r %d %lld %d\n", d, rows, kvk::decode_rows_per_block(d, rows));
      for (int causal = 0; causal < 2; ++causal)
        for (int wl : {-1, 0, 5, 100})
          for (int max_q : {1, 3, 40, 150})
            for (int group : {1, 4, 24}) {
              const int rpb = kvk::decode_rows_per_block(d, static_cast<long long>(max_q) * group);
              printf("s %d %d %d %d %d %lld\n", d, causal, wl, max_q, group,
                     kvk::cache_attention_span(1000, wl, causal != 0, max_q, group, rpb));
            }
    }
    return 0;
  }
  if (argc > 1 && !strcmp(argv[1], "div")) {
    const uint32_t extra[] = {300, 511, 1000, 1024, 4095, 65537, 100003, 1u << 20, (1u << 30) + 1, (1u << 31) - 1};
    for (uint32_t d = 1; d <= 256; ++d) if (check_div(d)) { printf("fail %u\n", d); return 0; }
    for (uint32_t d : extra) if (check_div(d)) { printf("fail %u\n", d); return 0; }
    printf("ok\n");
    return 0;
  }
  printf("%d %d %d %d %d %d\n", kvk::decode_tile_tokens(64), kvk::decode_tile_tokens(128), kvk::decode_tile_tokens(256),
         kvk::decode_max_heads_per_block(64), kvk::decode_max_heads_per_block(128),
         kvk::decode_max_heads_per_block(256));
  return 0;
}
"""


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.path.exists(candidate) else shutil.which("nvcc")


@pytest.fixture(scope="module")
def host_program(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the kernels' host-testable helpers cannot be compiled")
    work = tmp_path_factory.mktemp("decode_host")
    src, exe = work / "check.cu", work / "check"
    src.write_text(HOST_PROGRAM)
    # Host code only matters; one real architecture keeps the device pass short.
    subprocess.run([nvcc, "-std=c++17", "-O2", "-arch=sm_80", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    return lambda *args: subprocess.run([str(exe), *args], check=True, capture_output=True, text=True,
                                        timeout=120).stdout


@pytest.mark.parametrize("fmt,dtype,nans", [("fp8", FP8, 2), ("e5m2", torch.float8_e5m2, 6)], ids=["e4m3", "e5m2"])
def test_fp8_widening_matches_torch_for_every_code(host_program, fmt, dtype, nans):
    # The below-sm_89 arithmetic of e4m3x4_to_half2x2 (bit moves + one fp16 multiply) and the byte moves
    # of e5m2x4_to_half2x2 (every architecture), run on the host.
    rows = [tuple(int(x) for x in line.split()) for line in host_program(fmt).splitlines()]
    assert [r[0] for r in rows] == list(range(256))
    want = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float16)
    got = torch.tensor([r[1] for r in rows], dtype=torch.int32).to(torch.int16).view(torch.float16)
    nan = torch.isnan(want)
    assert int(nan.sum()) == nans  # e4m3: 0x7F and 0xFF; e5m2: S.11111.{01,10,11}
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], want[~nan])  # e5m2's +-inf included
    assert torch.equal(torch.signbit(got[~nan]), torch.signbit(want[~nan]))  # -0 stays -0


def test_e5m2_conversion_matches_the_toolkits_model_of_the_hardware(host_program):
    """e5m2_from_float_portable (sm_80 and the emulator; sm_89+ runs cvt.rn.satfinite.e5m2x2.f32 itself)
    equals the toolkit's host code for that instruction on a dense sample of fp32 values; the append
    tests hold the kernels to kvkernels.reference, so the reference follows the hardware too."""
    assert host_program("e5m2-convert").strip() == "0"


def test_page_division_is_exact(host_program):
    assert host_program("div").strip() == "ok"


def test_cache_attention_row_tiles_and_spans_match_the_launcher(host_program):
    from kvkernels.cuda import cache_attn
    for line in host_program("rows").splitlines():
        kind, *vals = line.split()
        if kind == "r":
            d, rows, per_block = map(int, vals)
            assert cache_attn.rows_per_block(rows, d) == per_block, line
        else:
            d, causal, wl, max_q, group, span = map(int, vals)
            assert cache_attn.attended_span(1000, wl, bool(causal), max_q, group, d) == span, line


def test_tile_and_head_block_sizes_match_the_launcher(host_program):
    tiles = [int(x) for x in host_program().split()]
    assert tiles[:3] == [cuda_decode.tile_tokens(d) for d in (64, 128, 256)]
    # max heads per block: head_chunks(g, d) == ceil(g / max heads)
    for d, per_block in zip((64, 128, 256), tiles[3:]):
        assert cuda_decode.head_chunks(per_block, d) == 1 and cuda_decode.head_chunks(per_block + 1, d) == 2


# ------------------------------------------------------------------------------------------ GPU

needs_cuda_kernels = pytest.mark.skipif(HAS_CUDA and not _extension_has_decode(), reason="the extension is not built")


def _paged_case(lens, *, hq=8, hkv=2, d=128, dtype=torch.float16, page_size=16, seed=0):
    gen = seeded(seed)
    lens_t = lengths_tensor(lens)
    S = max(lens) + 5
    q = randn(len(lens), hq, d, dtype=dtype, gen=gen).cuda()
    k = randn(len(lens), S, hkv, d, dtype=dtype, gen=gen)
    v = randn(len(lens), S, hkv, d, dtype=dtype, gen=gen)
    k_cache, table = build_paged(k, lens_t, page_size, gen=seeded(seed + 1))
    v_cache, _ = build_paged(v, lens_t, page_size, gen=seeded(seed + 1))
    return q, k, v, lens_t, k_cache.cuda(), v_cache.cuda(), table.cuda()


def _oracle(q, k, v, lens, **kw):
    ref, ref_lse = reference.decode_attention(q.cpu().float(), k, v, lens, **kw)
    ref_lp, _ = reference.decode_attention(q.cpu(), k, v, lens, upcast=False, **kw)
    return ref, ref_lse, ref_lp


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("num_splits", [0, 1, 7])
def test_cuda_graph_replay_matches_eager_and_follows_new_lengths(num_splits):
    q, k, v, lens, k_cache, v_cache, table = _paged_case([1500, 37, 900])
    seqlens = lens.cuda()
    scale = 0.09

    def call():
        return api.get_backend("cuda").decode_attention(q, k_cache, v_cache, seqlens, table, scale, -1, 0.0, None,
                                                        None, num_splits, False)

    eager_out, eager_lse = call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up outside capture (one-time attribute setup)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_lse = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out, eager_out) and torch.equal(graph_lse, eager_lse)

    # The graph reads the lengths from device memory: shorter sequences, same graph.
    new_lens = lengths_tensor([700, 0, 899])
    seqlens.copy_(new_lens.cuda())
    graph.replay()
    torch.cuda.synchronize()
    ref, ref_lse, ref_lp = _oracle(q, k, v, new_lens, softmax_scale=scale)
    assert_parity(graph_out.cpu(), ref, ref_lp)
    assert_lse_close(graph_lse.cpu(), ref_lse)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 5, 16, 17, 33, 80])
def test_groups_spanning_several_head_tiles_and_blocks(d, group):
    # 16 heads per MMA tile; 64 heads per block (32 at D = 256), larger groups use several blocks.
    q, k, v, lens, k_cache, v_cache, table = _paged_case([130, 1, 77], hq=group * 2, hkv=2, d=d, page_size=32,
                                                         dtype=torch.bfloat16)
    out, lse = api.get_backend("cuda").decode_attention(q, k_cache, v_cache, lens.cuda(), table, 0.1, -1, 0.0,
                                                        None, None, 0, False)
    ref, ref_lse, ref_lp = _oracle(q, k, v, lens, softmax_scale=0.1)
    assert_parity(out.cpu(), ref, ref_lp)
    assert_lse_close(lse.cpu(), ref_lse)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("num_splits", [1, 4])
def test_raw_op_writes_strided_outputs_and_nothing_else(num_splits):
    q, k, v, lens, k_cache, v_cache, table = _paged_case([200, 64])
    B, hq, d = q.shape
    big = torch.full((B, hq + 3, d + 16), 7.0, dtype=q.dtype, device="cuda")
    out = big[:, 1:hq + 1, 8:d + 8]
    big_lse = torch.full((B, hq * 2), 7.0, device="cuda")
    lse = big_lse[:, ::2]
    p = cuda_decode.plan(B, 2, 4, d, table.shape[1] * 16, -1, num_splits=num_splits)
    ws_o, ws_l = cuda_decode.workspace_shapes(p, B, hq, d)
    torch.ops.kvkernels_C.decode(q, k_cache, v_cache, lens.cuda(), table, None, None, out, lse,
                                 torch.empty(ws_o, device="cuda"), torch.empty(ws_l, device="cuda"), 0.1, -1, 0.0,
                                 p.num_splits, p.split_tokens)
    ref, ref_lse, ref_lp = _oracle(q, k, v, lens, softmax_scale=0.1)
    assert_parity(out.cpu(), ref, ref_lp)
    assert_lse_close(lse.cpu().contiguous(), ref_lse)
    untouched = torch.ones_like(big, dtype=torch.bool)
    untouched[:, 1:hq + 1, 8:d + 8] = False
    assert bool((big[untouched] == 7.0).all())
    assert bool((big_lse[:, 1::2] == 7.0).all())


@pytest.mark.gpu
@needs_cuda_kernels
def test_raw_op_rejects_bad_metadata():
    q, k, v, lens, k_cache, v_cache, table = _paged_case([100])
    seqlens = lens.cuda()
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device="cuda")
    ws = torch.empty(0, device="cuda")

    def raw(**kw):
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, seqlens=seqlens, table=table, out=out, num_splits=1,
                    split_tokens=table.shape[1] * 16)
        args.update(kw)
        torch.ops.kvkernels_C.decode(args["q"], args["k_cache"], args["v_cache"], args["seqlens"], args["table"],
                                     None, None, args["out"], lse, ws, ws, 0.1, -1, 0.0, args["num_splits"],
                                     args["split_tokens"])

    flat = torch.empty(k_cache.numel() + 8, dtype=k_cache.dtype, device="cuda")
    with pytest.raises(RuntimeError, match="16-byte"):
        raw(k_cache=flat[1:k_cache.numel() + 1].view(k_cache.shape))
    with pytest.raises(RuntimeError, match="do not cover"):
        raw(split_tokens=64)  # one split of one tile cannot cover the cache's capacity
    with pytest.raises(RuntimeError, match="workspace_out"):
        raw(num_splits=4, split_tokens=table.shape[1] * 16)
    with pytest.raises(RuntimeError, match="head dim"):
        raw(q=q[..., :96].contiguous(), out=out[..., :96].contiguous())


@pytest.mark.gpu
@needs_cuda_kernels
def test_auto_backend_sends_unaligned_caches_to_triton():
    q, k, v, lens, k_cache, v_cache, table = _paged_case([50])
    flat = torch.empty(k_cache.numel() + 8, dtype=k_cache.dtype, device="cuda")
    shifted = flat[1:k_cache.numel() + 1].view(k_cache.shape)
    shifted.copy_(k_cache)
    kw = dict(q=q, k_cache=shifted, v_cache=v_cache, paged=True, window_left=-1, softcap=0.0)
    assert cuda_decode.unsupported("decode", **kw) is not None
    assert api.resolve_backend("decode", None, q.device, **kw) == "triton"
    kw["k_cache"] = k_cache
    assert cuda_decode.unsupported("decode", **kw) is None
    assert api.resolve_backend("decode", None, q.device, **kw) == "cuda"
