"""Timing and ceilings.

A benchmarked call is `fn(i)`, running on input set i of `n_sets` identical-shaped sets. Cycling
through enough sets that their total size is several times the L2 cache (50 MB on an H100) makes
every call read its inputs from device memory, as a real decode step does, rather than from a
cache the previous repetition warmed. When memory does not allow enough sets, an L2 flush (a
write over a buffer twice the L2 size) runs before each timed call, outside the timed region.

Methods (all report medians):
  events     one CUDA event pair per call, calls issued back to back: includes launch gaps when
             the host is slower than the GPU, as an eager framework sees it
  graph      the calls captured once in a CUDA graph and replayed: launch overhead removed
  do_bench   triton.testing.do_bench (its own L2 flush between calls), median
  cpu-wall   without a GPU: wall clock per call (not a GPU figure)

host_us is the host time of one Python-level call (validation, dispatch, launch), measured by
issuing calls without synchronising.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, used when the device does not report one
ROTATION_FACTOR = 3            # input sets span at least this many L2 sizes


@dataclass
class Timing:
    median_us: float                  # the headline number: graph_us when captured, else eager
    method: str                       # "events", "graph", "do_bench" or "cpu-wall"
    eager_us: float | None = None     # median per call, issued eagerly
    graph_us: float | None = None     # median per call inside a replayed CUDA graph
    host_us: float | None = None      # host time of one call
    reps: int = 0
    notes: list[str] = field(default_factory=list)


def on_gpu(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if on_gpu(device):
        torch.cuda.synchronize(device)


def l2_bytes(device) -> int:
    if not on_gpu(device):
        return DEFAULT_L2_BYTES
    props = torch.cuda.get_device_properties(torch.device(device))
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_count(set_bytes: int, *, l2: int = DEFAULT_L2_BYTES, free_bytes: int | None = None,
                   memory_fraction: float = 0.4, max_sets: int = 64) -> int:
    """How many input sets of `set_bytes` to cycle through so that consecutive uses of one set
    are separated by at least ROTATION_FACTOR * l2 bytes of other data, within memory_fraction of
    the free memory (at least 1)."""
    set_bytes = max(1, int(set_bytes))
    wanted = math.ceil(ROTATION_FACTOR * l2 / set_bytes) + 1 if set_bytes < ROTATION_FACTOR * l2 else 1
    if free_bytes is not None:
        wanted = min(wanted, max(1, int(memory_fraction * free_bytes) // set_bytes))
    return max(1, min(wanted, max_sets))


def rotation_for(set_bytes: int, device) -> tuple[int, bool]:
    """(number of input sets, whether an explicit L2 flush is also needed) for this device."""
    if not on_gpu(device):
        return 1, False
    l2 = l2_bytes(device)
    if set_bytes >= ROTATION_FACTOR * l2:  # one set streams through L2 and evicts itself
        return 1, False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    n = rotation_count(set_bytes, l2=l2, free_bytes=free)
    return n, (n - 1) * set_bytes < ROTATION_FACTOR * l2


class L2Flusher:
    """Overwrites a buffer twice the L2 size, evicting whatever the last call left in L2."""

    def __init__(self, device):
        self.buffer = torch.empty(2 * l2_bytes(device) // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buffer.fill_(0x5A5A5A5A)


def _median_ms(starts, ends) -> float:
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _calibrate(fn, n_sets, device, warmup_ms: float) -> float:
    """Warm up (compilation, autotuning, caches) for about warmup_ms; returns ms per call."""
    fn(0)
    sync(device)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(calls % n_sets)
        calls += 1
        sync(device)
        elapsed = (time.perf_counter() - t0) * 1e3
        if elapsed >= warmup_ms or calls >= 1000:
            return elapsed / calls


def host_overhead_us(fn, n_sets, device, calls: int = 20) -> float:
    """Host time per call, calls issued without synchronising (launches queue up on the GPU)."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i % n_sets)
    t1 = time.perf_counter()
    sync(device)
    return (t1 - t0) / calls * 1e6


def _reps_for(per_call_ms: float, rep_ms: float, min_reps: int, max_reps: int) -> int:
    return int(max(min_reps, min(max_reps, rep_ms / max(per_call_ms, 1e-4))))


