"""Append benchmark: writing `new_tokens` keys/values per sequence into a cache, in place.

Append is pure data movement: bytes = new K and V read (2 * B * new * Hkv * D * source element)
plus the cache slots written (same count * cache element, 1 byte for fp8). FLOPs = 0.

The input sets share one cache pair; set i appends at position context + i * new_tokens, so the
sets write disjoint slots from distinct sources and no set finds the previous one's data in L2.
"""

from __future__ import annotations

import torch

from .peers import (FP8_DTYPES, FP8_MAX, Case, cache_layout, dtype_of, elem_size, fp8_kv_dtype, gather_rows, quantize,
                    scatter_rows)

OP = "append"
LENGTH_KEY = "context"
FP8_SCALE = 0.5
NOT_WRITTEN = float("inf")  # the error when a slot that should have been written still holds poison


def append_bytes(batch: int, new_tokens: int, hkv: int, head_dim: int, src_elem: int, cache_elem: int) -> int:
    return 2 * batch * new_tokens * hkv * head_dim * (src_elem + cache_elem)


def accounting(config: dict) -> tuple[int, int]:
    return append_bytes(config["batch"], config["new_tokens"], config["hkv"], config["head_dim"],
                        elem_size(config["dtype"]), elem_size(config["kv_dtype"])), 0


def make_config(batch, context, new_tokens, hq, hkv, head_dim, dtype, page_size=0, fp8=False, preset=None) -> dict:
    return {"batch": batch, "context": context, "new_tokens": new_tokens, "hq": hq, "hkv": hkv, "head_dim": head_dim,
            "dtype": dtype, "kv_dtype": fp8_kv_dtype(fp8) or dtype, "paged": bool(page_size),
            "page_size": page_size or None, "causal": False, "preset": preset}


def set_bytes(config: dict) -> int:
    return accounting(config)[0]


def build(config: dict, device, n_sets: int, seed: int = 0) -> Case:
    device = torch.device(device)
    B, ctx, new, hkv, d = (config[k] for k in ("batch", "context", "new_tokens", "hkv", "head_dim"))
    dtype, kv_dtype = dtype_of(config["dtype"]), dtype_of(config["kv_dtype"])
    gen = torch.Generator(device=device).manual_seed(seed)
    capacity = ctx + n_sets * new
    shared = {}
    block_table, cache_shape = cache_layout(config, B, capacity, hkv, d, device, seed, shared)
    k_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=torch.float32).to(kv_dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=torch.float32).to(kv_dtype)
    k_scale = v_scale = None
    if kv_dtype in FP8_DTYPES:
        k_scale = torch.tensor(FP8_SCALE, dtype=torch.float32, device=device)
        v_scale = torch.tensor(FP8_SCALE, dtype=torch.float32, device=device)
    sets, rows = [], []
    b_idx = torch.arange(B, device=device).repeat_interleave(new)
    for i in range(n_sets):
        start = ctx + i * new
        pos = (start + torch.arange(new, device=device)).repeat(B)  # [B * new], sequence-major
        if config["paged"]:
            rows.append((shared["block_table_long"][b_idx, pos // config["page_size"]], pos % config["page_size"]))
        else:
            rows.append((b_idx, pos))
        sets.append({"k_new": torch.randn((B, new, hkv, d), generator=gen, device=device, dtype=dtype),
                     "v_new": torch.randn((B, new, hkv, d), generator=gen, device=device, dtype=dtype),
                     "k_cache": k_cache, "v_cache": v_cache, "start": start,
                     "seqlens": torch.full((B,), start, dtype=torch.int32, device=device),
                     "block_table": block_table, "k_scale": k_scale, "v_scale": v_scale})
    shared["rows"] = rows
    nbytes, flops = accounting(config)
    return Case(OP, config, device, sets, shared, nbytes, flops)


def reference(case: Case):
    """What set 0 must leave in its slots: (k rows, v rows) as [B * new, Hkv, D] in the cache dtype."""
    s = case.sets[0]
    hkv, d = s["k_new"].shape[2:]
    return tuple(quantize(src.reshape(-1, hkv, d), sc, s["k_cache"].dtype)
                 for src, sc in ((s["k_new"], s["k_scale"]), (s["v_new"], s["v_scale"])))


def poison(case: Case) -> None:
    """NaN into set 0's slots, so an impl that skips a slot is caught by error()."""
    s, rows = case.sets[0], case.shared["rows"][0]
    for cache in (s["k_cache"], s["v_cache"]):
        shape = (rows[0].numel(),) + tuple(cache.shape[2:])
        scatter_rows(cache, rows, torch.full(shape, float("nan"), device=cache.device))


def error(case: Case, expected, out) -> float | None:
    """max |written - expected| over set 0's slots; NOT_WRITTEN if poison is left."""
    s, rows = case.sets[0], case.shared["rows"][0]
    worst = 0.0
    for cache, want in zip((s["k_cache"], s["v_cache"]), expected):
        diff = (gather_rows(cache, rows).float() - want.float()).abs()
        if torch.isnan(diff).any():
            return NOT_WRITTEN
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


__all__ = ["append_bytes", "accounting", "build", "make_config", "FP8_MAX"]
