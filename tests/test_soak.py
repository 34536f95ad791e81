"""Soak: many decode steps of a serving loop through kvkernels.cache.PagedKVCache.

Sequences of random prompt lengths arrive, grow by one token per step (extend + append + attend in
every layer), finish at random lengths and are freed; when the pool runs dry the longest sequence
is preempted (freed), like a serving engine does. After every step the pool is audited through the
public API: free + held == all pages, no page held by two live sequences, each sequence holds
exactly the pages its length needs, and the cache's own invariants hold (device tables in step with
the host). Every few steps the outputs of a sample of sequences are checked against
kvkernels.reference run on their pages gathered into a dense cache, and the gathered keys/values
against the history written (bit for bit). The number of live tensors and Python objects must not
grow from one drained point of the run to the next.

Allocation from several threads at once (a barrier releases them together) must never give one page
to two sequences and must account for every page exactly.

CPU default: a few hundred steps with the reference backend, tiny shapes. `slow`: thousands of
steps. `gpu`: the same loop on the device with automatic backend selection (and Triton).
"""

from __future__ import annotations

import gc
import random
import sys
import threading

import pytest
import torch
from conftest import assert_parity, reference

from kvkernels.cache import CacheFullError, PagedKVCache


class Soak:
    """A serving loop over one PagedKVCache, with a host copy of everything each sequence was given."""

    def __init__(self, *, seed, device="cpu", backend="reference", dtype=torch.float16, layers=2, num_pages=40,
                 page_size=4, hkv=2, hq=4, d=16, max_seqs=12, max_prompt=20, max_new=40, window_left=-1,
                 check_every=7):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.device, self.dtype, self.layers = device, dtype, layers
        self.hkv, self.hq, self.d, self.page_size = hkv, hq, d, page_size
        self.max_prompt, self.max_new, self.window_left = max_prompt, max_new, window_left
        self.check_every = check_every
        self.cache = PagedKVCache(layers, num_pages, page_size, hkv, d, max_seqs=max_seqs, dtype=dtype,
                                  device=device, window_left=window_left, backend=backend)
        self.num_pages = num_pages
        self.target: dict[int, int] = {}          # sequence -> length at which it finishes
        self.history: dict[int, torch.Tensor] = {}  # sequence -> [layers, 2, max_len, Hkv, D] on the CPU
        self.step_count = 0
        self.stats = dict(arrived=0, finished=0, preempted=0, refused=0, checked=0, max_live=0, decoded=0)

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.dtype)

    # ------------------------------------------------------------------------------- lifecycle

    def _arrive(self):
        while self.rng.random() < 0.35:
            prompt = self.rng.randint(1, self.max_prompt)
            try:
                sid = self.cache.allocate(prompt)
            except CacheFullError:
                self.stats["refused"] += 1
                return
            self.stats["arrived"] += 1
            self.target[sid] = prompt + self.rng.randint(1, self.max_new)
            hist = torch.empty(self.layers, 2, prompt + self.max_new, self.hkv, self.d, dtype=self.dtype)
            for layer in range(self.layers):
                k, v = self._randn(1, prompt, self.hkv, self.d), self._randn(1, prompt, self.hkv, self.d)
                self.cache.append(layer, [sid], k.to(self.device), v.to(self.device))
                hist[layer, 0, :prompt], hist[layer, 1, :prompt] = k[0], v[0]
            self.history[sid] = hist

    def _free(self, sid):
        self.cache.free(sid)
        del self.target[sid], self.history[sid]

    def _extend_or_preempt(self, live):
        """One more position for every live sequence; when the pool is dry, free the longest one."""
        while live:
            try:
                self.cache.extend(live, 1)
                return live
            except CacheFullError:
                victim = max(live, key=self.cache.seq_len)
                self._free(victim)
                self.stats["preempted"] += 1
                live = [i for i in live if i != victim]
        return live

    def step(self):
        self.step_count += 1
        self._arrive()
        live = self._extend_or_preempt(sorted(self.target))
        self.stats["max_live"] = max(self.stats["max_live"], len(live))
        if live:
            self.stats["decoded"] += len(live)
            check = self.step_count % self.check_every == 0
            for layer in range(self.layers):
                k, v = self._randn(len(live), 1, self.hkv, self.d), self._randn(len(live), 1, self.hkv, self.d)
                q = self._randn(len(live), self.hq, self.d)
                self.cache.append(layer, live, k.to(self.device), v.to(self.device))
                for j, sid in enumerate(live):
                    n = self.cache.seq_len(sid)
                    self.history[sid][layer, 0, n - 1], self.history[sid][layer, 1, n - 1] = k[j, 0], v[j, 0]
                out = self.cache.attend(layer, live, q.to(self.device))
                assert out.shape == q.shape and out.dtype == q.dtype
                if check:
                    self._check_outputs(layer, live, q, out.cpu())
        for sid in [i for i in live if self.cache.seq_len(i) >= self.target[i]]:
            self._free(sid)
            self.stats["finished"] += 1
        if self.target and self.rng.random() < 0.03:  # a client disconnects early
            self._free(self.rng.choice(sorted(self.target)))
        self.audit()

    def drain(self):
        for sid in sorted(self.target):
            self._free(sid)
        self.audit()
        assert self.cache.num_free_pages == self.num_pages, "pages were not all returned"
        assert self.cache.live_ids == []
        assert int(self.cache.cache_seqlens.abs().sum()) == 0

    # ----------------------------------------------------------------------------------- checks

    def audit(self):
        """Pool accounting through the public API, then the cache's own invariants."""
        cache = self.cache
        live = cache.live_ids
        assert sorted(self.target) == live
        held = {sid: cache.pages(sid) for sid in live}
        flat = [p for pages in held.values() for p in pages]
        assert len(flat) == len(set(flat)), "a page is held by two live sequences"
        assert all(0 <= p < self.num_pages for p in flat)
        assert cache.num_free_pages + len(flat) == self.num_pages, "free + held != total"
        for sid, pages in held.items():
            assert len(pages) == -(-cache.cached_len(sid) // self.page_size), f"sequence {sid} holds the wrong pages"
            assert cache.seq_len(sid) == cache.cached_len(sid) + cache.dropped(sid)
        cache.check_invariants()

    def gathered(self, layer, sid):
        """The sequence's cached positions read back from its pages: (k, v) [cached_len, Hkv, D] on the CPU."""
        n = self.cache.cached_len(sid)
        pages = torch.tensor(self.cache.pages(sid), dtype=torch.long, device=self.device)
        kc, vc = self.cache.layer_cache(layer)
        k = kc.index_select(0, pages).reshape(-1, self.hkv, self.d)[:n].cpu()
        v = vc.index_select(0, pages).reshape(-1, self.hkv, self.d)[:n].cpu()
        return k, v

    def _check_outputs(self, layer, live, q, out):
        sample = self.rng.sample(range(len(live)), min(3, len(live)))
        for j in sample:
            sid = live[j]
            k, v = self.gathered(layer, sid)
            first, n = self.cache.dropped(sid), self.cache.seq_len(sid)
            # The pages hold exactly what was appended (the window may have released a prefix).
            assert torch.equal(k, self.history[sid][layer, 0, first:n]), f"keys of sequence {sid} corrupted"
            assert torch.equal(v, self.history[sid][layer, 1, first:n]), f"values of sequence {sid} corrupted"
            lens = torch.tensor([k.shape[0]], dtype=torch.int32)
            ref, _ = reference.decode_attention(q[j:j + 1].float(), k[None], v[None], lens,
                                                window_left=self.window_left)
            ref_lp, _ = reference.decode_attention(q[j:j + 1], k[None], v[None], lens,
                                                   window_left=self.window_left, upcast=False)
            assert_parity(out[j:j + 1], ref, ref_lp, what=f"step {self.step_count} layer {layer} sequence {sid}")
            self.stats["checked"] += 1


def live_objects():
    """(tensors, Python objects) the garbage collector can see, after a full collection."""
    gc.collect()
    objects = gc.get_objects()
    return sum(1 for o in objects if issubclass(type(o), torch.Tensor)), len(objects)


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Thousands of tiny CPU ops: a second intra-op thread only adds hand-off latency (tens of times
    slower on a busy 2-core machine, where pytest-xdist already runs one worker per core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The cache memoises up to 64 batch handles (each may hold a device index tensor): bounded, so it
# may differ between two drained points by at most that many tensors (and twice as many objects).
# Half a run is 150 steps or more, so a leak of one object per step shows.
BATCH_MEMO = 64


def run_soak(soak: Soak, steps: int):
    """Half the steps, drain, the other half, drain: live tensors and objects must not grow."""
    half = steps // 2
    for _ in range(half):
        soak.step()
    soak.drain()
    tensors_mid, objects_mid = live_objects()
    alloc_mid = torch.cuda.memory_allocated() if soak.device != "cpu" else 0
    for _ in range(steps - half):
        soak.step()
    soak.drain()
    tensors_end, objects_end = live_objects()
    assert tensors_end - tensors_mid <= BATCH_MEMO, f"live tensors grew from {tensors_mid} to {tensors_end}"
    assert objects_end - objects_mid <= 2 * BATCH_MEMO, f"Python objects grew from {objects_mid} to {objects_end}"
    if soak.device != "cpu":
        torch.cuda.synchronize()
        # (each memoised batch handle's device index is one 512-byte allocator block)
        assert torch.cuda.memory_allocated() <= alloc_mid + BATCH_MEMO * 512, "device memory grew over the run"
    s = soak.stats
    # The run exercised what it claims to: arrivals, finishes, a dry pool, many checked outputs.
    assert s["arrived"] > steps // 10 and s["finished"] > steps // 20, s
    assert s["preempted"] + s["refused"] > 0, f"the pool never ran dry: {s}"
    assert s["checked"] >= steps // soak.check_every, s
    return s


@pytest.mark.parametrize("window_left", [-1, 9], ids=["full", "window9"])
def test_soak_reference(window_left):
    run_soak(Soak(seed=1 + window_left, window_left=window_left), steps=300)


@pytest.mark.slow
@pytest.mark.parametrize("window_left", [-1, 9], ids=["full", "window9"])
def test_soak_reference_long(window_left):
    run_soak(Soak(seed=100 + window_left, window_left=window_left, num_pages=48, max_seqs=24,
                  page_size=8, max_new=80, check_every=11), steps=3000)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
@pytest.mark.parametrize("dtype,d,page_size,window_left", [(torch.float16, 128, 16, -1), (torch.bfloat16, 64, 5, 40)],
                         ids=["fp16-d128-page16", "bf16-d64-page5-window40"])
def test_soak_gpu(backend, dtype, d, page_size, window_left):
    # Head dims the CUDA kernels take, so auto selection runs them; the oracle runs on the CPU.
    run_soak(Soak(seed=7, device="cuda", backend=backend, dtype=dtype, d=d, hq=8, hkv=2, page_size=page_size,
                  num_pages=160, max_seqs=32, max_prompt=100, max_new=200, window_left=window_left,
                  check_every=5), steps=600)


# ------------------------------------------------------------------------------------ threads


def test_concurrent_allocation_never_double_allocates():
    """Threads released together by a barrier allocate, grow and free; between phases (the barrier's
    action, run while every thread waits) the pool is audited exactly."""
    threads, rounds, num_pages, page_size = 6, 25, 48, 4
    cache = PagedKVCache(1, num_pages, page_size, 2, 8, max_seqs=threads * 2, dtype=torch.float32)
    owned: list[list[tuple[int, int]]] = [[] for _ in range(threads)]  # per thread: (sequence, tokens)
    failures: list[BaseException] = []
    full_errors = [0]
    lock = threading.Lock()

    def audit():
        seqs = [s for per in owned for s in per]
        ids = [sid for sid, _ in seqs]
        assert len(ids) == len(set(ids)), "one sequence id given to two callers"
        assert sorted(ids) == cache.live_ids
        pages = [p for sid in ids for p in cache.pages(sid)]
        assert len(pages) == len(set(pages)), "a page was given to two sequences"
        assert cache.num_free_pages + len(pages) == num_pages, "free + held != total"
        for sid, tokens in seqs:
            assert cache.seq_len(sid) == tokens
            assert len(cache.pages(sid)) == -(-tokens // page_size)
        cache.check_invariants()

    def checked_audit():
        try:
            audit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            failures.append(e)
            raise  # breaks the barrier: every waiting thread gets BrokenBarrierError

    barrier = threading.Barrier(threads, action=checked_audit, timeout=120)  # a hang fails, never blocks

    def full():
        with lock:
            full_errors[0] += 1

    def worker(t):
        rng = random.Random(t)
        mine = owned[t]
        try:
            for _ in range(rounds):
                barrier.wait()                      # phase 1: everyone allocates at once
                for _ in range(2):
                    tokens = rng.randint(0, 14)
                    try:
                        mine.append((cache.allocate(tokens), tokens))
                    except CacheFullError:
                        full()
                barrier.wait()                      # phase 2: grow and free while others allocate
                for j, (sid, tokens) in enumerate(list(mine)):
                    n = rng.randint(1, 6)
                    try:
                        cache.extend([sid], n)
                        mine[j] = (sid, tokens + n)
                    except CacheFullError:
                        full()
                if mine and rng.random() < 0.5:
                    cache.free(mine.pop(0)[0])
                tokens = rng.randint(1, 9)
                try:
                    mine.append((cache.allocate(tokens), tokens))
                except CacheFullError:
                    full()
                barrier.wait()                      # phase 3: everyone frees at once
                cache.free([sid for sid, _ in mine])
                mine.clear()
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            if not any(e is f for f in failures):
                failures.append(e)
            barrier.abort()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible: more interleavings
    try:
        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join(timeout=300)
        assert not any(th.is_alive() for th in pool), "a thread is stuck"
    finally:
        sys.setswitchinterval(switch)
    if failures:
        raise failures[0]
    assert cache.num_free_pages == num_pages and cache.live_ids == []
    cache.check_invariants()
    # Demand (up to 12 sequences of up to 20 tokens, 5 pages each) exceeds the 48 pages: the
    # all-or-nothing refusal path ran under contention too.
    assert full_errors[0] > 0