def time_events(fn, n_sets, device, reps: int, flush=None) -> float:
    """Median us per call, one CUDA event pair per call."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        if flush is not None:
            flush()
        starts[r].record()
        fn(r % n_sets)
        ends[r].record()
    sync(device)
    return _median_ms(starts, ends) * 1e3


def time_graph(fn, n_sets, device, per_call_ms: float, rep_ms: float, min_reps: int) -> tuple[float, int]:
    """Median us per call over replays of a CUDA graph holding `calls` calls (cycling the input
    sets). Returns (us per call, replays timed)."""
    calls = max(n_sets, min(100, math.ceil(1.0 / max(per_call_ms, 1e-3))))  # >= ~1 ms per replay
    calls = n_sets * math.ceil(calls / n_sets)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for i in range(min(3, calls)):
            fn(i % n_sets)
    torch.cuda.current_stream(device).wait_stream(stream)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % n_sets)
    graph.replay()
    sync(device)
    replays = _reps_for(per_call_ms * calls, rep_ms, min_reps, 200)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for r in range(replays):
        starts[r].record()
        graph.replay()
        ends[r].record()
    sync(device)
    us = _median_ms(starts, ends) * 1e3 / calls
    del graph
    return us, replays


def time_do_bench(fn, n_sets, warmup_ms: float, rep_ms: float) -> float:
    from triton.testing import do_bench
    counter = [0]

    def call():
        fn(counter[0] % n_sets)
        counter[0] += 1

    return float(do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3


def time_cpu(fn, n_sets, rep_ms: float, min_reps: int, max_reps: int = 50) -> tuple[float, int]:
    samples, t_end = [], time.perf_counter() + rep_ms / 1e3
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn(len(samples) % n_sets)
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples), len(samples)


def measure(fn, n_sets: int, device, *, method: str = "events", cuda_graph: bool = False,
            warmup_ms: float = 10.0, rep_ms: float = 50.0, min_reps: int = 5, max_reps: int = 2000,
            flush: bool = False) -> Timing:
    """Time fn(i) (i cycling over n_sets input sets) on `device`; see the module docstring."""
    if not on_gpu(device):
        fn(0)  # warm-up: first-call costs (Triton interpreter set-up, lazy imports)
        median, reps = time_cpu(fn, n_sets, rep_ms, min_reps=max(1, min(min_reps, 3)))
        return Timing(median_us=median, method="cpu-wall", eager_us=median, host_us=median, reps=reps,
                      notes=["CPU wall clock: not a GPU figure"])
    per_call_ms = _calibrate(fn, n_sets, device, warmup_ms)
    flusher = L2Flusher(device) if flush else None
    notes = []
    if method == "do_bench":
        eager = time_do_bench(fn, n_sets, warmup_ms, rep_ms)
        reps = 0
    elif method == "events":
        reps = _reps_for(per_call_ms, rep_ms, min_reps, max_reps)
        eager = time_events(fn, n_sets, device, reps, flusher)
    else:
        raise ValueError(f"timing method must be 'events' or 'do_bench', got {method!r}")
    timing = Timing(median_us=eager, method=method, eager_us=eager, reps=reps, notes=notes)
    timing.host_us = host_overhead_us(fn, n_sets, device)
    if cuda_graph:
        try:
            timing.graph_us, timing.reps = time_graph(fn, n_sets, device, per_call_ms, rep_ms, min_reps)
            timing.median_us, timing.method = timing.graph_us, "graph"
        except Exception as e:  # a peer that cannot be captured keeps its eager time
            sync(device)
            notes.append(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return timing


# ------------------------------------------------------------------------------------ ceilings


def copy_gbps(device, nbytes: int | None = None, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 B/s), counting bytes read plus bytes written."""
    if nbytes is None:
        if on_gpu(device):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            nbytes = min(2**30, free // 4)
        else:
            nbytes = 32 * 2**20
    n = nbytes // 4
    src = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device=device)  # not zeros
    dst = torch.empty_like(src)
    fn = lambda i: dst.copy_(src)  # noqa: E731
    if on_gpu(device):
        _calibrate(fn, 1, device, 5.0)
        us = time_events(fn, 1, device, reps)
    else:
        fn(0)
        us, _ = time_cpu(fn, 1, rep_ms=50.0, min_reps=3)
    return 2 * n * 4 / (us * 1e3)


def matmul_tflops(device, n: int | None = None, reps: int = 10) -> float:
    """Dense bf16 matrix product throughput, TFLOP/s (2 n^3 flops per product)."""
    if n is None:
        n = 8192 if on_gpu(device) else 256  # CPU bf16 matmuls are slow (no matrix units)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
    b = torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
    c = torch.empty_like(a)
    fn = lambda i: torch.matmul(a, b, out=c)  # noqa: E731
    if on_gpu(device):
        _calibrate(fn, 1, device, 20.0)
        us = time_events(fn, 1, device, reps)
    else:
        fn(0)
        us, _ = time_cpu(fn, 1, rep_ms=50.0, min_reps=3)
    return 2 * n**3 / (us * 1e6)


def measure_ceilings(device) -> dict:
    return {"copy_gbps": copy_gbps(device), "matmul_bf16_tflops": matmul_tflops(device)}
