"""kvkernels.cache: the contiguous and paged KV cache managers.

Properties: a multi-step run (prompt chunk, decode steps, another chunk) attends exactly what the
oracle attends over each sequence's full history; fp8 storage holds saturate(x / scale) and attends
the dequantized history; a sliding window releases pages and stays correct after the rebase; the
allocator never gives one page to two live sequences, returns every page on free, keeps the device
tables in step with the host, is all-or-nothing when the pool runs out, and stays consistent under
threads.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from conftest import assert_parity, randn, reference, seeded
from kvkernels.cache import CacheFullError, ContiguousKVCache, PagedKVCache

LAYERS, HKV, HQ, D = 2, 2, 4, 16


def make_cache(kind, *, dtype=torch.float32, window_left=-1, num_pages=64, page_size=4, max_seqs=6, backend=None,
               **kw):
    if kind == "paged":
        return PagedKVCache(LAYERS, num_pages, page_size, HKV, D, max_seqs=max_seqs, dtype=dtype,
                            window_left=window_left, backend=backend, **kw)
    return ContiguousKVCache(LAYERS, max_seqs, 64, HKV, D, dtype=dtype, window_left=window_left, backend=backend, **kw)


def oracle(q, k_hist, v_hist, window_left=-1, upcast=True):
    """q [n, Hq, D] = the last n positions of a sequence whose keys/values are k_hist/v_hist [L, Hkv, D]."""
    out, _ = reference.prefill_attention(q[None], k_hist[None], v_hist[None], causal=True,
                                         window_size=(window_left, -1), upcast=upcast)
    return out[0]


class History:
    """The dense keys/values every (layer, sequence) should hold."""

    def __init__(self):
        self.k, self.v = {}, {}

    def add(self, layer, ids, k, v):
        for j, i in enumerate(ids):
            key = (layer, i)
            self.k[key] = torch.cat([self.k.get(key, k[j, :0]), k[j]])
            self.v[key] = torch.cat([self.v.get(key, v[j, :0]), v[j]])


def run_steps(cache, ids, steps, gen, dtype, check):
    """Drive extend/append/attend for each step (n new tokens per sequence) and check every output."""
    hist = History()
    for n in steps:
        cache.extend(ids, n)
        for layer in range(LAYERS):
            k = randn(len(ids), n, HKV, D, dtype=dtype, gen=gen)
            v = randn(len(ids), n, HKV, D, dtype=dtype, gen=gen)
            q = randn(len(ids), n, HQ, D, dtype=dtype, gen=gen)
            cache.append(layer, ids, k, v)
            hist.add(layer, ids, k, v)
            out = cache.attend(layer, ids, q) if n > 1 else cache.attend(layer, ids, q[:, 0]).unsqueeze(1)
            for j, i in enumerate(ids):
                check(out[j], q[j], hist.k[(layer, i)], hist.v[(layer, i)])
    return hist


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
@pytest.mark.parametrize("ids", [[0, 1, 2], [4, 1, 3]], ids=["rows-0..B", "shuffled-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_steps_match_oracle(kind, ids, dtype):
    gen = seeded(1)
    cache = make_cache(kind, dtype=dtype)
    for i in sorted(ids):
        cache.allocate(seq_id=i)

    def check(out, q, kh, vh):
        ref = oracle(q, kh, vh)
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        else:
            assert_parity(out, ref, oracle(q, kh, vh, upcast=False))

    # prompt chunk (page boundary + 1), decode steps crossing pages, a second chunk (chunked prefill)
    run_steps(cache, ids, [5, 1, 1, 1, 3, 1], gen, dtype, check)
    for i in ids:
        assert cache.seq_len(i) == 12
    if kind == "paged":
        cache.check_invariants()


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_attend_returns_lse(kind):
    gen = seeded(2)
    cache = make_cache(kind)
    ids = [cache.allocate(), cache.allocate()]
    cache.extend(ids, 7)
    k, v = randn(2, 7, HKV, D, gen=gen, dtype=torch.float32), randn(2, 7, HKV, D, gen=gen, dtype=torch.float32)
    cache.append(0, ids, k, v)
    q = randn(2, HQ, D, gen=gen, dtype=torch.float32)
    out, lse = cache.attend(0, ids, q, return_lse=True)
    ref_out, ref_lse = reference.decode_attention(q, k, v, torch.tensor([7, 7], dtype=torch.int32))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    q4 = randn(2, 3, HQ, D, gen=gen, dtype=torch.float32)
    out4, lse4 = cache.attend(0, ids, q4, return_lse=True)
    for j in range(2):
        r, rl = reference.prefill_attention(q4[j:j + 1], k[j:j + 1], v[j:j + 1], causal=True)
        torch.testing.assert_close(out4[j], r[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse4[j], rl[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_fp8_storage_holds_quantized_values_and_attends_them(kind, fp8):
    gen = seeded(3)
    k_scale = torch.tensor([[0.02, 0.05], [0.03, 0.01]])          # [layers, Hkv]
    v_scale = torch.tensor([0.04, 0.02])                            # [layers]
    cache = make_cache(kind, dtype=fp8, k_scale=k_scale, v_scale=v_scale)
    ids = [cache.allocate(), cache.allocate()]
    hist = History()
    for n in (6, 1, 1):
        cache.extend(ids, n)
        for layer in range(LAYERS):
            k = randn(2, n, HKV, D, gen=gen, dtype=torch.float16, scale=3.0)
            v = randn(2, n, HKV, D, gen=gen, dtype=torch.float16, scale=3.0)
            cache.append(layer, ids, k, v)
            ks, vs = k_scale[layer], v_scale[layer].expand(HKV)
            # what the cache must hold, and what attention must read back
            kq = reference.dequantize(reference.quantize(k, ks, fp8), ks, torch.float32)
            vq = reference.dequantize(reference.quantize(v, vs, fp8), vs, torch.float32)
            hist.add(layer, ids, kq, vq)
            q = randn(2, HQ, D, gen=gen, dtype=torch.float16)
            out = cache.attend(layer, ids, q)
            for j, i in enumerate(ids):
                ref = oracle(q[j:j + 1].float(), hist.k[(layer, i)], hist.v[(layer, i)])[0]
                torch.testing.assert_close(out[j].float(), ref, atol=2e-3, rtol=2e-3)
    # stored bytes: bit-exact saturate(x / scale) of the last token of sequence 0, layer 1
    kc, _ = cache.layer_cache(1)
    pos = cache.cached_len(ids[0]) - 1
    if kind == "paged":
        page = cache.pages(ids[0])[pos // cache.page_size]
        stored = kc[page, pos % cache.page_size]
    else:
        stored = kc[ids[0], pos]
    expect = reference.quantize(k[0, -1:], k_scale[1], fp8)[0]
    assert torch.equal(stored.view(torch.uint8), expect.view(torch.uint8))


@pytest.mark.parametrize("window_left,page_size", [(5, 4), (8, 4), (3, 2)])
def test_sliding_window_releases_pages_and_stays_correct(window_left, page_size):
    gen = seeded(4)
    cache = make_cache("paged", window_left=window_left, page_size=page_size, num_pages=24)
    ids = [cache.allocate(), cache.allocate()]

    def check(out, q, kh, vh):
        torch.testing.assert_close(out, oracle(q, kh, vh, window_left), atol=1e-5, rtol=1e-5)

    steps = [7] + [1] * 30 + [3] + [1] * 5
    run_steps(cache, ids, steps, gen, torch.float32, check)
    total = sum(steps)
    bound = -(-(window_left + 1 + 3) // page_size) + 1
    for i in ids:
        assert cache.seq_len(i) == total
        assert cache.dropped(i) > 0 and cache.dropped(i) % page_size == 0
        assert cache.cached_len(i) + cache.dropped(i) == total
        assert len(cache.pages(i)) <= bound
    cache.check_invariants()
    assert cache.num_free_pages == 24 - sum(len(cache.pages(i)) for i in ids)


def test_window_lets_a_long_sequence_run_in_a_small_pool():
    cache = make_cache("paged", window_left=7, page_size=4, num_pages=4, max_pages_per_seq=4)
    i = cache.allocate()
    for _ in range(200):
        cache.extend([i], 1)
    assert cache.seq_len(i) == 200 and cache.cached_len(i) <= 16
    cache.check_invariants()
    without = make_cache("paged", page_size=4, num_pages=4)
    j = without.allocate(16)
    with pytest.raises(CacheFullError):
        without.extend([j], 1)


def test_random_allocation_never_shares_a_page():
    rng = random.Random(5)
    cache = make_cache("paged", num_pages=40, page_size=4, max_seqs=8)
    for _ in range(300):
        live = cache.live_ids
        op = rng.random()
        try:
            if op < 0.3 or not live:
                cache.allocate(rng.randrange(0, 12))
            elif op < 0.8:
                cache.extend(rng.sample(live, rng.randint(1, len(live))), rng.randrange(0, 9))
            else:
                cache.free(rng.choice(live))
        except CacheFullError:
            pass
        cache.check_invariants()
    cache.free(cache.live_ids)
    assert cache.num_free_pages == 40
    cache.check_invariants()


def _snapshot(cache):
    return ({i: cache.pages(i) for i in cache.live_ids}, cache.num_free_pages, cache.block_tables.clone(),
            cache.cache_seqlens.clone(), {i: cache.seq_len(i) for i in cache.live_ids})


def _same(a, b):
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) and a[4] == b[4]


def test_exhausted_pool_raises_and_changes_nothing():
    cache = make_cache("paged", num_pages=6, page_size=4, max_seqs=4)
    a = cache.allocate(9)   # 3 pages
    b = cache.allocate(5)   # 2 pages
    before = _snapshot(cache)
    with pytest.raises(CacheFullError, match="exhausted"):
        cache.extend([a, b], 4)  # a needs 1 more page, b 1 more: 2 > 1 free
    assert _same(before, _snapshot(cache))
    with pytest.raises(CacheFullError, match="exhausted"):
        cache.allocate(5)        # 2 pages, 1 free: the slot is not taken either
    assert _same(before, _snapshot(cache))
    assert len(cache.live_ids) == 2
    cache.extend([b], 4)         # 9 tokens: takes the last free page
    assert cache.num_free_pages == 0
    cache.check_invariants()


def test_sequence_limits_raise_cleanly():
    cache = make_cache("paged", num_pages=32, page_size=4, max_seqs=2, max_pages_per_seq=3)
    a = cache.allocate(12)
    with pytest.raises(CacheFullError, match="max_pages_per_seq"):
        cache.extend([a], 1)
    cache.allocate()
    with pytest.raises(CacheFullError, match="sequence slots"):
        cache.allocate()
    contiguous = make_cache("contiguous", max_seqs=1)
    c = contiguous.allocate(60)
    with pytest.raises(CacheFullError, match="max_seq_len"):
        contiguous.extend([c], 5)
    assert contiguous.seq_len(c) == 60


def test_free_returns_every_page():
    cache = make_cache("paged", num_pages=30, page_size=4, max_seqs=6)
    ids = [cache.allocate(n) for n in (1, 4, 5, 17, 30)]
    assert cache.num_free_pages == 30 - (1 + 1 + 2 + 5 + 8)
    cache.free(ids[1:3])
    cache.check_invariants()
    cache.free([ids[0], ids[3], ids[4]])
    assert cache.num_free_pages == 30 and cache.live_ids == []
    assert int(cache.cache_seqlens.abs().sum()) == 0
    with pytest.raises(ValueError, match=f"sequence {ids[0]} is not allocated"):
        cache.free(ids[0])


def test_concurrent_allocation_is_consistent():
    cache = make_cache("paged", num_pages=64, page_size=2, max_seqs=16)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(60):
                try:
                    i = cache.allocate(rng.randrange(1, 6))
                except CacheFullError:
                    continue
                for _ in range(rng.randrange(0, 4)):
                    try:
                        cache.extend([i], rng.randrange(1, 4))
                    except CacheFullError:
                        break
                cache.check_invariants()  # atomic: no page in two live sequences, tables in sync
                cache.free(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cache.num_free_pages == 64 and cache.live_ids == []
    cache.check_invariants()


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_misuse_is_reported(kind):
    cache = make_cache(kind)
    i = cache.allocate(2)
    k = torch.randn(1, 3, HKV, D)
    with pytest.raises(ValueError, match="extend"):
        cache.append(0, [i], k, k)          # 3 new tokens, only 2 positions reserved
    with pytest.raises(ValueError, match="sequence 5 is not allocated"):
        cache.extend([5], 1)                # never allocated
    with pytest.raises(ValueError, match="twice"):
        cache.extend([i, i], 1)
    with pytest.raises(ValueError, match="already allocated"):
        cache.allocate(seq_id=i)
    with pytest.raises(ValueError, match="k_scale"):
        make_cache(kind, k_scale=0.5)       # scales only for fp8 storage
    with pytest.raises(ValueError, match="k_scale"):
        make_cache(kind, dtype=torch.float8_e4m3fn, k_scale=torch.ones(3))


def test_memory_bytes_is_the_storage():
    cache = make_cache("paged", dtype=torch.float16, num_pages=10, page_size=8)
    assert cache.memory_bytes() == 2 * LAYERS * 10 * 8 * HKV * D * 2


def test_triton_backend_through_the_cache():
    pytest.importorskip("kvkernels.triton.decode")
    pytest.importorskip("kvkernels.triton.append")
    gen = seeded(6)
    cache = make_cache("paged", dtype=torch.float16, backend="triton", page_size=16, num_pages=8)
    ids = [cache.allocate(), cache.allocate()]

    def check(out, q, kh, vh):
        assert_parity(out, oracle(q, kh, vh), oracle(q, kh, vh, upcast=False))

    run_steps(cache, ids, [17, 1], gen, torch.float16, check)


# ------------------------------------------------------------------------ errors users act on


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
@pytest.mark.parametrize("freed", [False, True], ids=["never-allocated", "freed"])
def test_every_step_names_a_sequence_that_is_not_allocated(kind, freed):
    """attend used to return zeros and lse -inf for such an id, append to ask for extend, and
    extend/free to raise KeyError with quoted text: now one ValueError naming the id and the fix."""
    cache = make_cache(kind)
    live = cache.allocate(3)
    gone = cache.allocate(3) if freed else 4
    if freed:
        cache.free(gone)
    k = torch.randn(2, 1, HKV, D)
    q = torch.randn(2, HKV * 2, D)
    calls = {
        "attend": lambda: cache.attend(0, [live, gone], q),
        "attend-many": lambda: cache.attend(0, [live, gone], q[:, None]),
        "append": lambda: cache.append(0, [live, gone], k, k),
        "extend": lambda: cache.extend([live, gone], 1),
        "free": lambda: cache.free([live, gone]),
        "seq_len": lambda: cache.seq_len(gone),
    }
    before = (cache.k_cache.clone(), cache.cache_seqlens.clone())
    for name, call in calls.items():
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert f"sequence {gone} is not allocated" in msg and "allocate()" in msg, (name, msg)
        assert not msg.startswith(("'", '"')), (name, msg)   # not a KeyError's quoted text
    assert torch.equal(cache.k_cache, before[0]) and torch.equal(cache.cache_seqlens, before[1])
    assert cache.live_ids == [live] and cache.seq_len(live) == 3


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fnuz, torch.int8, torch.bool])
def test_storage_dtype_is_checked_at_construction(kind, dtype):
    with pytest.raises(TypeError, match="dtype must be one of") as e:
        make_cache(kind, dtype=dtype)
    if dtype == torch.float8_e4m3fnuz:
        assert "float8_e4m3fn or float8_e5m2" in str(e.value)


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_argument_types_and_values_raise_type_and_value_errors(kind):
    with pytest.raises(TypeError, match="max_seqs must be an int"):
        make_cache(kind, max_seqs=2.0)
    with pytest.raises(ValueError, match="max_seqs must be >= 1"):
        make_cache(kind, max_seqs=0)
    with pytest.raises(TypeError, match="window_left"):
        make_cache(kind, window_left=True)
    with pytest.raises(ValueError, match="backend"):
        make_cache(kind, backend="flash")
    with pytest.raises(TypeError, match="k_scale must be a number"):
        make_cache(kind, dtype=torch.float8_e4m3fn, k_scale="1")
    cache = make_cache(kind)
    with pytest.raises(TypeError, match="num_tokens must be an int"):
        cache.allocate(2.5)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        cache.allocate(-1)
    with pytest.raises(ValueError, match=r"layer 7 is out of range \[0, 2\)"):
        cache.layer_cache(7)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        cache.append(0, None, [[1.0]], [[1.0]])


def test_paged_block_table_is_sized_from_max_seq_len():
    cache = PagedKVCache(LAYERS, 1000, 16, HKV, D, max_seqs=4, max_seq_len=100)
    assert cache.max_pages_per_seq == 7 and tuple(cache.block_tables.shape) == (4, 7)
    assert cache.max_seq_len == 112
    with pytest.raises(CacheFullError, match="max_pages_per_seq=7"):
        cache.allocate(113)
    with pytest.raises(ValueError, match="not both"):
        PagedKVCache(LAYERS, 1000, 16, HKV, D, max_seq_len=100, max_pages_per_seq=7)


def test_paged_default_block_table_warns_when_it_is_large():
    with pytest.warns(UserWarning, match="max_seq_len"):
        PagedKVCache(1, 70_000, 1, 1, 8, max_seqs=256)   # 256 x 70k int32 = 68 MiB of block table
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PagedKVCache(1, 70_000, 1, 1, 8, max_seqs=256, max_seq_len=4096)


def test_pool_exhausted_message_counts_pages_in_words():
    cache = make_cache("paged", num_pages=2, page_size=4)
    cache.allocate(8)
    with pytest.raises(CacheFullError, match="1 page needed, 0 free"):
        cache.allocate(1)
