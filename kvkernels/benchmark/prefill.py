"""Prefill benchmark: flash-attention forward over whole prompts (dense, Sq = Sk = seqlen).

Prefill is compute-bound: its figure of merit is FLOP/s against the bf16 matmul ceiling.
FLOPs = 4 * B * Sq * Sk * Hq * D, halved for causal. Bytes (for the roofline) = q, k, v read once
and out written once.
"""

from __future__ import annotations

import math

import torch

from .peers import Case, dtype_of, elem_size, max_abs_error

OP = "prefill"
LENGTH_KEY = "seqlen"


def prefill_flops(batch: int, sq: int, sk: int, hq: int, head_dim: int, causal: bool) -> int:
    flops = 4 * batch * sq * sk * hq * head_dim
    return flops // 2 if causal else flops


def prefill_bytes(batch: int, sq: int, sk: int, hq: int, hkv: int, head_dim: int, elem: int) -> int:
    """q and out (B * Sq * Hq * D each) plus k and v (B * Sk * Hkv * D each), once."""
    return (2 * batch * sq * hq + 2 * batch * sk * hkv) * head_dim * elem


def accounting(config: dict) -> tuple[int, int]:
    B, S = config["batch"], config["seqlen"]
    nbytes = prefill_bytes(B, S, S, config["hq"], config["hkv"], config["head_dim"], elem_size(config["dtype"]))
    return nbytes, prefill_flops(B, S, S, config["hq"], config["head_dim"], config["causal"])


def make_config(batch, seqlen, hq, hkv, head_dim, dtype, causal=True, preset=None) -> dict:
    return {"batch": batch, "seqlen": seqlen, "hq": hq, "hkv": hkv, "head_dim": head_dim, "dtype": dtype,
            "kv_dtype": dtype, "paged": False, "page_size": None, "causal": bool(causal), "preset": preset}


def set_bytes(config: dict) -> int:
    return accounting(config)[0]


def build(config: dict, device, n_sets: int, seed: int = 0) -> Case:
    device = torch.device(device)
    B, S, hq, hkv, d = (config[k] for k in ("batch", "seqlen", "hq", "hkv", "head_dim"))
    dtype = dtype_of(config["dtype"])
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    sets = [{"q": randn(B, S, hq, d), "k": randn(B, S, hkv, d), "v": randn(B, S, hkv, d)} for _ in range(n_sets)]
    nbytes, flops = accounting(config)
    return Case(OP, config, device, sets, {}, nbytes, flops)


# The oracle materialises [Hq, S, S] fp32 scores per sequence: check only below this size.
CHECK_LIMIT_BYTES = 2**30


def reference(case: Case):
    from kvkernels import reference as oracle
    cfg = case.config
    if cfg["hq"] * cfg["seqlen"] ** 2 * 4 * 3 > CHECK_LIMIT_BYTES:
        return None
    s = case.sets[0]
    out, _ = oracle.prefill_attention(s["q"], s["k"], s["v"], causal=cfg["causal"],
                                      softmax_scale=1.0 / math.sqrt(cfg["head_dim"]))
    return out.float()


def poison(case: Case) -> None:
    """Nothing to poison: prefill returns a fresh output."""


def error(case: Case, expected, out) -> float | None:
    return max_abs_error(expected, out)
