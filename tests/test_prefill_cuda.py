"""CPU-side logic of the CUDA prefill backend (kvkernels/cuda/prefill.py, csrc/ops/prefill.cpp):
which kernel path a device gets, why a call is refused (so auto falls back to Triton), the launch
geometry, and the causal/window tile plan the kernels run, checked against the reference mask.

No GPU needed: the plan ops of the extension run on the host. Output parity of the kernels is
tests/test_prefill.py (the "cuda" backend on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from kvkernels import reference
from kvkernels.cuda import has_op
from kvkernels.cuda import prefill as cp

needs_ext = pytest.mark.skipif(not has_op("prefill"), reason="kvkernels._C with the prefill ops is not built")

H100, A100, A10, L40, B200, RTX5090, T4 = (9, 0), (8, 0), (8, 6), (8, 9), (10, 0), (12, 0), (7, 5)
DEFAULT = "8.0;9.0a"
SM80_SMEM_LIMIT = 99 * 1024    # sm_86 / sm_89 opt-in: the smallest sm_8x part
SM90_SMEM_LIMIT = 227 * 1024


# ------------------------------------------------------------------------------ path choice


@pytest.mark.parametrize("arch_list, parsed", [
    ("8.0;9.0a", [(8, 0, "", False), (9, 0, "a", False)]),
    ("8.0 9.0a", [(8, 0, "", False), (9, 0, "a", False)]),
    ("8.6+PTX", [(8, 6, "", True)]),
    ("9.0a;10.0a", [(9, 0, "a", False), (10, 0, "a", False)]),
])
def test_parse_arch_list(arch_list, parsed):
    assert cp.parse_archs(arch_list) == parsed


@pytest.mark.parametrize("capability, arch_list, paths", [
    (H100, DEFAULT, (90, 80)),   # wgmma kernel first, the mma.sync one from the sm_90a cubin as fallback
    (A100, DEFAULT, (80,)),
    (A10, DEFAULT, (80,)),       # sm_80 SASS runs on every sm_8x
    (L40, DEFAULT, (80,)),
    (B200, DEFAULT, ()),         # no SASS for sm_100, an "a" cubin never runs elsewhere: Triton
    (RTX5090, DEFAULT, ()),
    (T4, DEFAULT, ()),           # mma.sync bf16 / cp.async need sm_80
    (H100, "8.0", ()),           # sm_80 SASS does not run on sm_90
    (H100, "9.0", (80,)),        # without "a" the wgmma kernel is only a trap stub
    (A100, "8.6", ()),           # sm_86 SASS does not run on sm_80
    (B200, "8.0+PTX", (80,)),    # compute_80 PTX is JIT-compiled
    (B200, "9.0a+PTX", ()),      # arch-specific PTX is not forward compatible
])
def test_runnable_paths_by_capability(capability, arch_list, paths):
    assert cp.runnable_paths(capability, arch_list) == paths


SMEM = {90: 200 * 1024, 80: 96 * 1024}


@pytest.mark.parametrize("capability, tma_ok, optin, forced, path", [
    (H100, True, SM90_SMEM_LIMIT, None, 90),
    (H100, False, SM90_SMEM_LIMIT, None, 80),   # e.g. an expanded k (stride 0): TMA cannot describe it
    (H100, True, 150 * 1024, None, 80),          # the wgmma tiles do not fit
    (H100, True, SM90_SMEM_LIMIT, 80, 80),       # KVKERNELS_PREFILL_PATH=80
    (H100, False, SM90_SMEM_LIMIT, 90, None),    # forced but impossible: refused, never silently swapped
    (A100, True, 163 * 1024, None, 80),
    (A10, True, SM80_SMEM_LIMIT, None, 80),
    (A10, True, SM80_SMEM_LIMIT, 90, None),
    (A10, True, 64 * 1024, None, None),          # a part with less shared memory than the tiles
    (B200, True, SM90_SMEM_LIMIT, None, None),
])
def test_select_path(capability, tma_ok, optin, forced, path):
    assert cp.select_path(capability, DEFAULT, tma_ok=tma_ok, smem_optin=optin, smem_needed=SMEM,
                          forced=forced) == path


@pytest.mark.parametrize("value, path", [("", None), ("auto", None), ("80", 80), ("sm90", 90), ("SM80", 80)])
def test_forced_path_from_environment(monkeypatch, value, path):
    monkeypatch.setenv("KVKERNELS_PREFILL_PATH", value)
    assert cp.forced_path() == path


def test_forced_path_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("KVKERNELS_PREFILL_PATH", "75")
    with pytest.raises(ValueError, match="KVKERNELS_PREFILL_PATH"):
        cp.forced_path()


def test_tma_needs_non_zero_strides():
    k = torch.randn(2, 33, 4, 64, dtype=torch.float16)
    assert cp._tma_ok(k, k[:, :, :1].expand(2, 33, 4, 64)) is False
    assert cp._tma_ok(k, k[:1].expand(1, 33, 4, 64)) is True  # a size-1 dim's stride is never used


# ------------------------------------------------------------------------- unsupported reasons


def _aligned(shape, dtype=torch.float16):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def _misaligned(shape, dtype=torch.float16):
    n = 1
    for s in shape:
        n *= s
    return torch.randn(n + 1, dtype=torch.float32).to(dtype)[1:].view(*shape)  # 2-byte offset


def _padded_rows(shape, pad=4, dtype=torch.float16):
    *lead, d = shape
    return torch.randn(*lead, d + pad, dtype=torch.float32).to(dtype)[..., :d]  # row stride (d + 4) * 2 bytes


@pytest.mark.parametrize("make_q, varlen, expect", [
    (lambda: _aligned((2, 17, 4, 128)), False, None),
    (lambda: _aligned((2, 17, 4, 64), torch.bfloat16), False, None),
    (lambda: _aligned((30, 4, 256)), True, None),
    (lambda: _aligned((2, 17, 4, 128), torch.float32), False, "float16/bfloat16"),
    (lambda: _aligned((2, 17, 4, 96)), False, "head dim 96"),
    (lambda: _aligned((2, 17, 4, 32)), False, "head dim 32"),
    (lambda: _misaligned((2, 17, 4, 128)), False, "16-byte aligned"),
    (lambda: _padded_rows((2, 17, 4, 128)), False, "multiple of 16 bytes"),
    (lambda: _aligned((2, 4, 17, 128)).transpose(1, 2), False, None),           # any multiple-of-16 strides
    (lambda: _aligned((2, 17, 128, 4)).transpose(2, 3), False, "last dimension"),
])
def test_config_reasons(make_q, varlen, expect):
    q = make_q()
    k = v = torch.empty((q.shape[0], 9, 2, q.shape[-1]) if not varlen else (11, 2, q.shape[-1]), dtype=q.dtype)
    reason = cp.config_reason(q, k, v, varlen)
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason


@pytest.mark.parametrize("bad", ["k", "v"])
def test_misaligned_k_or_v_is_refused(bad):
    q = _aligned((1, 8, 2, 64))
    kv = {"k": _aligned((1, 8, 2, 64)), "v": _aligned((1, 8, 2, 64))}
    kv[bad] = _misaligned((1, 8, 2, 64))
    assert f"{bad} does not start at a 16-byte aligned address" == cp.config_reason(q, kv["k"], kv["v"], False)


def test_cpu_tensors_run_in_the_emulator_or_are_refused():
    from kvkernels import cuda
    q = _aligned((1, 8, 2, 64))
    reason = cuda.unsupported("prefill", q=q, k=q, v=q, varlen=False)
    if cuda.emulator_available():
        assert reason is None
    else:
        assert reason is not None and "emulator" in reason


# ------------------------------------------------------------------------ launch geometry


@needs_ext
@pytest.mark.parametrize("path", cp.PATHS)
@pytest.mark.parametrize("head_dim", cp.HEAD_DIMS)
@pytest.mark.parametrize("seqlen_q", [1, 17, 113, 128, 511, 4096])
def test_plan_covers_every_query_row(path, head_dim, seqlen_q):
    p = cp.plan(path, head_dim, 3, 5, seqlen_q)
    assert (p["grid_y"], p["grid_z"]) == (5, 3)
    assert p["grid_x"] * p["block_m"] >= seqlen_q > (p["grid_x"] - 1) * p["block_m"]


@needs_ext
@pytest.mark.parametrize("head_dim", cp.HEAD_DIMS)
def test_sm80_tiles_fit_every_sm8x_part(head_dim):
    p = cp.plan(cp.PATH_SM80, head_dim, 1, 1, 1)
    assert p["smem_bytes"] <= SM80_SMEM_LIMIT
    assert p["threads"] == 2 * p["block_m"]  # one warp per 16 query rows
    assert p["block_n"] % 16 == 0


@needs_ext
@pytest.mark.parametrize("head_dim", cp.HEAD_DIMS)
def test_sm90_tiles_fit_h100(head_dim):
    p = cp.plan(cp.PATH_SM90, head_dim, 1, 1, 1)
    assert p["smem_bytes"] <= SM90_SMEM_LIMIT
    assert (p["threads"], p["block_m"]) == (384, 128)  # producer + 2 consumer warpgroups of 64 rows
    assert p["block_n"] % 16 == 0 and p["block_n"] <= 256


@needs_ext
def test_plan_rejects_unknown_head_dims():
    with pytest.raises(RuntimeError, match="no kernel"):
        torch.ops.kvkernels_C.prefill_plan(80, 96, 1, 1, 1)


# ------------------------------------------------------------------------- causal / window tiles


def _check_mask_plan(sq, sk, left, right, block_m, block_n):
    codes, bounds = torch.ops.kvkernels_C.prefill_mask_plan(sq, sk, left, right, block_m, block_n)
    m_blocks, k_tiles = -(-sq // block_m), -(-sk // block_n)
    codes = torch.tensor(codes, dtype=torch.int64).reshape(m_blocks, k_tiles)
    bounds = torch.tensor(bounds, dtype=torch.int64).reshape(sq, 2)
    allowed = reference.attention_mask(sq, sk, left, right)  # bool [sq, sk]

    # each row's interval is exactly its row of the reference mask
    j = torch.arange(sk)
    interval = (j.unsqueeze(0) >= bounds[:, :1]) & (j.unsqueeze(0) <= bounds[:, 1:])
    assert torch.equal(interval, allowed), "row bounds differ from the reference mask"

    # tile verdicts: skipped tiles see nothing, unmasked tiles see everything (keys past sk count
    # as hidden), and no loaded tile is wasted
    padded = torch.zeros(m_blocks * block_m, k_tiles * block_n, dtype=torch.bool)
    padded[:sq, :sk] = allowed
    for mb in range(m_blocks):
        rows = slice(mb * block_m, min(sq, (mb + 1) * block_m))
        for t in range(k_tiles):
            tile = padded[rows, t * block_n:(t + 1) * block_n]
            code = int(codes[mb, t])
            where = f"block {mb} tile {t} (sq={sq} sk={sk} window=({left}, {right}))"
            if code == 0:
                assert not tile.any(), f"{where}: skipped but has visible keys"
            else:
                assert tile.any(), f"{where}: loaded but nothing visible"
                if code == 1:
                    assert tile.all(), f"{where}: not masked but some keys hidden"


WINDOWS = [(-1, -1), (-1, 0), (0, 0), (5, 0), (63, 0), (-1, 7), (100, 3), (1, -1), (600, -1)]


@needs_ext
@pytest.mark.parametrize("left, right", WINDOWS, ids=lambda w: str(w))
@pytest.mark.parametrize("sq, sk", [(1, 1), (1, 113), (17, 17), (113, 511), (511, 113), (200, 200), (5, 0)])
@pytest.mark.parametrize("block_m, block_n", [(128, 64), (128, 128), (64, 32)])
def test_mask_plan_matches_reference_mask(sq, sk, left, right, block_m, block_n):
    _check_mask_plan(sq, sk, left, right, block_m, block_n)


@needs_ext
@pytest.mark.parametrize("path", cp.PATHS)
@pytest.mark.parametrize("head_dim", cp.HEAD_DIMS)
def test_mask_plan_with_the_kernels_own_tiles(path, head_dim):
    p = cp.plan(path, head_dim, 1, 1, 1)
    _check_mask_plan(300, 700, 150, 0, p["block_m"], p["block_n"])  # causal sliding window, sq < sk
    _check_mask_plan(700, 300, -1, 0, p["block_m"], p["block_n"])   # causal, sq > sk: leading rows see nothing
