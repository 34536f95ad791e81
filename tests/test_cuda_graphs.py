"""CUDA graphs: one decode step (append_kv of the new tokens, then decode_attention over the grown
cache) captured once and replayed, for each kernel backend, contiguous and paged caches, fp16/bf16
and fp8 storage.

Between replays the step's inputs change in place in the captured tensors: the lengths
(cache_seqlens, from empty up to a full cache), the new keys/values, the queries and, when paged,
the block table. Every replay must give, bit for bit, what the same calls made eagerly on copies of
the same state give: the same cache bytes after the append, the same out and lse. Nothing in a
call may depend on a host read of tensor values, which capture would freeze.

The same step under torch.compile(mode="reduce-overhead") (CUDA graph trees, the caches marked as
static addresses) must match eager bit for bit as well, without CUDA graphs being skipped.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_lse_close, assert_parity, reference, run_or_skip, seeded

import kvkernels

pytestmark = pytest.mark.gpu

FP8 = torch.float8_e4m3fn
B, HQ, HKV, D = 5, 16, 4, 128
PAGE, MAX_PAGES = 16, 20
CAPACITY = PAGE * MAX_PAGES  # 320 positions per sequence, contiguous or paged
NUM_PAGES = B * MAX_PAGES + 7
REPLAYS = 8


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


class State:
    """Every tensor one step reads or writes, on the device; `clone()` for the eager twin."""

    def __init__(self, layout, q_dtype, cache_dtype, s_new, gen):
        dev = "cuda"
        self.paged = layout == "paged"
        self.s_new = s_new
        shape = (NUM_PAGES, PAGE, HKV, D) if self.paged else (B, CAPACITY, HKV, D)
        self.scales = {}
        if cache_dtype == FP8:
            self.scales = dict(k_scale=torch.tensor(0.05, device=dev), v_scale=(torch.rand(HKV, generator=gen) + 0.01)
                               .to(dev))
        full = {n: s.reshape(-1).expand(HKV).cpu() for n, s in self.scales.items()}
        self.kc = reference.quantize(torch.randn(*shape, generator=gen), full.get("k_scale"), cache_dtype).to(dev)
        self.vc = reference.quantize(torch.randn(*shape, generator=gen), full.get("v_scale"), cache_dtype).to(dev)
        self.q = torch.empty(B, HQ, D, dtype=q_dtype, device=dev)
        self.k_new = torch.empty(B, s_new, HKV, D, dtype=q_dtype, device=dev)
        self.v_new = torch.empty_like(self.k_new)
        self.seqlens = torch.zeros(B, dtype=torch.int32, device=dev)    # lengths before the step
        self.lens_after = torch.zeros(B, dtype=torch.int32, device=dev)  # written by the step
        self.table = torch.zeros(B, MAX_PAGES, dtype=torch.int32, device=dev) if self.paged else None
        self.refresh(gen, first=True)

    def refresh(self, gen, first=False):
        """New inputs, written in place into the same tensors (what a serving loop does between replays)."""
        self.q.copy_(torch.randn(B, HQ, D, generator=gen))
        self.k_new.copy_(torch.randn(*self.k_new.shape, generator=gen))
        self.v_new.copy_(torch.randn(*self.v_new.shape, generator=gen))
        top = CAPACITY - self.s_new
        lens = torch.randint(0, top + 1, (B,), generator=gen)
        lens[0], lens[1] = (0, top) if first else (top, 0)  # an empty sequence and a cache filled to the brim
        self.seqlens.copy_(lens.to(torch.int32))
        if self.paged:
            self.table.copy_(torch.randperm(NUM_PAGES, generator=gen)[: B * MAX_PAGES].reshape(B, MAX_PAGES)
                             .to(torch.int32))

    def clone(self):
        twin = object.__new__(State)
        twin.__dict__.update({n: (x.clone() if isinstance(x, torch.Tensor) else x) for n, x in self.__dict__.items()})
        return twin


def step(s: State, backend):
    """One decode step: append the new tokens at cache_seqlens, attend over the grown cache."""
    kvkernels.append_kv(s.k_new, s.v_new, s.kc, s.vc, s.seqlens, block_table=s.table, backend=backend, **s.scales)
    torch.add(s.seqlens, s.s_new, out=s.lens_after)
    return kvkernels.decode_attention(s.q, s.kc, s.vc, s.lens_after, block_table=s.table, return_lse=True,
                                      backend=backend, **s.scales)


def assert_same_bits(graph_state: State, graph_out, eager_state: State, eager_out, what):
    assert torch.equal(bits(graph_state.kc), bits(eager_state.kc)), f"{what}: k_cache differs from eager"
    assert torch.equal(bits(graph_state.vc), bits(eager_state.vc)), f"{what}: v_cache differs from eager"
    assert torch.equal(graph_out[0], eager_out[0]), f"{what}: out differs from eager"
    assert torch.equal(graph_out[1], eager_out[1]), f"{what}: lse differs from eager"


def check_against_reference(s: State, out, lse):
    full = {n: v.reshape(-1).expand(HKV) for n, v in s.scales.items()}
    kw = dict(block_table=s.table, k_scale=full.get("k_scale"), v_scale=full.get("v_scale"))
    ref, ref_lse = reference.decode_attention(s.q.float(), s.kc, s.vc, s.lens_after, **kw)
    ref_lp, _ = reference.decode_attention(s.q, s.kc, s.vc, s.lens_after, upcast=False, **kw)
    assert_parity(out.cpu(), ref.cpu(), ref_lp.cpu())
    assert_lse_close(lse.cpu(), ref_lse.cpu())


CONFIGS = [pytest.param(torch.float16, torch.float16, 1, id="fp16"),
           pytest.param(torch.bfloat16, torch.bfloat16, 1, id="bf16"),
           pytest.param(torch.float16, FP8, 1, id="fp16-fp8cache"),
           pytest.param(torch.bfloat16, torch.bfloat16, 3, id="bf16-3new")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("q_dtype,cache_dtype,s_new", CONFIGS)
def test_captured_step_replays_bit_identical_to_eager(backend, layout, q_dtype, cache_dtype, s_new):
    gen = seeded(31)
    s = State(layout, q_dtype, cache_dtype, s_new, gen)
    with kvkernels.set_checked_mode(False):  # a checked call reads device values: not capturable
        # Warm up on a side stream (Triton compiles, the extension sets its shared-memory limits).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_or_skip(backend, lambda: step(s.clone(), backend), declining=("cuda", "triton"))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = step(s, backend)
        for r in range(REPLAYS):
            if r:
                s.refresh(gen)
            eager = s.clone()   # the state before this step
            graph.replay()
            eager_out = step(eager, backend)
            torch.cuda.synchronize()
            assert_same_bits(s, graph_out, eager, eager_out, f"replay {r}")
            assert torch.equal(s.lens_after, s.seqlens + s_new)
    check_against_reference(s, *graph_out)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_reduce_overhead_compile_matches_eager(backend, layout):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    gen = seeded(32)
    s = State(layout, torch.float16, torch.float16, 1, gen)
    # The caches keep their addresses across calls, as a serving loop's caches do: static inputs,
    # mutated in place inside the graph.
    torch._dynamo.mark_static_address(s.kc)
    torch._dynamo.mark_static_address(s.vc)

    def compiled_step(q, k_new, v_new, kc, vc, seqlens, table):
        kvkernels.append_kv(k_new, v_new, kc, vc, seqlens, block_table=table, backend=backend)
        lens_after = seqlens + 1
        out, lse = kvkernels.decode_attention(q, kc, vc, lens_after, block_table=table, return_lse=True,
                                              backend=backend)
        return out, lse, lens_after

    fn = torch.compile(compiled_step, mode="reduce-overhead", fullgraph=True)
    with kvkernels.set_checked_mode(False):
        run_or_skip(backend, lambda: step(s.clone(), backend), declining=("cuda", "triton"))  # the backend takes this configuration
        for r in range(6):  # warm-up, recording, then replays
            if r:
                s.refresh(gen)
            eager = s.clone()
            torch.compiler.cudagraph_mark_step_begin()
            out, lse, lens_after = (x.clone() for x in fn(s.q, s.k_new, s.v_new, s.kc, s.vc, s.seqlens, s.table))
            s.lens_after.copy_(lens_after)
            eager_out = step(eager, backend)
            torch.cuda.synchronize()
            assert torch.equal(s.lens_after, eager.lens_after)
            assert_same_bits(s, (out, lse), eager, eager_out, f"call {r}")
    assert counters["inductor"]["cudagraph_skips"] == 0, "torch.compile skipped CUDA graphs (see the log for why)"
    check_against_reference(s, out, lse)
    torch._dynamo.reset()
