"""Proof that the emulator's checks bite: deliberately broken kernels fail the suite, the kernels run
clean under AddressSanitizer + UndefinedBehaviorSanitizer, which catches a shared-memory index one
past the end, and clean under the shared-memory race checker, which names a missing barrier. Each case builds a patched copy of csrc/ (tests/emu_variant.py) and runs decode
tests against it in a subprocess; the unpatched kernels pass the same tests in the main run."""

from __future__ import annotations

import pytest

import emu_variant
from conftest import HAS_EMULATOR

# One xdist worker runs them all (make test passes --dist loadgroup): the variants share build folders,
# so each patch recompiles only the files it touches.
pytestmark = [pytest.mark.emu, pytest.mark.xdist_group("emu-variants"),
              pytest.mark.skipif(not HAS_EMULATOR, reason="the CUDA emulator is not built")]

DECODE = "csrc/kernels/decode.cuh"
# Each variant builds only the kernels its tests run (emu_variant.OPS): a patch of decode.cuh then
# recompiles the decode launchers, not the cache-attention ones that share the template.
DECODE_OPS = ("decode",)
PREFILL_OPS = ("prefill",)
# Paged and contiguous parity, fp16, several tiles per sequence (awkward lengths up to 511).
PARITY = ["tests/test_decode.py", "-k", "test_parity_contiguous_and_paged and fp16 and cuda-emu"]

MUTATIONS = {
    "cp_async_wait_removed": {DECODE: ("    cp_async_wait<kS - 2>();\n", "\n")},
    "ldmatrix_trans_swapped": {DECODE: ("ldmatrix_x4_trans(vb,", "ldmatrix_x4(vb,")},
    "syncthreads_dropped": {DECODE: (
        "    __syncthreads();  // tile's copies visible to all; every warp is done with the stage reused below\n",
        "\n")},
    "page_index_off_by_one": {DECODE: ("slot * p.bt_stride_page);", "(slot + 1) * p.bt_stride_page);")},
}


def _rel(patches):
    return {path.removeprefix("csrc/"): change for path, change in patches.items()}


def _assert_mutant_fails(mutation, patches, args, ops):
    """Builds the kernels of `ops` with `patches` and runs `args` against them: some test must fail."""
    with emu_variant.variant("mutant", _rel(patches), ops=ops) as library:
        result = emu_variant.run_tests(library, args)
    assert result.returncode != 0, f"{mutation}: the broken kernel passed\n{result.stdout[-3000:]}"
    assert "FAILED" in result.stdout, result.stdout[-3000:]
    return result


