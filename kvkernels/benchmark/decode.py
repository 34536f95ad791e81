"""Decode benchmark: one query token per sequence against a KV cache of `context` tokens.

Decode is memory-bound: its figure of merit is bytes moved over time, against the copy ceiling.
Bytes = the K and V actually attended, sum over sequences of len * Hkv * D * 2 * kv element size,
plus q read and out written. FLOPs = 4 * sum(len) * Hq * D (q.k and p.v, two per multiply-add).
"""

from __future__ import annotations

import math

import torch

from .peers import FP8_DTYPES, Case, cache_layout, dtype_of, elem_size, fp8_kv_dtype, max_abs_error

OP = "decode"
LENGTH_KEY = "context"
FP8_SCALE = 0.5  # stored fp8 values are value / scale


def decode_bytes(seqlens, hq: int, hkv: int, head_dim: int, q_elem: int, kv_elem: int) -> int:
    """K and V bytes attended (sum over sequences of len * Hkv * D * 2 * kv_elem) + q + out."""
    seqlens = [int(n) for n in seqlens]
    kv = sum(seqlens) * hkv * head_dim * 2 * kv_elem
    return kv + 2 * len(seqlens) * hq * head_dim * q_elem


def decode_flops(seqlens, hq: int, head_dim: int) -> int:
    return 4 * sum(int(n) for n in seqlens) * hq * head_dim


def accounting(config: dict) -> tuple[int, int]:
    seqlens = [config["context"]] * config["batch"]
    nbytes = decode_bytes(seqlens, config["hq"], config["hkv"], config["head_dim"], elem_size(config["dtype"]),
                          elem_size(config["kv_dtype"]))
    return nbytes, decode_flops(seqlens, config["hq"], config["head_dim"])


def make_config(batch, context, hq, hkv, head_dim, dtype, page_size=0, fp8=False, preset=None) -> dict:
    return {"batch": batch, "context": context, "hq": hq, "hkv": hkv, "head_dim": head_dim, "dtype": dtype,
            "kv_dtype": fp8_kv_dtype(fp8) or dtype, "paged": bool(page_size), "page_size": page_size or None,
            "causal": False, "preset": preset}


def set_bytes(config: dict) -> int:
    return accounting(config)[0]


def _randn(shape, dtype, device, gen):
    if dtype in FP8_DTYPES:
        return torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).to(dtype)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def build(config: dict, device, n_sets: int, seed: int = 0) -> Case:
    """n_sets independent caches, every sequence holding `context` tokens. A paged cache has its
    pages in a shuffled order (one block table shared by the sets), as an allocator leaves them."""
    device = torch.device(device)
    B, ctx, hq, hkv, d = (config[k] for k in ("batch", "context", "hq", "hkv", "head_dim"))
    dtype, kv_dtype = dtype_of(config["dtype"]), dtype_of(config["kv_dtype"])
    gen = torch.Generator(device=device).manual_seed(seed)
    shared = {}
    block_table, cache_shape = cache_layout(config, B, ctx, hkv, d, device, seed, shared)
    k_scale = v_scale = None
    if kv_dtype in FP8_DTYPES:
        k_scale = torch.tensor(FP8_SCALE, dtype=torch.float32, device=device)
        v_scale = torch.tensor(FP8_SCALE, dtype=torch.float32, device=device)
        shared["k_scale_value"] = shared["v_scale_value"] = FP8_SCALE
    seqlens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    sets = [{"q": _randn((B, hq, d), dtype, device, gen), "k": _randn(cache_shape, kv_dtype, device, gen),
             "v": _randn(cache_shape, kv_dtype, device, gen), "seqlens": seqlens, "block_table": block_table,
             "k_scale": k_scale, "v_scale": v_scale} for _ in range(n_sets)]
    nbytes, flops = accounting(config)
    return Case(OP, config, device, sets, shared, nbytes, flops)


# Reference check: the fp32 oracle on set 0, when it fits comfortably.
CHECK_LIMIT_ELEMS = 2**28


def reference(case: Case):
    from kvkernels import reference as oracle
    cfg = case.config
    if cfg["batch"] * cfg["context"] * cfg["hkv"] * cfg["head_dim"] > CHECK_LIMIT_ELEMS:
        return None
    s = case.sets[0]
    scales = {}
    if s["k_scale"] is not None:
        scales = {"k_scale": s["k_scale"].reshape(1).expand(cfg["hkv"]),
                  "v_scale": s["v_scale"].reshape(1).expand(cfg["hkv"])}
    out, _ = oracle.decode_attention(s["q"], s["k"], s["v"], s["seqlens"], block_table=s["block_table"],
                                     softmax_scale=1.0 / math.sqrt(cfg["head_dim"]), **scales)
    return out.float()


def poison(case: Case) -> None:
    """Nothing to poison: decode returns a fresh output."""


def error(case: Case, expected, out) -> float | None:
    return max_abs_error(expected, out)
