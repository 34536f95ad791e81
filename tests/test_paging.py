"""paged_kv_from_csr: FlashInfer's CSR page lists -> block_table + cache_seqlens.

Against a naive per-sequence loop; round trips through decode_attention and ragged append_kv on the
reference backend; shapes from shapes only (runs on meta tensors: no value is ever read on the host);
bad input named before anything runs."""

from __future__ import annotations

import pytest
import torch
from conftest import lengths_tensor, randn, seeded

import kvkernels
from kvkernels import paging, reference


def random_csr(page_counts, page_size, num_pages, gen, *, slack=0, dtype=torch.int32):
    """CSR for sequences of these page counts over shuffled pages of a num_pages pool; kv_indices
    gets `slack` trailing garbage entries (a preallocated buffer longer than used)."""
    perm = torch.randperm(num_pages, generator=gen)
    nnz = sum(page_counts)
    assert nnz <= num_pages
    indices = torch.cat([perm[:nnz], torch.full((slack,), 10**6)])  # garbage past kv_indptr[-1]
    indptr = torch.tensor([0] + torch.tensor(page_counts, dtype=torch.int64).cumsum(0).tolist())
    last = torch.randint(1, page_size + 1, (len(page_counts),), generator=gen)
    last[torch.tensor(page_counts) == 0] = 0  # ignored for empty sequences
    return indptr.to(dtype), indices.to(dtype), last.to(dtype)


def naive(indptr, indices, last, page_size, max_pages):
    B = indptr.numel() - 1
    table = torch.full((B, max_pages), paging.UNUSED_PAGE, dtype=torch.int32)
    lengths = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        pages = indices[int(indptr[b]):int(indptr[b + 1])].tolist()
        table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        lengths[b] = (len(pages) - 1) * page_size + int(last[b]) if pages else 0
    return table, lengths


@pytest.mark.parametrize("page_counts", [[3, 0, 1, 5], [0], [], [1, 1, 1], [0, 0, 7]],
                         ids=["mixed", "one-empty", "no-sequences", "single-pages", "empties-then-long"])
@pytest.mark.parametrize("page_size", [1, 16, 256])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("max_pages", [None, 7, 9])
def test_matches_a_naive_loop(page_counts, page_size, dtype, max_pages):
    gen = seeded(0)
    indptr, indices, last = random_csr(page_counts, page_size, 20, gen, slack=2, dtype=dtype)
    table, lengths = kvkernels.paged_kv_from_csr(indptr, indices, last, page_size, max_pages_per_seq=max_pages)
    width = indices.numel() if max_pages is None else max_pages
    want_table, want_lengths = naive(indptr, indices, last, page_size, width)
    assert table.dtype == torch.int32 and lengths.dtype == torch.int32
    assert table.shape == (len(page_counts), width) and lengths.shape == (len(page_counts),)
    assert torch.equal(table, want_table) and torch.equal(lengths, want_lengths)


def test_indptr_need_not_start_at_zero():
    """FlashInfer reads pages from kv_indices[kv_indptr[b]]: an offset start (a slice of a larger
    batch's CSR) is honoured, not assumed away."""
    indptr = torch.tensor([2, 4, 5], dtype=torch.int32)
    indices = torch.tensor([9, 9, 3, 1, 6], dtype=torch.int32)
    last = torch.tensor([2, 4], dtype=torch.int32)
    table, lengths = kvkernels.paged_kv_from_csr(indptr, indices, last, 4, max_pages_per_seq=3)
    assert table.tolist() == [[3, 1, -1], [6, -1, -1]] and lengths.tolist() == [6, 4]


def test_output_shapes_come_from_input_shapes_only():
    """On meta tensors (no values at all) the helper still runs: it never reads a value on the host, so
    it never synchronises and a captured CUDA graph of it replays correctly with new values."""
    indptr = torch.empty(5, dtype=torch.int32, device="meta")
    indices = torch.empty(40, dtype=torch.int32, device="meta")
    last = torch.empty(4, dtype=torch.int32, device="meta")
    table, lengths = kvkernels.paged_kv_from_csr(indptr, indices, last, 16)
    assert table.shape == (4, 40) and lengths.shape == (4,) and table.device.type == "meta"
    table, _ = kvkernels.paged_kv_from_csr(indptr, indices, last, 16, max_pages_per_seq=8)
    assert table.shape == (4, 8)


