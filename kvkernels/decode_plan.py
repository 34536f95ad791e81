"""Split-KV planning for decode, shared by the Triton and CUDA backends.

Decode reads the whole cache once; with few sequences and KV heads, one program per (sequence,
KV head) leaves most SMs idle, so the context is cut into splits whose partial (out, lse) states
are merged afterwards. The plan depends only on shapes and the device's SM count, never on tensor
values, so it needs no host synchronisation and a CUDA graph captured once stays valid.

A split covers tokens [s * split_tokens, (s + 1) * split_tokens) of a sequence; a sequence shorter
than the grid leaves its trailing splits empty (lse -inf, weight exactly 0 in the merge).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Batch-invariant mode: boundaries fixed in tokens, independent of batch size and SM count, so a
# sequence's bits do not depend on what else is in the batch.
BATCH_INVARIANT_SPLIT_TOKENS = 2048
# Below this many tokens a split's fixed costs (its partial state write and the merge) outweigh the
# parallelism it buys.
MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 128
# Aim for this many waves of programs over the SMs.
TARGET_WAVES = 2


@dataclass(frozen=True)
class SplitPlan:
    num_splits: int    # grid size along the split axis (1 = no merge needed)
    split_tokens: int  # tokens per split, a multiple of `granule`


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int | None = None) -> int:
    if not torch.cuda.is_available():
        return 132  # an H100 SXM: a stable plan for CPU-side tests
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def plan_splits(batch: int, kv_heads: int, capacity: int, *, num_splits: int = 0, batch_invariant: bool = False,
                num_sms: int = 132, granule: int = 16) -> SplitPlan:
    """capacity: the most tokens any sequence can hold (S_max, or max_pages * page_size).
    granule: split_tokens is rounded up to a multiple of it (the kernel's KV tile or page size).
    num_splits >= 1 forces that many splits; 0 uses batch_invariant or the occupancy heuristic."""
    capacity = max(1, capacity)
    if num_splits >= 1:
        split_tokens = _round_up(-(-capacity // num_splits), granule)
    elif batch_invariant:
        split_tokens = _round_up(BATCH_INVARIANT_SPLIT_TOKENS, granule)
    else:
        programs = max(1, batch * kv_heads)
        wanted = -(-TARGET_WAVES * num_sms // programs)
        affordable = max(1, capacity // MIN_SPLIT_TOKENS)
        splits = max(1, min(wanted, affordable, MAX_SPLITS))
        split_tokens = _round_up(-(-capacity // splits), granule)
    return SplitPlan(num_splits=max(1, -(-capacity // split_tokens)), split_tokens=split_tokens)
