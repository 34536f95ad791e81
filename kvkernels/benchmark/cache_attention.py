"""Cache-attention benchmark: several new queries per sequence against a KV cache.

A point is `batch` sequences of `context` cached tokens whose last `queries` tokens are the new
queries (causal), plus `decode_batch` sequences of `decode_context` tokens with one query each:
one launch for a mixed batch of decodes and prefill chunks. The scenarios of `scenarios()`:

  speculative      B=32, 4 queries, 8K context, pages of 16: memory-bound (K/V read once per group)
  chunked-prefill  2048 queries over a 32K context: compute-bound
  mixed            a 1024-query prompt chunk over 4K beside 32 decodes over 8K

Bytes = the K and V attended (sum over sequences of len * Hkv * D * 2 * kv element size) + q read
and out written; FLOPs = 4 * Hq * D * sum over queries of the positions each sees. A point is
memory- or compute-bound as its arithmetic intensity says; records carry both the GB/s (against
the copy ceiling) and TFLOP/s (against the matmul ceiling).

Peers run on the same tensors: SDPA and naive PyTorch attend a dense copy of each sequence's keys
gathered outside the timed call (so the gather is free for them), FlashInfer's paged prefill reads
the same pages as ours.
"""

from __future__ import annotations

import math

import torch

from .decode import FP8_SCALE, _randn
from .peers import FP8_DTYPES, Case, Unsupported, cache_layout, dtype_of, elem_size, fp8_kv_dtype, max_abs_error

OP = "cache"
LENGTH_KEY = "context"


def scenarios(dtype: str = "bf16", hq: int = 32, hkv: int = 8, head_dim: int = 128) -> list[dict]:
    """The issue's three points for one model shape."""
    return [make_config(32, 8192, 4, hq, hkv, head_dim, dtype, page_size=16, scenario="speculative"),
            make_config(1, 32768, 2048, hq, hkv, head_dim, dtype, page_size=16, scenario="chunked-prefill"),
            make_config(1, 4096, 1024, hq, hkv, head_dim, dtype, page_size=16, decode_batch=32,
                        decode_context=8192, scenario="mixed")]


