"""KV cache managers holding every layer of a model: a contiguous cache and a paged block allocator.

Both keep the state the kernels read on the device (cache_seqlens int32 [max_seqs]; the paged cache
also a block table int32 [max_seqs, max_pages_per_seq]) and the bookkeeping that decides allocation
on the host (lengths, page lists, the free list), so a decode step never waits for the GPU.

One step of a model, for a batch of sequences `ids` (ints from `allocate`, or None for the rows
0..B-1, or a `SeqBatch` from `cache.batch(ids)`, which keeps its index tensor on the device):

    cache.extend(ids, n)                              # every sequence grows by n tokens (pages reserved)
    for layer in range(num_layers):
        ...
        cache.append(layer, ids, k, v)                # k/v [B, n, Hkv, D] fill the last n positions
        out = cache.attend(layer, ids, q)             # q [B, Hq, D] (decode) or [B, n, Hq, D]
        ...

`extend` grows the lengths once for all layers; `append` writes the last n positions of each
sequence in one layer (kvkernels.append_kv at cache_seqlens - n); `attend` reads positions
[0, cache_seqlens) (kvkernels.decode_attention; for n > 1 queries, a causal
kvkernels.cache_attention on the cache in place, so chunked prefill and multi-token verification
see exactly their own prefix, without a copy).

Storage is one tensor per K and V with a layer dimension:
    ContiguousKVCache  k_cache/v_cache [num_layers, max_seqs, max_seq_len, Hkv, D]
    PagedKVCache       k_cache/v_cache [num_layers, num_pages, page_size, Hkv, D]
A page index means the same page in every layer (one allocation serves the whole model), and
`layer_cache(l)` is the contiguous [.., Hkv, D] view the ops take.

fp8 storage (dtype=torch.float8_e4m3fn or torch.float8_e5m2): the cache holds saturate(value / scale)
and attention reads stored * scale. Scales are fixed when the cache is built (k_scale / v_scale: a
number, or an fp32 tensor of shape [], [Hkv], [num_layers] or [num_layers, Hkv]; a 1-D tensor whose
length is both is read per layer); choose them from calibration data (amax / 448 keeps every value in
e4m3's range, amax / 57344 in e5m2's, which trades 1 mantissa bit for 8 binades more range).

Sliding window (window_left=W >= 0: a query sees itself and the W positions before it): attention
always applies the window. The paged cache also gives back pages that no future query can see: at
`extend`, every whole page of a sequence below position len - W (len = its length before the step)
goes back to the free list, and the sequence is *rebased*: its block table row shifts left by the
released pages, and its cached positions with it. After releasing r pages, absolute position p
lives at cache position p - r * page_size, cache_seqlens holds len - r * page_size, `seq_len(id)`
the absolute length and `dropped(id)` the r * page_size tokens released. Attention is unchanged by
the rebase because the window counts back from the end; positional encodings (RoPE) are applied
to keys before they are stored, so they keep their absolute positions. A sequence then needs at
most ceil((W + 1 + n) / page_size) + 1 pages, however long it runs.

Allocation (`allocate`, `extend`, `free`) holds a lock, so threads may share a cache; each call is
all-or-nothing: when the pool has too few pages, no sequence slot is free, or a sequence would pass
its maximum length, it raises CacheFullError and changes nothing. `append` and `attend` take no
lock: one thread drives the steps of a batch.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from . import api
from . import validation as V
from .cliargs import plural

FP8_DTYPES = V.FP8_DTYPES  # float8_e4m3fn, float8_e5m2
STORAGE_DTYPES = V.FLOAT_DTYPES + FP8_DTYPES


def _int(name: str, value, minimum: int) -> None:
    """TypeError for a non-int (bool and float included), ValueError for an int below minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _storage_dtype(dtype) -> None:
    if dtype in STORAGE_DTYPES:
        return
    names = ", ".join(str(d).replace("torch.", "") for d in STORAGE_DTYPES)
    hint = (f": fp8 storage is {V.FP8_NAMES} (value = stored * scale)"
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize == 1 else "")
    raise TypeError(f"dtype must be one of {names}, got {str(dtype).replace('torch.', '')}{hint}")


class CacheFullError(RuntimeError):
    """The cache cannot hold the request: too few free pages, no free sequence slot, or a sequence
    longer than its maximum. The cache is left exactly as it was."""


