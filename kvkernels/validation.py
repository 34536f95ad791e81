"""Argument checks shared by the public ops. Every check runs before anything is launched or
written, and raises TypeError (wrong type or dtype) or ValueError (anything else) naming the
argument and what was expected.

Two kinds of check:
  * metadata (type, dtype, device, rank, shape, strides): always, free.
  * values of index tensors (cache_seqlens, block_table, slot_mapping, cu_seqlens): they live on
    the device, and reading them costs a synchronisation. They are checked when the tensors are on
    the CPU, or when checked mode is on (KVKERNELS_CHECK=1 / kvkernels.set_checked_mode()), and
    never while torch.compile traces. Unchecked, the kernels still never read or write outside the
    tensors: out-of-range positions and pages are skipped.
"""

from __future__ import annotations

import math

import torch

from . import config

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_NAMES = "float8_e4m3fn or float8_e5m2"
INDEX_DTYPES = (torch.int32,)
MAX_HEAD_DIM = 256


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def values_checkable(*tensors: torch.Tensor | None) -> bool:
    """True when index values may be read now: all on the CPU, or checked mode; never while tracing."""
    if _is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    return config.checked_mode() or all(t.device.type == "cpu" for t in present)


def tensor(name: str, x, *, rank: int | tuple[int, ...], dtypes=None, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ranks = (rank,) if isinstance(rank, int) else rank
    if x.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (all tensors on one device)")
    return x


def optional_tensor(name: str, x, **kw) -> torch.Tensor | None:
    return None if x is None else tensor(name, x, **kw)


def shape(name: str, x: torch.Tensor, expected: tuple, meaning: str) -> None:
    """expected: ints, or None for 'any size'."""
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want} ({meaning}), got {list(x.shape)}")


def last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), "
                         f"got strides {tuple(x.stride())}; call .contiguous() first")


def head_dim(name: str, d: int) -> None:
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {d} is not supported (1..{MAX_HEAD_DIM})")


def heads(hq: int, hkv: int, q_name: str = "q", kv_name: str = "k") -> None:
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"{q_name} has {hq} heads, {kv_name} has {hkv}: the query heads must be "
                         f"a whole multiple of the key/value heads (Hq % Hkv == 0)")