def shrink(config: dict, factor: int) -> dict:
    """The same scenario with token counts divided by `factor` (at least 1 query, 1 position)."""
    if factor <= 1:
        return dict(config)
    out = dict(config)
    for key in ("context", "decode_context", "queries"):
        out[key] = max(1, config[key] // factor)
    out["context"] = max(out["context"], out["queries"])
    out["decode_batch"] = max(0, config["decode_batch"] // 8) if config["decode_batch"] else 0
    out["batch"] = max(1, config["batch"] // 8)
    return out


def make_config(batch, context, queries, hq, hkv, head_dim, dtype, page_size=16, fp8=False, decode_batch=0,
                decode_context=0, scenario=None, preset=None) -> dict:
    return {"batch": batch, "context": context, "queries": queries, "decode_batch": decode_batch,
            "decode_context": decode_context or context, "hq": hq, "hkv": hkv, "head_dim": head_dim,
            "dtype": dtype, "kv_dtype": fp8_kv_dtype(fp8) or dtype, "paged": bool(page_size),
            "page_size": page_size or None, "causal": True, "scenario": scenario, "preset": preset}


def sequences(config: dict) -> list[tuple[int, int]]:
    """(length, queries) of every sequence of the point: the prefill chunks first, then the decodes."""
    return ([(config["context"], config["queries"])] * config["batch"]
            + [(config["decode_context"], 1)] * config["decode_batch"])


def accounting(config: dict) -> tuple[int, int]:
    hq, hkv, d = config["hq"], config["hkv"], config["head_dim"]
    q_elem, kv_elem = elem_size(config["dtype"]), elem_size(config["kv_dtype"])
    nbytes = flops = 0
    for length, n in sequences(config):
        nbytes += length * hkv * d * 2 * kv_elem + 2 * n * hq * d * q_elem
        seen = n * (length - n) + n * (n + 1) // 2  # query i sees length - n + i + 1 positions
        flops += 4 * seen * hq * d
    return nbytes, flops


def set_bytes(config: dict) -> int:
    return accounting(config)[0]


def build(config: dict, device, n_sets: int, seed: int = 0) -> Case:
    """n_sets independent caches and query sets; a paged cache has its pages shuffled (one block
    table shared by the sets). q is ragged [Tq, Hq, D] with cu_seqlens_q."""
    device = torch.device(device)
    seqs = sequences(config)
    B = len(seqs)
    hq, hkv, d = config["hq"], config["hkv"], config["head_dim"]
    dtype, kv_dtype = dtype_of(config["dtype"]), dtype_of(config["kv_dtype"])
    capacity = max(length for length, _ in seqs)
    gen = torch.Generator(device=device).manual_seed(seed)
    shared = {}
    block_table, cache_shape = cache_layout(config, B, capacity, hkv, d, device, seed, shared)
    k_scale = v_scale = None
    if kv_dtype in FP8_DTYPES:
        k_scale = torch.tensor(FP8_SCALE, dtype=torch.float32, device=device)
        v_scale = torch.tensor(FP8_SCALE, dtype=torch.float32, device=device)
        shared["k_scale_value"] = shared["v_scale_value"] = FP8_SCALE
    counts = [n for _, n in seqs]
    cu = torch.tensor([0] + list(_cumsum(counts)), dtype=torch.int32, device=device)
    seqlens = torch.tensor([length for length, _ in seqs], dtype=torch.int32, device=device)
    shared.update(cu_seqlens_q=cu, max_seqlen_q=max(counts), counts=counts,
                  lengths=[length for length, _ in seqs])
    sets = [{"q": _randn((sum(counts), hq, d), dtype, device, gen), "k": _randn(cache_shape, kv_dtype, device, gen),
             "v": _randn(cache_shape, kv_dtype, device, gen), "seqlens": seqlens, "block_table": block_table,
             "k_scale": k_scale, "v_scale": v_scale} for _ in range(n_sets)]
    nbytes, flops = accounting(config)
    return Case(OP, config, device, sets, shared, nbytes, flops)


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


# The oracle materialises [Hq, n, L] fp32 scores per sequence: check only below this size.
CHECK_LIMIT_BYTES = 2**30


def reference(case: Case):
    from kvkernels import reference as oracle
    cfg = case.config
    biggest = max(n * length for length, n in sequences(cfg))
    if cfg["hq"] * biggest * 4 * 3 > CHECK_LIMIT_BYTES:
        return None
    s = case.sets[0]
    scales = {}
    if s["k_scale"] is not None:
        scales = {"k_scale": s["k_scale"].reshape(1).expand(cfg["hkv"]),
                  "v_scale": s["v_scale"].reshape(1).expand(cfg["hkv"])}
    out, _ = oracle.cache_attention(s["q"], s["k"], s["v"], s["seqlens"], cu_seqlens_q=case.shared["cu_seqlens_q"],
                                    block_table=s["block_table"], softmax_scale=1.0 / math.sqrt(cfg["head_dim"]),
                                    **scales)
    return out.float()


def poison(case: Case) -> None:
    """Nothing to poison: cache attention returns a fresh output."""


def error(case: Case, expected, out) -> float | None:
    return max_abs_error(expected, out)


# -------------------------------------------------------------------------------------- peers


def run_kvkernels(case: Case, backend: str):
    import kvkernels
    s, sh = case.sets, case.shared
    return lambda i: kvkernels.cache_attention(  # noqa: E731
        s[i]["q"], s[i]["k"], s[i]["v"], s[i]["seqlens"], cu_seqlens_q=sh["cu_seqlens_q"],
        max_seqlen_q=sh["max_seqlen_q"], block_table=s[i]["block_table"], k_scale=s[i]["k_scale"],
        v_scale=s[i]["v_scale"], backend=backend)


def _gathered(case: Case, guard):
    """Per set, per sequence: (q [1, Hq, n, D], k/v [1, Hkv, L, D]) dense copies made outside the
    timed call, and the bottom-right causal mask [n, L] of each distinct (n, L)."""
    cfg = case.config
    if case.kv_dtype != case.dtype:
        raise Unsupported("the dense peers do not read an fp8 cache")
    hkv, d = cfg["hkv"], cfg["head_dim"]
    guard(case, case.nbytes * case.n_sets, "gathered key/value copies")
    sh = case.shared
    cu = sh["cu_seqlens_q"].tolist()
    per_set = []
    for x in case.sets:
        seqs = []
        for b, length in enumerate(sh["lengths"]):
            if x["block_table"] is None:
                k, v = x["k"][b, :length], x["v"][b, :length]
            else:
                ps = x["k"].shape[1]
                pos = torch.arange(length, device=case.device)
                rows = sh["block_table_long"][b][pos // ps] * ps + pos % ps
                k = x["k"].reshape(-1, hkv, d).index_select(0, rows)
                v = x["v"].reshape(-1, hkv, d).index_select(0, rows)
            q = x["q"][cu[b]:cu[b + 1]]
            seqs.append((q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)))
        per_set.append(seqs)
    masks = {}
    for length, n in sequences(cfg):
        i = torch.arange(n, device=case.device).unsqueeze(1)
        j = torch.arange(length, device=case.device).unsqueeze(0)
        masks[(n, length)] = j <= i + length - n
    return per_set, masks


def prepare_sdpa(case: Case, backend, guard):
    """SDPA on the gathered copies, one call per sequence, with an explicit bottom-right mask
    (is_causal is top-left aligned when n < L)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    per_set, masks = _gathered(case, guard)
    gqa = case.config["hq"] != case.config["hkv"]
    kwargs = {"enable_gqa": True} if gqa else {}

    def fn(i):
        outs = []
        with sdpa_kernel(backend):
            for q, k, v in per_set[i]:
                mask = masks[(q.shape[2], k.shape[2])]
                outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)[0].transpose(0, 1))
        return torch.cat(outs)
    return fn


def prepare_naive(case: Case, guard):
    """Plain PyTorch on the gathered copies: matmul, fp32 softmax, matmul, per sequence."""
    per_set, masks = _gathered(case, guard)
    scale = 1.0 / math.sqrt(case.config["head_dim"])
    group = case.config["hq"] // case.config["hkv"]

    def fn(i):
        outs = []
        for q, k, v in per_set[i]:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = (q @ k.transpose(-1, -2)).float() * scale
            scores = scores.masked_fill(~masks[(q.shape[2], k.shape[2])], float("-inf"))
            outs.append((scores.softmax(-1).to(q.dtype) @ v)[0].transpose(0, 1))
        return torch.cat(outs)
    return fn


def prepare_flashinfer(case: Case, flashinfer, plan):
    """FlashInfer's BatchPrefillWithPagedKVCacheWrapper on the same pages."""
    cfg = case.config
    if not cfg["paged"]:
        raise Unsupported("flashinfer's paged prefill is compared on paged caches")
    sh, s = case.shared, case.sets
    ps = cfg["page_size"]
    dev = case.device
    pages = [-(-length // ps) for length in sh["lengths"]]
    indices = torch.cat([sh["block_table_long"][b, :p] for b, p in enumerate(pages)]).to(torch.int32)
    indptr = torch.tensor([0] + list(_cumsum(pages)), dtype=torch.int32, device=dev)
    last = torch.tensor([length - (p - 1) * ps for length, p in zip(sh["lengths"], pages)], dtype=torch.int32,
                        device=dev)
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    plan(wrapper, sh["cu_seqlens_q"], indptr, indices, last, cfg["hq"], cfg["hkv"], cfg["head_dim"], ps,
         causal=True, q_data_type=case.dtype, kv_data_type=case.kv_dtype)
    run = getattr(wrapper, "run", None) or wrapper.forward
    if case.kv_dtype in FP8_DTYPES:
        ks, vs = float(sh["k_scale_value"]), float(sh["v_scale_value"])
        return lambda i: run(s[i]["q"], (s[i]["k"], s[i]["v"]), k_scale=ks, v_scale=vs)  # noqa: E731
    return lambda i: run(s[i]["q"], (s[i]["k"], s[i]["v"]))  # noqa: E731