@dataclass(frozen=True)
class SeqBatch:
    """A batch of sequence ids with its row index tensor already on the device.

    ids:  the sequence ids, in batch order
    rows: int64 [B] on the cache's device (None when ids are exactly 0..B-1: plain slices are used)
    """

    ids: tuple
    rows: Optional[torch.Tensor]

    def __len__(self):
        return len(self.ids)


SeqIds = Union[None, Sequence[int], SeqBatch, torch.Tensor]


def _normalise_scales(name, scale, dtype, num_layers, hkv, device) -> Optional[torch.Tensor]:
    """-> fp32 [num_layers, Hkv] on the device for fp8 storage, None otherwise."""
    if dtype not in FP8_DTYPES:
        if scale is not None:
            raise ValueError(f"{name} is only used with fp8 ({V.FP8_NAMES}) storage; this cache stores {dtype}")
        return None
    if scale is None:
        scale = 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a number or an fp32 tensor, got {type(scale).__name__}")
    s = torch.as_tensor(scale, dtype=torch.float32).to(device)
    if s.dim() == 0:
        s = s.expand(num_layers, hkv)
    elif s.dim() == 1 and s.shape[0] == hkv and (hkv != num_layers or num_layers == 1):
        s = s.unsqueeze(0).expand(num_layers, hkv)
    elif s.dim() == 1 and s.shape[0] == num_layers:
        s = s.unsqueeze(1).expand(num_layers, hkv)
    elif s.dim() == 2 and tuple(s.shape) == (num_layers, hkv):
        pass
    else:
        raise ValueError(f"{name} must be a number or have shape [], [{hkv}] (per KV head), [{num_layers}] "
                         f"(per layer) or [{num_layers}, {hkv}], got {list(s.shape)}")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{name} must be finite and > 0")
    return s.contiguous()