def _assert_sanitized_clean(args, ops):
    with emu_variant.variant("sanitized", sanitize=True, ops=ops) as library:
        result = emu_variant.run_tests(library, args, sanitize=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_broken_decode_kernel_fails_the_parity_tests(mutation):
    _assert_mutant_fails(mutation, MUTATIONS[mutation], PARITY, DECODE_OPS)


def test_a_barrier_some_threads_never_reach_is_reported_as_a_hang():
    patch = {DECODE: ("  __syncthreads();  // the pipeline buffers become the merge area\n",
                      "  if (tid < 64) __syncthreads();\n")}
    with emu_variant.variant("mutant", _rel(patch), ops=DECODE_OPS) as library:
        result = emu_variant.run_tests(library, PARITY)
    assert result.returncode != 0
    assert "hang (a barrier some threads never reach)" in result.stdout, result.stdout[-3000:]
    assert "kvk_decode_kernel" in result.stdout and "wait at __syncthreads" in result.stdout, result.stdout[-3000:]


def test_sanitized_kernels_run_clean():
    _assert_sanitized_clean(PARITY, DECODE_OPS)


def test_sanitizer_catches_a_shared_memory_index_one_past_the_end():
    # The paged row flags moved to the end of the block's shared memory: the flag of row 0 is the
    # first byte past the launch's allocation.
    patch = {DECODE: ("unsigned char* const flags = smem + Tr::kPipeBytes;",
                      "unsigned char* const flags = smem + Tr::kSmemBytes;")}
    with emu_variant.variant("sanitized", _rel(patch), sanitize=True, ops=DECODE_OPS) as library:
        result = emu_variant.run_tests(library, PARITY, sanitize=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "AddressSanitizer: heap-buffer-overflow" in output, output[-3000:]
    assert "kvk_decode_kernel" in output, output[-3000:]  # the report's stack names the kernel


# ------------------------------------------------------------------------------ race checker

# Decode, cache attention and both prefill kernels (their __syncwarp-ordered output staging; the
# cuda-emu-sm90 cases match "cuda-emu" too), briefly.
RACE_CLEAN = ["tests/test_decode.py", "tests/test_cache_attention.py", "tests/test_prefill.py", "-k",
              "cuda-emu and (test_parity_contiguous_and_paged and fp16 and page16"
              " or test_cuda_parity_ragged_mixed_batch and fp16 or test_dense_parity and fp16 and causal)"]


RACE_CLEAN_OPS = ("cache_attention", "decode", "prefill")


def test_race_checker_finds_no_race_in_the_kernels():
    with emu_variant.variant("racecheck", racecheck=True, ops=RACE_CLEAN_OPS) as library:
        result = emu_variant.run_tests(library, RACE_CLEAN)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "deselected" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("barrier", [
    # the stage a warp may still read is refilled by another warp's cp.async
    "    __syncthreads();  // tile's copies visible to all; every warp is done with the stage reused below\n",
    # the pipeline buffers turn into the merge area while other warps still read their last tile
    "  __syncthreads();  // the pipeline buffers become the merge area\n",
], ids=["stage-refill", "merge-area"])
def test_race_checker_names_a_dropped_barrier(barrier):
    with emu_variant.variant("racecheck", _rel({DECODE: (barrier, "\n")}), racecheck=True, ops=DECODE_OPS) as library:
        result = emu_variant.run_tests(library, PARITY)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "shared-memory race at byte offset" in result.stdout, result.stdout[-3000:]
    assert "kvk_decode_kernel" in result.stdout, result.stdout[-3000:]


# Cache attention (the decode template with kCacheAttn): mixed ragged batches, causal and windowed.
CACHE_PARITY = ["tests/test_cache_attention.py", "-k",
                "cuda-emu and (test_cuda_parity_ragged_mixed_batch and fp16 or test_cuda_parity_with_window)"]

CACHE_MUTATIONS = {
    # each row's own causal limit replaced by the sequence's end: queries see their future
    "row_causal_limit_dropped": {DECODE: ("row_hi[k] = p.causal ? min(pq + 1, len) : len;", "row_hi[k] = len;")},
    # each row's own window start dropped: only the row tile's first row is windowed
    "row_window_start_dropped": {DECODE: ("if (kCacheAttn) seen = seen && token >= lim_lo[e >> 1];", "")},
    # row tiles stop at their first row's limit instead of their last's
    "row_tile_limit_of_first_row": {DECODE: ("const int last_p = pos0 + row_token(rows - 1);",
                                             "const int last_p = pos0 + row_token(0);")},
}


@pytest.mark.parametrize("mutation", list(CACHE_MUTATIONS))
def test_broken_cache_attention_kernel_fails_the_parity_tests(mutation):
    _assert_mutant_fails(mutation, CACHE_MUTATIONS[mutation], CACHE_PARITY, ("cache_attention",))


@pytest.mark.slow  # about 8 minutes on 2 cores: outside the default run, which sanitizes decode
def test_sanitized_cache_attention_kernels_run_clean():
    _assert_sanitized_clean(CACHE_PARITY, ("cache_attention",))


# ---------------------------------------------------------------------- the sm_90a prefill kernel

SM90 = "csrc/kernels/prefill_sm90.cuh"
WGMMA = "csrc/kernels/prefill_wgmma.cuh"
# The wgmma/TMA kernel in the emulator (KVKERNELS_PREFILL_PATH=90 through the cuda-emu-sm90 cases):
# five key tiles through two stages, a window, varlen with NaN neighbours.
SM90_PARITY = ["tests/test_prefill.py", "-k",
               "cuda-emu-sm90 and (test_many_key_tiles and 64 or test_keys_outside_the_band"
               " or test_varlen_never_reads)"]

SM90_MUTATIONS = {
    # the producer expects 16 bytes more than its TMA boxes bring: the stage never completes
    "expect_tx_off_by_16": {SM90: ("mbar_arrive_expect_tx(&k_full[stage], Cfg::kKVBytes);",
                                   "mbar_arrive_expect_tx(&k_full[stage], Cfg::kKVBytes + 16);")},
    # consumers wait on the wrong phase of a K stage: they read it before (or long after) it is filled
    "k_full_parity_flipped": {SM90: ("mbar_wait(&k_full[stage], (it / kStages) & 1);",
                                     "mbar_wait(&k_full[stage], ((it / kStages) & 1) ^ 1);")},
    # the softmax reads S = Q K^T while its wgmma is still in flight
    "wgmma_wait_dropped": {SM90: ("      wgmma_wait<1>();", "      ;")},
    # the descriptors say 64-byte swizzle, TMA writes 128-byte swizzle
    "descriptor_swizzle_64B": {WGMMA: ("(1ull << 62)", "(2ull << 62)")},
    # a boundary tile's V rows outside the block's keys are left as loaded (NaN neighbours leak)
    "edge_v_rows_not_zeroed": {SM90: ("if (key < key_lo || key >= key_hi)", "if (false)")},
}


@pytest.mark.parametrize("mutation", list(SM90_MUTATIONS))
def test_broken_sm90_prefill_fails_the_parity_tests(mutation):
    result = _assert_mutant_fails(mutation, SM90_MUTATIONS[mutation], SM90_PARITY, PREFILL_OPS)
    if mutation == "expect_tx_off_by_16":
        assert "hang (a barrier some threads never reach)" in result.stdout, result.stdout[-3000:]
        assert "mbarrier" in result.stdout, result.stdout[-3000:]


def test_sanitized_sm90_prefill_runs_clean():
    _assert_sanitized_clean(SM90_PARITY, PREFILL_OPS)


# Orderings of the sm_90a kernel that only the race checker sees broken (in the emulator the data
# may still come out right, on the GPU it need not): a consumer warp releasing its K stage to the
# producer before the wgmma reading it completed, and the consumer warpgroups' shared zeroing of a
# boundary tile's V rows without the named barrier before the other warpgroup's wgmma reads them.
SM90_RACES = {
    # (tile 0's stage, refilled for tile 2)
    "k_stage_released_before_its_wgmma_completes": {SM90: (
        "    issue_qk(0);\n    wgmma_wait<0>();\n    fence_regs(s);\n    release(&k_empty[0]);\n",
        "    issue_qk(0);\n    release(&k_empty[0]);\n    wgmma_wait<0>();\n    fence_regs(s);\n")},
    "v_zeroing_barrier_dropped": {SM90: (
        "      named_barrier_sync(kConsumerBarrier, Cfg::kConsumerWarps * 32);\n", "\n")},
}
# Several key tiles through both stages, the last one partial (its V rows past the end zeroed).
SM90_RACE_RUN = ["tests/test_prefill.py", "-k", "cuda-emu-sm90 and test_many_key_tiles and 64"]


@pytest.mark.parametrize("mutation", list(SM90_RACES))
def test_race_checker_names_a_broken_sm90_ordering(mutation):
    # the clean run's build: only the sm_90a kernel's file is recompiled
    with emu_variant.variant("racecheck", _rel(SM90_RACES[mutation]), racecheck=True, ops=RACE_CLEAN_OPS) as library:
        result = emu_variant.run_tests(library, SM90_RACE_RUN)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "shared-memory race at byte offset" in result.stdout, result.stdout[-3000:]
    assert "kvk_prefill_sm90" in result.stdout, result.stdout[-3000:]