def scalar(name: str, value, *, kind=float, minimum=None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise TypeError(f"{name} must be {'a number' if kind is float else 'an int'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def cache_pair(k_cache, v_cache, device) -> tuple[torch.Tensor, torch.Tensor]:
    tensor("k_cache", k_cache, rank=4, dtypes=FLOAT_DTYPES + FP8_DTYPES, device=device)
    tensor("v_cache", v_cache, rank=4, dtypes=FLOAT_DTYPES + FP8_DTYPES, device=device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {list(k_cache.shape)} "
                         f"and {list(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        if k_cache.dtype in FP8_DTYPES and v_cache.dtype in FP8_DTYPES:
            raise TypeError(f"k_cache and v_cache must use one fp8 format, got k_cache "
                            f"{str(k_cache.dtype).replace('torch.', '')} and v_cache "
                            f"{str(v_cache.dtype).replace('torch.', '')} (mixed e4m3 / e5m2 caches are not supported)")
        raise TypeError(f"k_cache and v_cache must have the same dtype, got {k_cache.dtype} and {v_cache.dtype}")
    last_dim_contiguous("k_cache", k_cache)
    last_dim_contiguous("v_cache", v_cache)
    return k_cache, v_cache


def _scale(name: str, s, hkv: int, device) -> torch.Tensor:
    """One scale: a number or an fp32 tensor of shape [] or [Hkv], finite and > 0 -> fp32 [Hkv]
    (stride 0 for a per-tensor scale)."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"{name} must be finite and > 0, got {s}")
        s = torch.full((), float(s), dtype=torch.float32, device=device)  # a fill: capturable in CUDA graphs
    elif not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a number or an fp32 tensor of shape [] or [{hkv}], "
                        f"got {type(s).__name__}")
    tensor(name, s, rank=(0, 1), dtypes=(torch.float32,), device=device)
    if s.dim() == 1 and s.shape[0] not in (1, hkv):
        raise ValueError(f"{name} must have shape [] or [{hkv}] (per tensor or per KV head), got {list(s.shape)}")
    if values_checkable(s):
        vals = host_copies(s)[0]
        if not bool(torch.isfinite(vals).all()) or bool((vals <= 0).any()):
            raise ValueError(f"{name} must be finite and > 0, got {vals.tolist()}")
    return s.reshape(-1).expand(hkv)


def fp8_scales(k_scale, v_scale, cache_dtype, hkv: int, device):
    """Normalise scales: fp32 [Hkv] views (stride 0 for a per-tensor scale) for fp8 caches (default 1);
    (None, None) for other caches, whose scales (see unquantized_scales) are applied outside the kernels."""
    if cache_dtype not in FP8_DTYPES:
        return None, None
    return tuple(_scale(name, torch.ones((), dtype=torch.float32, device=device) if s is None else s, hkv, device)
                 for name, s in (("k_scale", k_scale), ("v_scale", v_scale)))


def unquantized_scales(k_scale, v_scale, cache_dtype, hkv: int, device):
    """Scales given with a 16/32/64-bit cache (vLLM passes k_scale/v_scale for every cache, 1.0 unless fp8):
    value = stored * scale there too. -> (k, v), each None when absent or the number 1.0 (nothing to
    apply: the exact, free case), else fp32 [Hkv]. A tensor holding 1.0 cannot be recognised without a
    device sync, so it is applied (an exact multiplication by 1). (None, None) for fp8 caches."""
    if cache_dtype in FP8_DTYPES:
        return None, None
    out = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None or (isinstance(s, (int, float)) and not isinstance(s, bool) and s == 1.0):
            out.append(None)
        else:
            out.append(_scale(name, s, hkv, device))
    return out[0], out[1]


def block_table(bt, batch: int, device) -> torch.Tensor:
    tensor("block_table", bt, rank=2, dtypes=INDEX_DTYPES, device=device)
    shape("block_table", bt, (batch, None), "batch, max_pages")
    return bt


def cache_seqlens(seqlens, batch: int, device) -> torch.Tensor:
    tensor("cache_seqlens", seqlens, rank=1, dtypes=INDEX_DTYPES, device=device)
    shape("cache_seqlens", seqlens, (batch,), "one length per sequence")
    return seqlens


def host_copies(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """CPU copies of index tensors for value checks: one device synchronisation in all."""
    on_device = [t for t in tensors if t is not None and t.device.type != "cpu"]
    if not on_device:
        return list(tensors)
    copies = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(on_device[0].device).synchronize()
    return copies


def cache_index_values(k_cache: torch.Tensor, seqlens: torch.Tensor, bt: torch.Tensor | None, extra: int) -> None:
    """Lengths (+ extra appended tokens) within the cache's capacity, and the block-table entries
    they need valid pages. A no-op unless values_checkable()."""
    if not values_checkable(seqlens, bt):
        return
    seqlens, bt = host_copies(seqlens, bt)
    if bt is None:
        seqlen_values(seqlens, extra, k_cache.shape[1], "(S_max of the contiguous cache)")
    else:
        seqlen_values(seqlens, extra, bt.shape[1] * k_cache.shape[1], "(max_pages * page_size of the paged cache)")
        block_table_values(bt, seqlens, extra, k_cache.shape[1], k_cache.shape[0])
        if extra:
            distinct_append_slots(bt, seqlens, extra, k_cache.shape[1])


def cache_indexing(k_cache: torch.Tensor, seqlens: torch.Tensor, bt: torch.Tensor | None, batch: int,
                   device) -> None:
    """cache_seqlens int32 [B]; block_table int32 [B, max_pages] for a paged cache, else a contiguous
    cache of B rows (sequence b owns row b)."""
    cache_seqlens(seqlens, batch, device)
    if bt is not None:
        block_table(bt, batch, device)
    elif k_cache.shape[0] != batch:
        raise ValueError(f"contiguous k_cache/v_cache must have shape [B={batch}, S_max, Hkv, D], got "
                         f"{list(k_cache.shape)} (pass block_table for a paged cache)")


def seqlen_values(seqlens: torch.Tensor, extra: int, capacity: int, what: str) -> None:
    """Every cache_seqlens[b] + extra within [0, capacity]."""
    if seqlens.numel() == 0:
        return
    lo, hi = int(seqlens.min()), int(seqlens.max())
    if lo < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {lo} (sequence {int(seqlens.argmin())})")
    if hi + extra > capacity:
        b = int(seqlens.argmax())
        if extra:
            raise ValueError(f"append of {extra} token{'s' if extra != 1 else ''} to sequence {b} would run past "
                             f"the cache's capacity: cache_seqlens[{b}] + {extra} = {hi} + {extra} = {hi + extra} "
                             f"> {capacity} {what}")
        raise ValueError(f"cache_seqlens[{b}] = {hi} exceeds the cache's capacity {capacity} {what}")


def block_table_values(bt: torch.Tensor, seqlens: torch.Tensor, extra: int, page_size: int,
                       num_pages: int) -> None:
    """Entries for the pages positions [0, seqlens[b] + extra) touch must be valid page indices."""
    if bt.numel() == 0:
        return
    needed = (seqlens.to(torch.int64) + extra + page_size - 1) // page_size  # [B]
    cols = torch.arange(bt.shape[1], device=bt.device).unsqueeze(0)
    used = cols < needed.unsqueeze(1)
    bad = used & ((bt < 0) | (bt >= num_pages))
    if bool(bad.any()):
        b, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {p}] = {int(bt[b, p])} is not a page index in [0, {num_pages}) "
                         f"(needed by sequence {b} of length {int(seqlens[b]) + extra})")


def distinct_append_slots(bt: torch.Tensor, seqlens: torch.Tensor, extra: int, page_size: int) -> None:
    """No two sequences of a paged append write the same slot (a page shared between them):
    the result would depend on which write lands last."""
    if bt.shape[0] < 2:
        return
    pos = seqlens.to(torch.int64).unsqueeze(1) + torch.arange(extra, dtype=torch.int64)  # [B, extra]
    pages = torch.gather(bt.to(torch.int64), 1, pos // page_size)
    slots = (pages * page_size + pos % page_size).reshape(-1)
    uniq, counts = torch.unique(slots, return_counts=True)
    if bool((counts > 1).any()):
        slot = int(uniq[counts > 1][0])
        owners = sorted({int(i) for i in (slots == slot).nonzero().squeeze(1) // extra})
        raise ValueError(f"sequences {owners} would write the same cache slot (page {slot // page_size}, row "
                         f"{slot % page_size}): their block_table rows share a page; give each sequence its own "
                         "pages for the positions it appends")


def max_seqlen(name: str, value: int, cu: torch.Tensor) -> None:
    """A given max_seqlen_q/k must be at least the longest sequence in cu (when values are readable):
    kernels size their grid from it, so a smaller value would silently skip tokens."""
    if cu.numel() < 2 or not values_checkable(cu):
        return
    vals = host_copies(cu)[0].to(torch.int64)
    lengths = vals[1:] - vals[:-1]
    longest = int(lengths.max())
    if value < longest:
        raise ValueError(f"{name} = {value} is smaller than sequence {int(lengths.argmax())}'s length {longest}; "
                         f"pass {name} >= {longest} (or None to compute it)")


def cu_seqlens(name: str, cu: torch.Tensor, total: int, device) -> None:
    tensor(name, cu, rank=1, dtypes=INDEX_DTYPES, device=device)
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have shape [batch + 1], got {list(cu.shape)}")
    if values_checkable(cu):
        vals = host_copies(cu)[0].to(torch.int64)
        if int(vals[0]) != 0:
            raise ValueError(f"{name}[0] must be 0, got {int(vals[0])}")
        if bool((vals[1:] < vals[:-1]).any()):
            raise ValueError(f"{name} must be non-decreasing, got {vals.tolist()[:16]}")
        if int(vals[-1]) != total:
            raise ValueError(f"{name}[-1] = {int(vals[-1])} must equal the total number of tokens {total}")


def query_counts(seqlens: torch.Tensor, cu_q: torch.Tensor | None, max_seqlen_q: int | None,
                 dense_sq: int | None) -> None:
    """cache_attention: every sequence's query count n_b within its length (the cache holds the
    queries' own keys; a sequence of length 0 is an idle slot whose queries see nothing, as in
    decode), and within max_seqlen_q (which sizes the launch). A no-op unless values_checkable()."""
    if not values_checkable(seqlens, cu_q):
        return
    seqlens, cu_q = host_copies(seqlens, cu_q)
    if seqlens.numel() == 0:
        return
    if cu_q is not None:
        counts = (cu_q[1:] - cu_q[:-1]).to(torch.int64)
        if counts.numel() and int(counts.max()) > max_seqlen_q:
            b = int(counts.argmax())
            raise ValueError(f"max_seqlen_q = {max_seqlen_q} is smaller than sequence {b}'s {int(counts[b])} queries "
                             f"(cu_seqlens_q[{b + 1}] - cu_seqlens_q[{b}])")
    else:
        counts = torch.full_like(seqlens, dense_sq, dtype=torch.int64)
    # An empty sequence (length 0) is an idle batch slot, as in decode: its queries see nothing.
    short = (counts > seqlens.to(torch.int64)) & (seqlens > 0)
    if bool(short.any()):
        b = int(short.nonzero()[0])
        raise ValueError(f"sequence {b} has {int(counts[b])} queries but cache_seqlens[{b}] = {int(seqlens[b])}: "
                         f"the cache must already hold the queries' own keys and values (append them first)")
def append_index_values(k_cache: torch.Tensor, seqlens: torch.Tensor, bt: torch.Tensor | None,
                        cu: torch.Tensor | None, s_new: int, total: int, max_position: int | None = None) -> None:
    """The index values of an append (dense: s_new tokens per sequence; ragged: cu_seqlens [B+1] over
    `total` tokens), read with one synchronisation in all; a no-op unless values_checkable().

    cu_seqlens: starts at 0, non-decreasing, ends at total. Each sequence's end cache_seqlens[b] + n_b
    within the capacity, the block-table entries it needs valid pages, and no cache slot written by
    two tokens (two sequences sharing a page, both appending to the same rows: the result would
    depend on which write lands last). max_position (rotary appends: rotary_cos.shape[0]): every
    appended position cache_seqlens[b] + i must have a row of the cos/sin table.
    """
    if not values_checkable(seqlens, bt, cu):
        return
    seqlens, bt, cu = host_copies(seqlens, bt, cu)
    if cu is None:
        counts = torch.full_like(seqlens, s_new, dtype=torch.int64)  # [B]
    else:
        cu_seqlens("cu_seqlens", cu, total, cu.device)  # host copy: no further sync
        counts = (cu[1:] - cu[:-1]).to(torch.int64)
    if seqlens.numel() == 0:
        return
    starts = seqlens.to(torch.int64)
    if int(starts.min()) < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {int(starts.min())}")
    ends = starts + counts  # [B]
    page_size = k_cache.shape[1]
    capacity = k_cache.shape[1] if bt is None else bt.shape[1] * page_size
    what = "(S_max of the contiguous cache)" if bt is None else "(max_pages * page_size of the paged cache)"
    over = (ends > capacity).nonzero()
    if over.numel():
        b = int(over[0])
        n, start = int(counts[b]), int(starts[b])
        raise ValueError(f"append of {n} token{'s' if n != 1 else ''} to sequence {b} would run past the cache's "
                         f"capacity: cache_seqlens[{b}] + {n} = {start} + {n} = {start + n} > {capacity} {what}")
    if max_position is not None:
        past = ((ends > max_position) & (counts > 0)).nonzero()
        if past.numel():
            b = int(past[0])
            n, start = int(counts[b]), int(starts[b])
            raise ValueError(f"rotary: sequence {b}'s appended positions run to cache_seqlens[{b}] + {n} - 1 = "
                             f"{start + n - 1}, past the cos/sin table's {max_position} positions "
                             f"(rotary_cos.shape[0])")
    if bt is None:
        return  # sequence b owns cache row b: no two sequences meet
    block_table_values(bt, ends, 0, page_size, k_cache.shape[0])
    # The slot (page * page_size + row) of every appended token.
    seq = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # [T]
    first = torch.cumsum(counts, 0) - counts  # [B]
    pos = starts[seq] + torch.arange(seq.numel()) - first[seq]  # [T]
    slots = bt[seq, pos // page_size].to(torch.int64) * page_size + pos % page_size
    unique, hits = torch.unique(slots, return_counts=True)
    if unique.numel() != slots.numel():
        shared = int(unique[(hits > 1).nonzero()[0]])
        who = sorted({int(b) for b in seq[slots == shared]})
        raise ValueError(f"sequence{'s' if len(who) > 1 else ''} {who} would write the same cache slot (page "
                         f"{shared // page_size}, row {shared % page_size}) twice: block_table maps two appended "
                         f"positions to one slot (e.g. a page shared between sequences), so the result would be "
                         f"undefined; give each sequence its own pages for the positions it appends")


ROTARY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rotary_tables(cos, sin, x: torch.Tensor, x_name: str, interleaved, device) -> int | None:
    """rotary_cos/rotary_sin [max_position, rotary_dim / 2] for the rows of x [..., D]: both or
    neither, the same shape and dtype (x's dtype or float32), 2 <= rotary_dim <= D (rotary_dim is
    even by construction: one angle per pair). -> max_position, or None without rotary."""
    if cos is None and sin is None:
        if not isinstance(interleaved, bool):
            raise TypeError(f"rotary_interleaved must be a bool, got {interleaved!r}")
        return None
    if cos is None or sin is None:
        given, missing = ("rotary_cos", "rotary_sin") if sin is None else ("rotary_sin", "rotary_cos")
        raise ValueError(f"{given} was given without {missing}: the rotary embedding needs both tables")
    if not isinstance(interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {interleaved!r}")
    if x.dtype not in ROTARY_DTYPES:
        raise TypeError(f"rotary embedding: {x_name} must be float16, bfloat16 or float32 (it is rotated in "
                        f"float32), got {str(x.dtype).replace('torch.', '')}")
    dtypes = (x.dtype,) if x.dtype == torch.float32 else (x.dtype, torch.float32)
    tensor("rotary_cos", cos, rank=2, dtypes=dtypes, device=device)
    tensor("rotary_sin", sin, rank=2, dtypes=dtypes, device=device)
    if cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ValueError(f"rotary_cos and rotary_sin must have the same shape and dtype, got {list(cos.shape)} "
                         f"{str(cos.dtype).replace('torch.', '')} and {list(sin.shape)} "
                         f"{str(sin.dtype).replace('torch.', '')}")
    last_dim_contiguous("rotary_cos", cos)
    last_dim_contiguous("rotary_sin", sin)
    d = x.shape[-1]
    half = cos.shape[1]
    if half < 1 or 2 * half > d:
        raise ValueError(f"rotary_cos/rotary_sin must have shape [max_position, rotary_dim / 2] with 2 <= rotary_dim "
                         f"<= head dim {d} (one angle per rotated pair), got {list(cos.shape)} "
                         f"(rotary_dim = {2 * half})")
    return cos.shape[0]


def rotary_positions(name: str, positions, expected_shape: tuple, max_position: int, device,
                     keep: torch.Tensor | None = None) -> None:
    """positions int32/int64 of expected_shape, values in [0, max_position) where keep (a bool mask of
    the same shape, e.g. the tokens a slot append writes) is True; values only when values_checkable()."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(positions).__name__}")
    tensor(name, positions, rank=positions.dim(), dtypes=(torch.int32, torch.int64), device=device)
    if tuple(positions.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {list(expected_shape)} (one position per token, shared by its "
                         f"heads), got {list(positions.shape)}")
    if positions.numel() == 0 or not values_checkable(positions, keep):
        return
    pos, keep = host_copies(positions, keep)
    pos = pos if keep is None else pos[keep]
    if pos.numel() == 0:
        return
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0:
        raise ValueError(f"{name} must be >= 0, got {lo}")
    if hi >= max_position:
        raise ValueError(f"{name}.max() = {hi} is past the cos/sin table's {max_position} positions "
                         f"(rotary_cos.shape[0])")


def alibi_slopes(slopes, batch: int, hq: int, device) -> torch.Tensor | None:
    """ALiBi slopes as FlashAttention takes them: fp32 [Hq] (one slope per query head, shared by the
    batch) or [B, Hq] (per sequence). -> a [B, Hq] view (batch stride 0 for [Hq]; no copy), or None.
    Values are not checked (a slope of any sign is the caller's choice)."""
    if slopes is None:
        return None
    tensor("alibi_slopes", slopes, rank=(1, 2), dtypes=(torch.float32,), device=device)
    if slopes.shape != (hq,) and slopes.shape != (batch, hq):
        raise ValueError(f"alibi_slopes must have shape [Hq] = [{hq}] or [B, Hq] = [{batch}, {hq}], "
                         f"got {list(slopes.shape)}")
    if slopes.dim() == 1:
        slopes = slopes.unsqueeze(0).expand(batch, hq)
    if hq > 1 and slopes.stride(1) != 1:
        raise ValueError(f"alibi_slopes must be contiguous in its last dimension (stride 1), got strides "
                         f"{tuple(slopes.stride())}; call .contiguous() first")
    return slopes