class KVCache:
    """What the contiguous and paged caches share: sequence slots, lengths, the step helpers
    (allocate / extend / free, append / attend). Not built directly."""

    def __init__(self, num_layers: int, max_seqs: int, num_kv_heads: int, head_dim: int, *, dtype, device,
                 k_scale, v_scale, window_left: int, backend: Optional[str]):
        for name, value in (("num_layers", num_layers), ("max_seqs", max_seqs), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            _int(name, value, 1)
        _int("window_left", window_left, -1)
        _storage_dtype(dtype)
        if backend is not None and backend not in ("cuda", "triton", "reference"):
            raise ValueError(f"backend must be 'cuda', 'triton', 'reference' or None (automatic), got {backend!r}")
        self.num_layers = num_layers
        self.max_seqs = max_seqs
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.window_left = window_left
        self.backend = backend
        self.k_scale = _normalise_scales("k_scale", k_scale, dtype, num_layers, num_kv_heads, self.device)
        self.v_scale = _normalise_scales("v_scale", v_scale, dtype, num_layers, num_kv_heads, self.device)
        # Device mirror of the host lengths; the kernels read it.
        self.cache_seqlens = torch.zeros(max_seqs, dtype=torch.int32, device=self.device)
        self._lock = threading.Lock()
        self._live: set[int] = set()
        self._lengths = [0] * max_seqs   # cached length (after rebasing) per sequence slot
        self._dropped = [0] * max_seqs   # tokens released from the front (sliding window)
        self._batches: dict[tuple, SeqBatch] = {}
        self._batches_lock = threading.Lock()

    # ------------------------------------------------------------------------------ bookkeeping

    @property
    def live_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._live)

    def seq_len(self, seq_id: int) -> int:
        """Absolute length of a sequence (tokens appended over its life, released ones included)."""
        self._check_live(seq_id)
        return self._lengths[seq_id] + self._dropped[seq_id]

    def cached_len(self, seq_id: int) -> int:
        """Positions held in the cache (cache_seqlens[seq_id])."""
        self._check_live(seq_id)
        return self._lengths[seq_id]

    def dropped(self, seq_id: int) -> int:
        """Tokens released from the front of a sequence (a multiple of page_size; 0 without a window)."""
        self._check_live(seq_id)
        return self._dropped[seq_id]

    def _check_live(self, seq_id) -> None:
        if seq_id not in self._live:
            raise ValueError(f"sequence {seq_id!r} is not allocated in this cache (never allocated, or freed): "
                             "open it with allocate() first")

    def _check_batch_live(self, b: SeqBatch) -> None:
        if not self._live.issuperset(b.ids):
            self._check_live(next(i for i in b.ids if i not in self._live))

    def _advance_lengths(self, ids, n: int, b: Optional[SeqBatch] = None) -> None:
        """cache_seqlens[ids] += n on the device (no host sync)."""
        if b is None:
            b = self.batch(ids)
        if b.rows is None:
            self.cache_seqlens[: len(b.ids)] += n
        else:
            self.cache_seqlens.index_add_(0, b.rows, torch.full((len(b.ids),), n, dtype=torch.int32,
                                                                device=self.device))

    def batch(self, seq_ids: Union[Iterable[int], SeqBatch]) -> SeqBatch:
        """A reusable batch handle: its row indices are uploaded once, then every step is host-sync free."""
        if isinstance(seq_ids, SeqBatch):
            return seq_ids
        ids = tuple(int(i) for i in seq_ids)
        cached = self._batches.get(ids)
        if cached is not None:
            return cached
        for i in ids:
            if not 0 <= i < self.max_seqs:
                raise ValueError(f"sequence id {i} is out of range [0, {self.max_seqs})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"a batch names a sequence twice: {list(ids)}")
        rows = None if ids == tuple(range(len(ids))) else torch.tensor(ids, dtype=torch.int64, device=self.device)
        b = SeqBatch(ids, rows)
        with self._batches_lock:
            if len(self._batches) >= 64:  # steady-state decode reuses a handful of batches
                self._batches.pop(next(iter(self._batches)))
            self._batches[ids] = b
        return b

    def _resolve(self, seq_ids: SeqIds, batch_size: int) -> SeqBatch:
        if seq_ids is None:
            if batch_size > self.max_seqs:
                raise ValueError(f"batch of {batch_size} sequences exceeds max_seqs={self.max_seqs}")
            return self.batch(range(batch_size))
        if isinstance(seq_ids, SeqBatch):
            return seq_ids
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        return self.batch(seq_ids)

    def _rows_slice(self, b: SeqBatch, x: torch.Tensor) -> torch.Tensor:
        """x[rows] of a per-sequence device tensor (a view when the batch is 0..B-1)."""
        return x[: len(b.ids)] if b.rows is None else x.index_select(0, b.rows)

    def allocate(self, num_tokens: int = 0, seq_id: Optional[int] = None) -> int:
        """Open a sequence (the lowest free slot, or `seq_id`) holding num_tokens positions to fill.
        -> its id. Raises CacheFullError (nothing allocated) when no slot or too few pages are free."""
        _int("num_tokens", num_tokens, 0)
        with self._lock:
            if seq_id is None:
                free_slots = (i for i in range(self.max_seqs) if i not in self._live)
                seq_id = next(free_slots, None)
                if seq_id is None:
                    raise CacheFullError(f"all {self.max_seqs} sequence slots are in use (max_seqs); free one first")
            else:
                _int("seq_id", seq_id, 0)
                if seq_id >= self.max_seqs:
                    raise ValueError(f"seq_id must be in [0, {self.max_seqs}) (max_seqs), got {seq_id}")
                if seq_id in self._live:
                    raise ValueError(f"sequence {seq_id} is already allocated")
            self._live.add(seq_id)
            self._lengths[seq_id] = 0
            self._dropped[seq_id] = 0
            try:
                if num_tokens:
                    self._extend_locked((seq_id,), num_tokens)
            except BaseException:
                self._live.discard(seq_id)
                raise
            return seq_id

    def extend(self, seq_ids: SeqIds, num_tokens: int) -> None:
        """Grow every sequence of the batch by num_tokens positions (reserving pages), for all layers
        at once. All-or-nothing: CacheFullError leaves the cache unchanged."""
        _int("num_tokens", num_tokens, 0)
        if seq_ids is None:
            raise ValueError("extend needs the sequence ids (or a SeqBatch)")
        b = self._resolve(seq_ids, 0)
        with self._lock:
            for i in b.ids:
                self._check_live(i)
            self._extend_locked(b.ids, num_tokens, b)

    def truncate(self, seq_ids: SeqIds, num_tokens: int) -> None:
        """Drop the last num_tokens positions of every sequence of the batch (draft tokens a
        speculative step rejected), for all layers; the paged cache gives back pages no longer needed.
        Only cached positions can be dropped (not those a sliding window already released).
        All-or-nothing: a ValueError leaves the cache unchanged."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        if seq_ids is None:
            raise ValueError("truncate needs the sequence ids (or a SeqBatch)")
        b = self._resolve(seq_ids, 0)
        with self._lock:
            for i in b.ids:
                self._check_live(i)
            short = [i for i in b.ids if self._lengths[i] < num_tokens]
            if short:
                raise ValueError(f"sequences {short[:8]} hold fewer than the {num_tokens} cached positions to drop")
            if not num_tokens:
                return
            for i in b.ids:
                self._lengths[i] -= num_tokens
            self._truncate_locked(b.ids)
            self._advance_lengths(b.ids, -num_tokens, b)

    def _truncate_locked(self, ids) -> None:
        """Give back what the shortened sequences no longer need (nothing in a contiguous cache)."""

    def free(self, seq_ids: Union[int, Iterable[int], SeqBatch]) -> None:
        """Close sequences and give every page they hold back to the pool."""
        if isinstance(seq_ids, SeqBatch):
            seq_ids = seq_ids.ids
        ids = [seq_ids] if isinstance(seq_ids, int) else [int(i) for i in seq_ids]
        with self._lock:
            for i in ids:
                self._check_live(i)
            for i in ids:
                self._release_all_locked(i)
                self._live.discard(i)
                self._lengths[i] = 0
                self._dropped[i] = 0
            if ids:
                rows = torch.tensor(ids, dtype=torch.int64).to(self.device, non_blocking=True)
                self.cache_seqlens.index_fill_(0, rows, 0)

    # ------------------------------------------------------------------------------------ steps

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k, v) storage of one layer, the layout the ops take."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is out of range [0, {self.num_layers}) (num_layers)")
        return self.k_cache[layer], self.v_cache[layer]

    def _layer_scales(self, layer):
        if self.k_scale is None:
            return None, None
        return self.k_scale[layer], self.v_scale[layer]

    def append(self, layer: int, seq_ids: SeqIds, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v [B, n, Hkv, D] as the last n positions of each sequence in one layer
        (kvkernels.append_kv at cache_seqlens - n). Call `extend(ids, n)` first, once per step."""
        V.tensor("k", k, rank=4)
        b = self._resolve(seq_ids, k.shape[0])
        if len(b) != k.shape[0]:
            raise ValueError(f"k has batch {k.shape[0]} but {len(b)} sequence ids were given")
        self._check_batch_live(b)
        n = k.shape[1]
        short = [i for i in b.ids if self._lengths[i] < n] if n else []
        if short:
            raise ValueError(f"sequences {short[:8]} hold fewer than the {n} positions being written: "
                             f"call extend(ids, {n}) before append, once per step for all layers")
        kc, vc = self._views(layer, b)
        seqlens, table = self._batch_state(b)
        start = seqlens - n
        ks, vs = self._layer_scales(layer)
        api.append_kv(k, v, kc, vc, start, block_table=table, k_scale=ks, v_scale=vs, backend=self.backend)

    def attend(self, layer: int, seq_ids: SeqIds, q: torch.Tensor, *, softmax_scale=None, softcap: float = 0.0,
               num_splits: int = 0, return_lse: bool = False):
        """Attention of q over each sequence's cached positions in one layer, with the cache's window.

        q [B, Hq, D]       one query per sequence, the last position (kvkernels.decode_attention)
                           -> out [B, Hq, D] (+ lse [B, Hq])
        q [B, n, Hq, D]    the last n positions, causal: n == 1 is decode; n > 1 (a prompt chunk,
                           draft tokens to verify) runs kvkernels.cache_attention on the cache in
                           place -> out [B, n, Hq, D] (+ lse [B, Hq, n])
        """
        V.tensor("q", q, rank=(3, 4))
        b = self._resolve(seq_ids, q.shape[0])
        if len(b) != q.shape[0]:
            raise ValueError(f"q has batch {q.shape[0]} but {len(b)} sequence ids were given")
        self._check_batch_live(b)
        if q.dim() == 4 and q.shape[1] == 1:
            res = self.attend(layer, b, q[:, 0], softmax_scale=softmax_scale, softcap=softcap,
                              num_splits=num_splits, return_lse=return_lse)
            if return_lse:
                return res[0].unsqueeze(1), res[1].unsqueeze(-1)
            return res.unsqueeze(1)
        if q.dim() == 3:
            kc, vc = self._views(layer, b)
            seqlens, table = self._batch_state(b)
            ks, vs = self._layer_scales(layer)
            return api.decode_attention(q, kc, vc, seqlens, block_table=table, softmax_scale=softmax_scale,
                                        window_left=self.window_left, softcap=softcap, k_scale=ks, v_scale=vs,
                                        num_splits=num_splits, return_lse=return_lse, backend=self.backend)
        return self._attend_many(layer, b, q, softmax_scale, softcap, return_lse)

    def _attend_many(self, layer, b: SeqBatch, q, softmax_scale, softcap, return_lse):
        B, n, hq, d = q.shape
        short = [i for i in b.ids if self._lengths[i] < n]
        if short:
            raise ValueError(f"sequences {short[:8]} hold fewer than the {n} query positions")
        kc, vc = self._views(layer, b)
        seqlens, table = self._batch_state(b)
        ks, vs = self._layer_scales(layer)
        # On the cache in place: query i of a sequence of length L sits at L - n + i.
        return api.cache_attention(q, kc, vc, seqlens, block_table=table, causal=True, softmax_scale=softmax_scale,
                                   window_left=self.window_left, softcap=softcap, k_scale=ks, v_scale=vs,
                                   return_lse=return_lse, backend=self.backend)

    def memory_bytes(self) -> int:
        """Bytes of K/V storage this cache holds (both tensors, every layer)."""
        return self.k_cache.numel() * self.k_cache.element_size() * 2


class ContiguousKVCache(KVCache):
    """Every sequence slot owns max_seq_len positions in each layer.

    k_cache / v_cache [num_layers, max_seqs, max_seq_len, Hkv, D]; cache_seqlens int32 [max_seqs].
    A batch that is exactly the slots 0..B-1 uses the contiguous ops on views; any other batch
    addresses the same storage as a paged cache (pages of gcd(max_seq_len, 256) rows, each slot
    owning consecutive pages), so no data is copied: a max_seq_len that is a multiple of 16 keeps
    those pages kernel-friendly. The window is applied by attention; no memory is released (see
    PagedKVCache for that).
    """

    def __init__(self, num_layers: int, max_seqs: int, max_seq_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype=torch.float16, device=None, k_scale=None, v_scale=None, window_left: int = -1,
                 backend: Optional[str] = None):
        super().__init__(num_layers, max_seqs, num_kv_heads, head_dim, dtype=dtype, device=device, k_scale=k_scale,
                         v_scale=v_scale, window_left=window_left, backend=backend)
        _int("max_seq_len", max_seq_len, 1)
        self.max_seq_len = max_seq_len
        # Page size of the paged view used for batches other than 0..B-1: the largest power of two
        # dividing max_seq_len, at most 256 (what the paged kernels take).
        self._view_page = math.gcd(max_seq_len, 256)
        shape = (num_layers, max_seqs, max_seq_len, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    def _extend_locked(self, ids, n, b: Optional[SeqBatch] = None) -> None:
        over = [(i, self._lengths[i] + n) for i in ids if self._lengths[i] + n > self.max_seq_len]
        if over:
            i, want = over[0]
            raise CacheFullError(f"sequence {i} would hold {want} tokens; this cache holds at most "
                                 f"max_seq_len={self.max_seq_len} per sequence")
        for i in ids:
            self._lengths[i] += n
        if n:
            self._advance_lengths(ids, n, b)

    def _release_all_locked(self, seq_id) -> None:
        pass

    def _views(self, layer: int, b: SeqBatch):
        kc, vc = self.layer_cache(layer)
        if b.rows is None:
            return kc[: len(b.ids)], vc[: len(b.ids)]
        shape = (-1, self._view_page, self.num_kv_heads, self.head_dim)
        return kc.reshape(shape), vc.reshape(shape)

    def _batch_state(self, b: SeqBatch):
        """-> (cache_seqlens [B], block_table or None) for the ops."""
        seqlens = self._rows_slice(b, self.cache_seqlens)
        if b.rows is None:
            return seqlens, None
        # Any other batch: the same storage read as pages of _view_page rows, sequence r owning pages
        # [r * per_seq, (r + 1) * per_seq). No data moves; the table is device arithmetic.
        per_seq = self.max_seq_len // self._view_page
        cols = torch.arange(per_seq, device=self.device, dtype=torch.int64)
        return seqlens, (b.rows.unsqueeze(1) * per_seq + cols).to(torch.int32)

class PagedKVCache(KVCache):
    """A pool of fixed-size pages shared by all sequences, vLLM-style.

    k_cache / v_cache [num_layers, num_pages, page_size, Hkv, D]
    block_tables      int32 [max_seqs, max_pages_per_seq] (device): position p of sequence s is row
                      p % page_size of page block_tables[s, p // page_size]; entries past a
                      sequence's pages are 0 and never read
    cache_seqlens     int32 [max_seqs] (device)

    The free list lives on the host. A page belongs to at most one live sequence; `free` returns
    all of a sequence's pages.

    max_seq_len (tokens) or max_pages_per_seq bounds one sequence and sizes the block table
    (4 * max_seqs * max_pages_per_seq bytes on the device): pass the model's maximum context. Without
    either, one sequence may take the whole pool, and the table is as wide as the pool (a 200k-page
    pool with 256 sequence slots: 205 MB), which warns when it passes 64 MiB. The device block table is written only when a sequence gains or
    releases a page (once every page_size decode steps), as one host-to-device copy; lengths grow by
    a device-side add, so steady-state decode never synchronises.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 max_seqs: int = 256, max_pages_per_seq: Optional[int] = None, dtype=torch.float16, device=None,
                 k_scale=None, v_scale=None, window_left: int = -1, backend: Optional[str] = None,
                 max_seq_len: Optional[int] = None):
        super().__init__(num_layers, max_seqs, num_kv_heads, head_dim, dtype=dtype, device=device, k_scale=k_scale,
                         v_scale=v_scale, window_left=window_left, backend=backend)
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            _int(name, value, 1)
        if max_seq_len is not None:
            _int("max_seq_len", max_seq_len, 1)
            if max_pages_per_seq is not None:
                raise ValueError("pass max_seq_len (tokens) or max_pages_per_seq, not both")
            max_pages_per_seq = -(-max_seq_len // page_size)
        if max_pages_per_seq is None:
            max_pages_per_seq = num_pages
            table = 4 * max_seqs * num_pages
            if table > 64 * 2 ** 20:
                warnings.warn(f"PagedKVCache: the block table takes {table / 2 ** 20:.0f} MiB (max_seqs={max_seqs} x "
                              f"{num_pages} pages, since one sequence may use the whole pool); pass max_seq_len=<the "
                              "model's maximum context> to size it", stacklevel=2)
        _int("max_pages_per_seq", max_pages_per_seq, 1)
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.block_tables = torch.zeros(max_seqs, max_pages_per_seq, dtype=torch.int32, device=self.device)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # a stack: low page ids first
        self._pages: dict[int, list[int]] = {}

    @property
    def max_seq_len(self) -> int:
        """Most positions one sequence can hold at a time (cached, i.e. after window releases)."""
        return self.max_pages_per_seq * self.page_size

    @property
    def num_free_pages(self) -> int:
        with self._lock:
            return len(self._free)

    def pages(self, seq_id: int) -> list[int]:
        """The pages of a sequence, in position order (a copy)."""
        with self._lock:
            self._check_live(seq_id)
            return list(self._pages.get(seq_id, ()))

    def _releasable(self, i: int) -> int:
        """Whole pages of sequence i below position len - W: no query from now on can see them."""
        if self.window_left < 0:
            return 0
        return max(0, self._lengths[i] - self.window_left) // self.page_size

    def _extend_locked(self, ids, n, b: Optional[SeqBatch] = None) -> None:
        ps = self.page_size
        plan = []  # (seq, pages released, pages needed)
        for i in ids:
            held = self._pages.get(i, [])
            r = min(self._releasable(i), len(held))
            new_len = self._lengths[i] - r * ps + n
            need = -(-new_len // ps)
            if need > self.max_pages_per_seq:
                raise CacheFullError(f"sequence {i} would hold {new_len} tokens ({need} pages); this cache holds at "
                                     f"most max_pages_per_seq={self.max_pages_per_seq} pages of {ps} per sequence")
            plan.append((i, r, max(0, need - (len(held) - r))))
        released = sum(r for _, r, _ in plan)
        wanted = sum(w for _, _, w in plan)
        if wanted > len(self._free) + released:
            raise CacheFullError(f"the page pool is exhausted: {plural(wanted, 'page')} needed, {len(self._free)} free "
                                 f"(+{released} released by the window) of {self.num_pages}; free sequences "
                                 f"or build a larger cache")
        # Two passes: every release before any allocation, since the check above counted pages that a
        # sequence later in `ids` releases as available to one earlier in it.
        for i, r, _ in plan:
            if r:
                held = self._pages[i]
                self._free.extend(reversed(held[:r]))
                del held[:r]
                self._dropped[i] += r * ps
                self._lengths[i] -= r * ps
        changed_rows = []
        for i, r, w in plan:
            if w:
                self._pages.setdefault(i, []).extend(self._free.pop() for _ in range(w))
            self._lengths[i] += n
            if r or w:
                changed_rows.append(i)
        if changed_rows:
            self._write_rows(changed_rows)
        if n:
            self._advance_lengths(ids, n, b)
        released_rows = [i for i, r, _ in plan if r]
        if released_rows:
            # Rebase: lengths drop by the released tokens (the device add above counted them).
            idx = torch.tensor(released_rows, dtype=torch.int64)
            vals = torch.tensor([self._lengths[i] for i in released_rows], dtype=torch.int32)
            self.cache_seqlens.index_copy_(0, idx.to(self.device, non_blocking=True),
                                           vals.to(self.device, non_blocking=True))

    def _truncate_locked(self, ids) -> None:
        changed = []
        for i in ids:
            held = self._pages.get(i, [])
            need = -(-self._lengths[i] // self.page_size)
            if len(held) > need:
                self._free.extend(reversed(held[need:]))
                del held[need:]
                changed.append(i)
        if changed:
            self._write_rows(changed)

    def _write_rows(self, ids) -> None:
        """Copy the host page lists of these sequences into the device block table (one H2D copy)."""
        rows = torch.zeros(len(ids), self.max_pages_per_seq, dtype=torch.int32)
        for r, i in enumerate(ids):
            held = self._pages.get(i, [])
            if held:
                rows[r, : len(held)] = torch.tensor(held, dtype=torch.int32)
        idx = torch.tensor(ids, dtype=torch.int64)
        self.block_tables.index_copy_(0, idx.to(self.device, non_blocking=True),
                                      rows.to(self.device, non_blocking=True))

    def _views(self, layer: int, b: SeqBatch):
        return self.layer_cache(layer)

    def _release_all_locked(self, seq_id) -> None:
        held = self._pages.pop(seq_id, [])
        self._free.extend(reversed(held))

    def _batch_state(self, b: SeqBatch):
        return self._rows_slice(b, self.cache_seqlens), self._rows_slice(b, self.block_tables)

    def check_invariants(self) -> None:
        """Assert the allocator's invariants (for tests and debugging; reads the device tables):
        pages of live sequences are disjoint, free + held = all pages exactly once, each sequence
        holds the pages its length needs, and the device state mirrors the host."""
        with self._lock:
            held = [p for i in self._live for p in self._pages.get(i, [])]
            assert len(held) == len(set(held)), "a page is held by two live sequences"
            assert sorted(held + self._free) == list(range(self.num_pages)), "pages lost or duplicated"
            assert set(self._pages) <= self._live, "a freed sequence still holds pages"
            lens = self.cache_seqlens.cpu().tolist()
            table = self.block_tables.cpu()
            for i in range(self.max_seqs):
                assert lens[i] == (self._lengths[i] if i in self._live else 0), f"cache_seqlens[{i}] out of sync"
            for i in self._live:
                pages = self._pages.get(i, [])
                assert len(pages) == -(-self._lengths[i] // self.page_size), f"sequence {i} holds the wrong page count"
                assert table[i, : len(pages)].tolist() == pages, f"block_tables[{i}] out of sync"


__all__ = ["KVCache", "ContiguousKVCache", "PagedKVCache", "CacheFullError", "SeqBatch"]
