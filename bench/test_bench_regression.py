"""Regression tracking of our kernels with pytest-benchmark. Not part of `make test` (the suite's
testpaths is tests/): run it by path, on a GPU for numbers that mean something.

    pytest bench/test_bench_regression.py --benchmark-autosave                  # store a baseline
    pytest bench/test_bench_regression.py --benchmark-compare \\
        --benchmark-compare-fail=median:10%                                      # fail on a 10% slowdown

Each benchmark round issues CALLS calls back to back on rotated input sets (so the cache comes
from device memory, not L2) and synchronises once; pytest-benchmark's times are per round, and
extra_info records calls per round, bytes and FLOPs per call. On the CPU the sizes are tiny and
the Triton kernels interpreted: it only checks that the suite runs.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvkernels.benchmark import append, decode, peers, prefill, timing  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
CALLS = 20 if GPU else 1
DTYPE = "bf16" if GPU else "fp16"
HEADS = (32, 8, 128) if GPU else (4, 2, 64)  # Llama-3-8B's attention shape on a GPU

CASES = {
    "decode-contiguous": (decode, decode.make_config(16 if GPU else 1, 8192 if GPU else 32, *HEADS, DTYPE)),
    "decode-paged16": (decode, decode.make_config(16 if GPU else 1, 8192 if GPU else 32, *HEADS, DTYPE, page_size=16)),
    "decode-paged16-fp8": (decode, decode.make_config(16 if GPU else 1, 8192 if GPU else 32, *HEADS, DTYPE,
                                                      page_size=16, fp8=True)),
    "prefill-causal": (prefill, prefill.make_config(1, 4096 if GPU else 32, *HEADS, DTYPE, causal=True)),
    "append-decode-step": (append, append.make_config(64 if GPU else 2, 4096 if GPU else 16, 1, *HEADS, DTYPE,
                                                      page_size=16)),
    "append-chunk": (append, append.make_config(8 if GPU else 1, 4096 if GPU else 16, 512 if GPU else 8, *HEADS,
                                                DTYPE, page_size=16)),
}
IMPLS = ("kvkernels-cuda", "kvkernels-triton")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_speed(benchmark, name, impl):
    module, config = CASES[name]
    n_sets, flush = timing.rotation_for(module.set_bytes(config), DEVICE)
    case = module.build(config, DEVICE, n_sets)
    try:
        fn = peers.prepare(impl, case)
    except peers.Unsupported as e:
        pytest.skip(str(e))
    counter = itertools.count()

    def round_():
        for _ in range(CALLS):
            fn(next(counter) % case.n_sets)
        timing.sync(DEVICE)

    benchmark.group = name
    benchmark.extra_info.update(config=config, calls_per_round=CALLS, bytes_per_call=case.nbytes,
                                flops_per_call=case.flops, input_sets=case.n_sets, device=str(DEVICE))
    benchmark.pedantic(round_, rounds=30 if GPU else 2, warmup_rounds=3 if GPU else 0)
