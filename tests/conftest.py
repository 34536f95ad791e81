"""Shared test helpers: the parity criterion, cache builders with shuffled pages and NaN poison,
device/backend parametrisation. Tests import them as `from conftest import ...`.

Parity contract (DESIGN.md section 4): with `ref` the fp32 oracle on inputs already in the kernel's
dtype, and `ref_lp` the same math done naively in that low precision,
    max|out - ref| <= 2 * max|ref_lp - ref| + floor
LSE within 1e-4 of the oracle. Appends bit-exact, every unwritten slot bit-identical.
"""

from __future__ import annotations

import os

import pytest
import torch

import kvkernels.cuda
import kvkernels.triton  # (sets TRITON_INTERPRET=1 before any kernel is defined when there is no GPU)
from kvkernels import reference

HAS_CUDA = torch.cuda.is_available()
# The CUDA kernels built for the host against the emulator (csrc/emu/): backend="cuda" on CPU tensors.
HAS_EMULATOR = kvkernels.cuda.emulator_available()
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per xdist worker: workers x threads > cores makes OpenMP threads spin
    torch.set_num_threads(1)
# Where backend="triton" runs in this process: CPU tensors under the interpreter, else the GPU.
TRITON_DEVICE = "cpu" if kvkernels.triton.INTERPRET else "cuda"
AWKWARD_LENGTHS = (1, 17, 113, 511)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (large grids)")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("KVKERNELS_SLOW") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="large grid: run with --run-slow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


# ------------------------------------------------------------------------------------ parity


def assert_parity(out, ref, ref_lp, *, floor: float = 1e-5, what: str = "out"):
    """The FlashAttention criterion: out's error vs the fp32 oracle is at most twice the error of
    the same math done naively in low precision (plus a small floor). NaN anywhere fails."""
    out32, ref32, lp32 = (t.detach().double().cpu() for t in (out, ref, ref_lp))
    assert not torch.isnan(out32).any(), f"{what} has NaN"
    err = (out32 - ref32).abs().max().item() if out.numel() else 0.0
    lp_err = (lp32 - ref32).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * lp_err + floor, f"{what}: max error {err:.3e} > 2 * low-precision error {lp_err:.3e} + {floor}"


def assert_lse_close(lse, ref_lse, *, atol: float = 1e-4, rtol: float = 1e-5):
    """LSE within 1e-4 of the oracle; -inf (empty rows) must match exactly."""
    assert lse.dtype == torch.float32
    lse, ref_lse = lse.double().cpu(), ref_lse.double().cpu()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "empty rows must have lse -inf, and only they"
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=atol, rtol=rtol)


def run_or_skip(backend: str, call, declining=("cuda",)):
    """Run call(); a configuration that a declining backend does not support (the CUDA kernels take
    head dims 64/128/256 only, say; auto sends the rest to Triton) is skipped with its reason."""
    try:
        return call()
    except ValueError as e:
        if backend in declining and "does not support" in str(e):
            pytest.skip(str(e))
        raise


# --------------------------------------------------------------------------------- generators


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float16, device="cpu", gen=None, scale: float = 1.0) -> torch.Tensor:
    """Fresh random data made on the CPU (reproducible) and moved to the device."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype=dtype, device=device)


def poison_contiguous(cache: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
    """NaN in every position >= seqlens[b] of a contiguous [B, S_max, Hkv, D] cache (in place)."""
    for b, n in enumerate(seqlens.tolist()):
        cache[b, n:] = float("nan")
    return cache


def build_paged(dense: torch.Tensor, seqlens: torch.Tensor, page_size: int, *, gen=None,
                extra_pages: int = 3, extra_cols: int = 2, poison: bool = True):
    """Scatter a dense [B, S, Hkv, D] cache into shuffled pages.

    -> (cache [num_pages, page_size, Hkv, D], block_table int32 [B, max_pages]).
    Pages are assigned in a random order; spare pages and every row past a sequence's length are
    NaN (a kernel that reads them fails the test); block_table columns past a sequence's pages point
    at a NaN page, never at -1, so a stray read is a wrong answer rather than a fault.
    """
    B, S, hkv, d = dense.shape
    pages_per_seq = [max(1, -(-int(n) // page_size)) for n in seqlens.tolist()]
    max_pages = max(-(-S // page_size), max(pages_per_seq, default=1)) + extra_cols
    used = sum(pages_per_seq)
    num_pages = used + extra_pages
    perm = torch.randperm(num_pages, generator=gen).tolist()
    fill = float("nan") if poison else 0.0
    cache = torch.full((num_pages, page_size, hkv, d), fill, dtype=torch.float32).to(dense.dtype)
    poison_page = perm[used] if extra_pages else perm[0]
    table = torch.full((B, max_pages), poison_page, dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(seqlens.tolist()):
        for p in range(pages_per_seq[b]):
            page = perm[cursor]
            cursor += 1
            table[b, p] = page
            rows = min(page_size, max(0, n - p * page_size))
            if rows:
                cache[page, :rows] = dense[b, p * page_size:p * page_size + rows].cpu()
    return cache.to(dense.device), table.to(dense.device)


def lengths_tensor(lengths, device="cpu") -> torch.Tensor:
    return torch.tensor(list(lengths), dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------- parametrisation


def devices():
    return ["cpu"] + (["cuda"] if HAS_CUDA else [])


def kernel_backends():
    """(backend, device) pairs that run real kernels here: Triton everywhere (interpreted on the
    CPU), the CUDA kernels in the emulator on CPU tensors when it is built, CUDA when there is a
    device."""
    # With a GPU present Triton compiles for it and cannot interpret CPU tensors.
    pairs = [pytest.param("triton", "cpu", id="triton-cpu")] if kvkernels.triton.INTERPRET else []
    if HAS_EMULATOR:
        pairs += [pytest.param("cuda", "cpu", id="cuda-emu", marks=pytest.mark.emu)]
    if HAS_CUDA:
        pairs += [pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
                  pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.gpu)]
    return pairs


@pytest.fixture
def gen():
    return seeded(0)


__all__ = ["assert_parity", "assert_lse_close", "randn", "seeded", "poison_contiguous", "build_paged",
           "lengths_tensor", "devices", "kernel_backends", "reference", "AWKWARD_LENGTHS", "LOW_PRECISION",
           "HAS_CUDA", "HAS_EMULATOR", "TRITON_DEVICE", "run_or_skip"]
