"""Page-table formats: FlashInfer's CSR page lists -> this package's block table + lengths.

FlashInfer (and engines built on it: SGLang, some vLLM backends) describes a paged KV cache by three
index tensors; the kernels here take a dense block table and per-sequence lengths:

    FlashInfer CSR                                      kvkernels
    kv_indptr        int [B+1]   sequence b's pages are  block_table   int32 [B, max_pages]
    kv_indices       int [nnz]   kv_indices[kv_indptr[b]:kv_indptr[b+1]]   position p of sequence b
    kv_last_page_len int [B]     tokens in b's last page                   is row p % page_size of
                                                                           page block_table[b, p // page_size]
                                                         cache_seqlens int32 [B]

`paged_kv_from_csr` converts on the device with a fixed number of tensor ops whose output shapes come
from the input shapes alone: no host synchronisation, so it can sit inside a captured CUDA graph or a
torch.compile(fullgraph=True) region, and replaying it with new index values (same shapes) is valid.
"""

from __future__ import annotations

import torch

from . import validation as V

#: What block_table holds past a sequence's pages. Not a page index: the kernels skip such an entry
#: (never read or write through it), and the API's index checks name it if an append or attention
#: ever needs that page — where 0, a real page, would let a stray append overwrite another
#: sequence's keys silently.
UNUSED_PAGE = -1

_CSR_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1


def paged_kv_from_csr(kv_indptr, kv_indices, kv_last_page_len, page_size, *, max_pages_per_seq=None):
    """FlashInfer's page table (CSR) -> (block_table int32 [B, max_pages], cache_seqlens int32 [B]).

    kv_indptr        int32/int64 [B+1]: sequence b's pages are kv_indices[kv_indptr[b]:kv_indptr[b+1]]
                     (an empty sequence has kv_indptr[b] == kv_indptr[b+1]); non-decreasing, and
                     kv_indptr[-1] <= kv_indices.numel() (a preallocated kv_indices may be longer).
    kv_indices       int32/int64 [nnz]: page indices into a [num_pages, page_size, Hkv, D] cache.
    kv_last_page_len int32/int64 [B]: tokens in sequence b's last page, 1..page_size (ignored for an
                     empty sequence).
    page_size        int >= 1, the cache's shape[1].
    max_pages_per_seq  block_table's width; default kv_indices.numel(), the most pages any sequence
                     can have. Pass a smaller bound (e.g. ceil(max context / page_size)) to keep the
                     table small: a sequence with more pages is an error where values are checked,
                     and is truncated to its first max_pages_per_seq pages where they are not.

    -> block_table: row b holds sequence b's pages in order, then UNUSED_PAGE (-1);
       cache_seqlens[b] = (pages_b - 1) * page_size + kv_last_page_len[b], 0 for an empty sequence.
    Both live on kv_indptr's device. Sync-free: values are checked only where that is free (CPU
    tensors, or checked mode, as the ops' index checks are), never while torch.compile traces.

    For an append (append_kv writes at cache_seqlens): FlashInfer counts the new tokens in
    kv_last_page_len, so pass cache_seqlens - n_b (the lengths before the append) to append_kv and
    cache_seqlens itself to decode_attention / cache_attention.
    """
    V.tensor("kv_indptr", kv_indptr, rank=1, dtypes=_CSR_DTYPES)
    device = kv_indptr.device
    V.tensor("kv_indices", kv_indices, rank=1, dtypes=_CSR_DTYPES, device=device)
    V.tensor("kv_last_page_len", kv_last_page_len, rank=1, dtypes=_CSR_DTYPES, device=device)
    if kv_indptr.shape[0] < 1:
        raise ValueError(f"kv_indptr must have shape [batch + 1], got {list(kv_indptr.shape)}")
    batch = kv_indptr.shape[0] - 1
    V.shape("kv_last_page_len", kv_last_page_len, (batch,), "one per sequence, like kv_indptr[1:]")
    V.scalar("page_size", page_size, kind=int, minimum=1)
    nnz = kv_indices.shape[0]
    if max_pages_per_seq is None:
        max_pages_per_seq = nnz
    V.scalar("max_pages_per_seq", max_pages_per_seq, kind=int, minimum=0)
    if max_pages_per_seq * page_size > _INT32_MAX:
        raise ValueError(f"max_pages_per_seq * page_size = {max_pages_per_seq * page_size} positions does not fit "
                         f"int32 cache_seqlens; pass a smaller max_pages_per_seq")
    if V.values_checkable(kv_indptr, kv_indices, kv_last_page_len):
        _check_csr_values(*V.host_copies(kv_indptr, kv_indices, kv_last_page_len), page_size, max_pages_per_seq)

    indptr = kv_indptr.to(torch.int64)
    starts = indptr[:-1]  # [B]
    pages = (indptr[1:] - starts).clamp(0, max_pages_per_seq)  # [B]; clamped: unchecked values stay in the table
    cols = torch.arange(max_pages_per_seq, device=device, dtype=torch.int64)  # [max_pages]
    used = cols.unsqueeze(0) < pages.unsqueeze(1)  # [B, max_pages]
    if nnz:
        # Entries past pages_b (and, unchecked, positions past nnz) are gathered from a clamped index
        # and then replaced: the gather itself never leaves kv_indices.
        where = (starts.unsqueeze(1) + cols.unsqueeze(0)).clamp(0, nnz - 1)  # [B, max_pages]
        table = torch.where(used, kv_indices[where].to(torch.int32), UNUSED_PAGE)
    else:
        table = torch.full((batch, max_pages_per_seq), UNUSED_PAGE, dtype=torch.int32, device=device)
    last = kv_last_page_len.to(torch.int64).clamp(0, page_size)
    lengths = torch.where(pages > 0, (pages - 1) * page_size + last, 0)
    return table.to(torch.int32), lengths.to(torch.int32)


def _check_csr_values(indptr, indices, last, page_size, max_pages):
    """Host copies of the CSR tensors: the checks that need their values."""
    indptr, indices, last = indptr.to(torch.int64), indices.to(torch.int64), last.to(torch.int64)
    if int(indptr[0]) < 0:
        raise ValueError(f"kv_indptr[0] must be >= 0, got {int(indptr[0])}")
    if bool((indptr[1:] < indptr[:-1]).any()):
        raise ValueError(f"kv_indptr must be non-decreasing, got {indptr.tolist()[:16]}")
    if int(indptr[-1]) > indices.numel():
        raise ValueError(f"kv_indptr[-1] = {int(indptr[-1])} is past kv_indices' {indices.numel()} entries")
    pages = indptr[1:] - indptr[:-1]
    if pages.numel() and int(pages.max()) > max_pages:
        b = int(pages.argmax())
        raise ValueError(f"sequence {b} has {int(pages[b])} pages, more than max_pages_per_seq = {max_pages}")
    used = indices[int(indptr[0]):int(indptr[-1])]
    bad = (used < 0) | (used > _INT32_MAX)
    if bool(bad.any()):
        j = int(bad.nonzero()[0]) + int(indptr[0])
        raise ValueError(f"kv_indices[{j}] = {int(indices[j])} is not a page index (0 .. 2^31 - 1)")
    wrong = (pages > 0) & ((last < 1) | (last > page_size))
    if bool(wrong.any()):
        b = int(wrong.nonzero()[0])
        raise ValueError(f"kv_last_page_len[{b}] = {int(last[b])} must be in [1, page_size = {page_size}] "
                         f"for a sequence with pages")