def scatter_csr(dense_k, dense_v, lengths, page_size, gen, *, filled=None, extra_pages=3):
    """Sequences of these lengths in shuffled NaN-poisoned pages, described FlashInfer's way; the first
    filled[b] (default lengths[b]) positions of sequence b hold dense_k/v [B, S, Hkv, D]."""
    B, _, hkv, d = dense_k.shape
    filled = lengths if filled is None else filled
    counts = [-(-n // page_size) for n in lengths]
    num_pages = sum(counts) + extra_pages
    indptr, indices, _ = random_csr(counts, page_size, num_pages, gen)
    last = torch.tensor([n - (c - 1) * page_size if c else 0 for n, c in zip(lengths, counts)], dtype=torch.int32)
    kc = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=dense_k.dtype)
    vc = kc.clone()
    for b, n in enumerate(filled):
        for p in range(n):
            page = int(indices[int(indptr[b]) + p // page_size])
            kc[page, p % page_size] = dense_k[b, p]
            vc[page, p % page_size] = dense_v[b, p]
    return kc, vc, indptr, indices, last


@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_decode_over_the_converted_table_equals_decode_over_the_dense_cache(page_size):
    gen = seeded(1)
    lengths = [17, 0, 1, 300, 256]
    B, S, hq, hkv, d = len(lengths), max(lengths), 4, 2, 32
    dense_k, dense_v = randn(B, S, hkv, d, gen=gen), randn(B, S, hkv, d, gen=gen)
    q = randn(B, hq, d, gen=gen)
    kc, vc, indptr, indices, last = scatter_csr(dense_k, dense_v, lengths, page_size, gen)
    table, seqlens = kvkernels.paged_kv_from_csr(indptr, indices, last, page_size)
    assert seqlens.tolist() == lengths

    out, lse = kvkernels.decode_attention(q, kc, vc, seqlens, block_table=table, return_lse=True,
                                          backend="reference")

    want, want_lse = kvkernels.decode_attention(q, dense_k, dense_v, lengths_tensor(lengths), return_lse=True,
                                                backend="reference")
    assert not torch.isnan(out).any()
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("page_size", [1, 16])
def test_ragged_append_through_the_converted_table(page_size):
    """FlashInfer counts the new tokens in kv_last_page_len: append at cache_seqlens - n_b, then the
    cache holds each sequence's old and new keys where the table says."""
    gen = seeded(2)
    old, new = [5, 0, 16, 31], [1, 4, 0, 20]
    lengths = [o + n for o, n in zip(old, new)]
    B, hkv, d = len(old), 2, 16
    dense_k, dense_v = randn(B, max(lengths), hkv, d, gen=gen), randn(B, max(lengths), hkv, d, gen=gen)
    kc, vc, indptr, indices, last = scatter_csr(dense_k, dense_v, lengths, page_size, gen, filled=old)
    table, seqlens = kvkernels.paged_kv_from_csr(indptr, indices, last, page_size)
    assert seqlens.tolist() == lengths
    cu = lengths_tensor([0] + torch.tensor(new).cumsum(0).tolist())
    k_new = torch.cat([dense_k[b, o:o + n] for b, (o, n) in enumerate(zip(old, new))])  # [T, Hkv, D]
    v_new = torch.cat([dense_v[b, o:o + n] for b, (o, n) in enumerate(zip(old, new))])

    kvkernels.append_kv(k_new, v_new, kc, vc, seqlens - lengths_tensor(new), block_table=table, cu_seqlens=cu,
                        backend="reference")

    for b, n in enumerate(lengths):
        assert torch.equal(reference.gather_sequence(kc, b, n, table), dense_k[b, :n]), f"keys of sequence {b}"
        assert torch.equal(reference.gather_sequence(vc, b, n, table), dense_v[b, :n]), f"values of sequence {b}"
    rows_set = (~kc.isnan()).all(-1).all(-1).sum().item()
    assert rows_set == sum(lengths), "rows outside the sequences changed"


def test_unused_entries_are_not_pages_and_the_api_says_so():
    """Past a sequence's pages the table holds UNUSED_PAGE (-1): an append that would need one of those
    pages is refused, naming the entry, instead of writing to page 0 (someone else's)."""
    indptr = lengths_tensor([0, 1, 3])
    indices = lengths_tensor([2, 0, 1])
    last = lengths_tensor([4, 1])
    table, seqlens = kvkernels.paged_kv_from_csr(indptr, indices, last, 4)
    assert table.tolist() == [[2, -1, -1], [0, 1, -1]] and seqlens.tolist() == [4, 5]
    kc = torch.zeros(3, 4, 2, 8, dtype=torch.float16)
    k = torch.ones(2, 1, 2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = -1"):
        kvkernels.append_kv(k, k, kc, kc.clone(), seqlens, block_table=table)
    assert not kc.any()


def csr_args(**over):
    args = dict(kv_indptr=lengths_tensor([0, 2, 2, 3]), kv_indices=lengths_tensor([4, 1, 0]),
                kv_last_page_len=lengths_tensor([3, 0, 16]), page_size=16)
    args.update(over)
    return args


BAD_CSR = {
    "indptr not a tensor": (csr_args(kv_indptr=[0, 2, 2, 3]), TypeError, "kv_indptr must be a torch.Tensor"),
    "indptr dtype": (csr_args(kv_indptr=torch.tensor([0.0, 2.0, 2.0, 3.0])), TypeError, "kv_indptr must have dtype"),
    "indices rank": (csr_args(kv_indices=lengths_tensor([4, 1, 0]).reshape(3, 1)), ValueError,
                     "kv_indices must have 1 dimensions"),
    "indices device": (csr_args(kv_indices=torch.zeros(3, dtype=torch.int32, device="meta")), ValueError,
                       "kv_indices is on meta"),
    "indptr empty": (csr_args(kv_indptr=lengths_tensor([])), ValueError, r"kv_indptr must have shape \[batch \+ 1\]"),
    "last_page_len shape": (csr_args(kv_last_page_len=lengths_tensor([3, 16])), ValueError,
                            r"kv_last_page_len must have shape \[3\]"),
    "page_size zero": (csr_args(page_size=0), ValueError, "page_size must be >= 1"),
    "page_size float": (csr_args(page_size=16.0), TypeError, "page_size must be an int"),
    "max_pages negative": (csr_args(max_pages_per_seq=-1), ValueError, "max_pages_per_seq must be >= 0"),
    "max_pages overflow": (csr_args(max_pages_per_seq=2**28), ValueError, "does not fit int32"),
    "indptr decreasing": (csr_args(kv_indptr=lengths_tensor([0, 2, 1, 3])), ValueError, "non-decreasing"),
    "indptr negative start": (csr_args(kv_indptr=lengths_tensor([-1, 2, 2, 3])), ValueError, r"kv_indptr\[0\]"),
    "indptr past indices": (csr_args(kv_indptr=lengths_tensor([0, 2, 2, 4])), ValueError,
                            r"kv_indptr\[-1\] = 4 is past kv_indices' 3 entries"),
    "more pages than max": (csr_args(max_pages_per_seq=1), ValueError, "sequence 0 has 2 pages, more than"),
    "negative page": (csr_args(kv_indices=lengths_tensor([4, -1, 0])), ValueError, r"kv_indices\[1\] = -1"),
    "page past int32": (csr_args(kv_indices=torch.tensor([4, 2**31, 0])), ValueError, r"kv_indices\[1\]"),
    "last page too long": (csr_args(kv_last_page_len=lengths_tensor([17, 0, 16])), ValueError,
                           r"kv_last_page_len\[0\] = 17 must be in \[1, page_size = 16\]"),
    "last page empty": (csr_args(kv_last_page_len=lengths_tensor([3, 0, 0])), ValueError,
                        r"kv_last_page_len\[2\] = 0"),
}


@pytest.mark.parametrize("case", list(BAD_CSR))
def test_rejects(case):
    args, exc, match = BAD_CSR[case]
    a = dict(args)
    with pytest.raises(exc, match=match):
        kvkernels.paged_kv_from_csr(a.pop("kv_indptr"), a.pop("kv_indices"), a.pop("kv_last_page_len"),
                                    a.pop("page_size"), **a)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_page_lists():
    """Captured once, replayed with other page lists of the same shapes: no sync, new answers."""
    indptr = torch.zeros(4, dtype=torch.int32, device="cuda")
    indices = torch.zeros(12, dtype=torch.int32, device="cuda")
    last = torch.ones(3, dtype=torch.int32, device="cuda")
    kvkernels.paged_kv_from_csr(indptr, indices, last, 16, max_pages_per_seq=6)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        table, lengths = kvkernels.paged_kv_from_csr(indptr, indices, last, 16, max_pages_per_seq=6)
    gen = seeded(3)
    for counts in ([2, 0, 5], [6, 1, 0], [0, 0, 0]):
        host = random_csr(counts, 16, 12, gen, slack=12 - sum(counts))
        for dst, src in zip((indptr, indices, last), host):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want_table, want_lengths = naive(*host, 16, 6)
        assert torch.equal(table.cpu(), want_table) and torch.equal(lengths.cpu(), want_lengths)
