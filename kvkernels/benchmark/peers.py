"""The implementations compared at every point, all on the same input tensors.

  kvkernels-cuda / kvkernels-triton   the public ops with backend="cuda" / "triton"
  sdpa-flash / -cudnn / -efficient / -math
                    torch.nn.functional.scaled_dot_product_attention pinned to one backend with
                    torch.nn.attention.sdpa_kernel; a backend that rejects the case is skipped
  flex              torch.nn.attention.flex_attention (compiled on GPU, eager on CPU)
  naive             plain PyTorch in the input dtype (the HF "eager" way: matmul, fp32 softmax,
                    matmul; paged caches gathered first)
  flashinfer        FlashInfer's batch decode / ragged prefill / paged append / paged prefill (cache
                    attention), when importable

`prepare(impl, case)` returns `fn(i)`, running the impl on input set i, or raises Unsupported
with the reason. Layout conversions a peer needs (views, block-table metadata, plans) happen in
prepare, outside the timed call; a peer that would need a copy of the cache is not offered.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8_e4m3": torch.float8_e4m3fn,
          "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = 448.0
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_kv_dtype(fp8) -> str | None:
    """A config's fp8 switch (False, True = e4m3, or "e4m3" / "e5m2") -> its kv_dtype name, or None."""
    if not fp8:
        return None
    fmt = "e4m3" if fp8 is True else fp8
    if fmt not in ("e4m3", "e5m2"):
        raise ValueError(f"fp8 format must be 'e4m3' or 'e5m2', got {fp8!r}")
    return f"fp8_{fmt}"


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def elem_size(name: str) -> int:
    return torch.empty((), dtype=dtype_of(name)).element_size()


class Unsupported(Exception):
    """This implementation does not accept this case (the message says why)."""


@dataclass
class Case:
    """One benchmark point: its config and n input sets of identical shapes.

    sets[i] holds the tensors of set i; `shared` the metadata common to all sets (a block table,
    fp8 scales, ...)."""
    op: str
    config: dict
    device: torch.device
    sets: list
    shared: dict = field(default_factory=dict)
    nbytes: int = 0
    flops: int = 0

    @property
    def n_sets(self) -> int:
        return len(self.sets)

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.config["dtype"])

    @property
    def kv_dtype(self) -> torch.dtype:
        return dtype_of(self.config.get("kv_dtype", self.config["dtype"]))


def flashinfer_version() -> str | None:
    try:
        import flashinfer
    except Exception:  # ImportError, or a broken install raising anything at import
        return None
    return getattr(flashinfer, "__version__", "unknown")


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 4 * 2**30


def _guard_materialised(case: Case, nbytes: int, what: str) -> None:
    limit = 0.5 * _free_bytes(case.device)
    if nbytes > limit:
        raise Unsupported(f"would materialise {nbytes / 2**30:.1f} GiB of {what} (limit {limit / 2**30:.1f} GiB)")


def _probe(fn):
    """Run fn(0) once; any error means the impl does not accept the case."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(0)
    except Unsupported:
        raise
    except (RuntimeError, ValueError, TypeError, NotImplementedError, ImportError, AssertionError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        msg = str(e).strip().splitlines()
        raise Unsupported(f"{type(e).__name__}: {msg[0][:200] if msg else ''}") from None
    return fn


# ---------------------------------------------------------------------------------- kvkernels


def _kvk(backend: str):
    def prepare(case: Case):
        import kvkernels
        s = case.sets
        if case.op == "decode":
            fn = lambda i: kvkernels.decode_attention(  # noqa: E731
                s[i]["q"], s[i]["k"], s[i]["v"], s[i]["seqlens"], block_table=s[i]["block_table"],
                k_scale=s[i]["k_scale"], v_scale=s[i]["v_scale"], backend=backend)
        elif case.op == "prefill":
            causal = case.config["causal"]
            fn = lambda i: kvkernels.prefill_attention(s[i]["q"], s[i]["k"], s[i]["v"], causal=causal,  # noqa: E731
                                                       backend=backend)
        elif case.op == "append":
            fn = lambda i: kvkernels.append_kv(  # noqa: E731
                s[i]["k_new"], s[i]["v_new"], s[i]["k_cache"], s[i]["v_cache"], s[i]["seqlens"],
                block_table=s[i]["block_table"], k_scale=s[i]["k_scale"], v_scale=s[i]["v_scale"], backend=backend)
        elif case.op == "cache":
            from . import cache_attention
            fn = cache_attention.run_kvkernels(case, backend)
        else:
            raise Unsupported(case.op)
        return _probe(fn)
    return prepare


# --------------------------------------------------------------------------------------- SDPA


def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}


def _bhsd_views(case: Case):
    """Per set: (q, k, v) as [B, H, S, D] views of the benchmark tensors (no copies)."""
    views = []
    for s in case.sets:
        if case.op == "decode":
            views.append((s["q"].unsqueeze(2), s["k"].transpose(1, 2), s["v"].transpose(1, 2)))
        else:
            views.append((s["q"].transpose(1, 2), s["k"].transpose(1, 2), s["v"].transpose(1, 2)))
    return views


def _dense_attention_only(case: Case, who: str) -> None:
    if case.op not in ("decode", "prefill"):
        raise Unsupported(f"{who} is an attention op; it does not write caches")
    if case.config.get("paged"):
        raise Unsupported(f"{who} needs a contiguous [B, H, S, D] cache, not a paged one")
    if case.kv_dtype != case.dtype:
        raise Unsupported(f"{who} does not read an fp8 cache")


def _sdpa(name: str):
    def prepare(case: Case):
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel
        backend = _sdpa_backends()[name]
        if case.op == "cache":
            from . import cache_attention
            return _probe(cache_attention.prepare_sdpa(case, backend, _guard_materialised))
        _dense_attention_only(case, name)
        cfg = case.config
        if name == "sdpa-math":
            sq = 1 if case.op == "decode" else cfg["seqlen"]
            sk = cfg["context"] if case.op == "decode" else cfg["seqlen"]
            _guard_materialised(case, cfg["batch"] * cfg["hq"] * sq * sk * 8, "attention scores")
        gqa = cfg["hq"] != cfg["hkv"]
        causal = case.op == "prefill" and cfg["causal"]
        views = _bhsd_views(case)
        kwargs = {"enable_gqa": True} if gqa else {}

        if case.op == "decode":
            def fn(i):
                q, k, v = views[i]
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, **kwargs).squeeze(2)
        else:
            def fn(i):
                q, k, v = views[i]
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs).transpose(1, 2)
        return _probe(fn)
    return prepare


# --------------------------------------------------------------------------------------- flex


@functools.lru_cache(maxsize=None)
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention
    if device_type == "cuda":
        # Static shapes: one compile per point, kernels specialised like every other peer's. A sweep
        # has more shapes than dynamo's default recompile limit, past which it would silently fall
        # back to the unfused eager implementation.
        import torch._dynamo
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention  # eager (unfused) on CPU: compiling costs more than the tiny CPU sweep


def _prepare_flex(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask
    _dense_attention_only(case, "flex")
    cfg = case.config
    flex = _flex_fn(case.device.type)
    kwargs = {"enable_gqa": True} if cfg["hq"] != cfg["hkv"] else {}
    if case.op == "prefill" and cfg["causal"]:
        s = cfg["seqlen"]
        kwargs["block_mask"] = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, s, s,
                                                 device=str(case.device))
    views = _bhsd_views(case)
    if case.op == "decode":
        fn = lambda i: flex(*views[i], **kwargs).squeeze(2)  # noqa: E731
    else:
        fn = lambda i: flex(*views[i], **kwargs).transpose(1, 2)  # noqa: E731
    return _probe(fn)


# -------------------------------------------------------------------------------------- naive


def _bytes_view(x: torch.Tensor) -> torch.Tensor:
    # fp8 tensors are indexed through a uint8 view: advanced indexing of float8 dtypes is not
    # implemented on every device and torch version, and a byte copy is exact.
    return x.view(torch.uint8) if x.dtype in FP8_DTYPES else x


def gather_rows(x: torch.Tensor, index) -> torch.Tensor:
    """x[index] (index: a tensor or tuple of tensors over the leading dims), fp8 included."""
    return _bytes_view(x)[index].view(x.dtype)


def scatter_rows(x: torch.Tensor, index, values: torch.Tensor) -> None:
    """x[index] = values in place, fp8 included."""
    _bytes_view(x)[index] = _bytes_view(values.to(x.dtype))


def _dequant(x: torch.Tensor, scale, dtype) -> torch.Tensor:
    if x.dtype in FP8_DTYPES:
        return x.to(dtype) * scale.to(dtype)
    return x


def naive_decode(q, k, v, context: int, scale: float, block_table=None, k_scale=None, v_scale=None):
    """q [B, Hq, D]; k/v [B, S, Hkv, D] (or paged [pages, page_size, Hkv, D] + block_table [B, P]
    long); every sequence holds `context` tokens -> out [B, Hq, D]."""
    B, hq, d = q.shape
    if block_table is not None:
        k = gather_rows(k, block_table).flatten(1, 2)
        v = gather_rows(v, block_table).flatten(1, 2)
    k = _dequant(k[:, :context], k_scale, q.dtype)
    v = _dequant(v[:, :context], v_scale, q.dtype)
    hkv = k.shape[2]
    qg = q.view(B, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,bshd->bhgs", qg, k).float() * scale
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.einsum("bhgs,bshd->bhgd", probs, v).reshape(B, hq, d)


def naive_prefill(q, k, v, scale: float, causal_mask=None):
    """q [B, S, Hq, D], k/v [B, S, Hkv, D]; causal_mask bool [S, S] (True = visible) or None."""
    B, s, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.view(B, s, hkv, hq // hkv, d)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k).float() * scale
    if causal_mask is not None:
        scores = scores.masked_fill(~causal_mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(B, s, hq, d)


def quantize(x: torch.Tensor, scale, cache_dtype) -> torch.Tensor:
    if cache_dtype == torch.float8_e5m2:
        from ..reference import e5m2_satfinite  # the hardware's conversion (saturating, canonical NaN)
        return e5m2_satfinite(x.float() / scale)
    if cache_dtype == torch.float8_e4m3fn:
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def _prepare_naive(case: Case):
    cfg = case.config
    s = case.sets
    if case.op == "decode":
        scale = 1.0 / math.sqrt(cfg["head_dim"])
        bt = case.shared.get("block_table_long")
        ctx = cfg["context"]
        fn = lambda i: naive_decode(s[i]["q"], s[i]["k"], s[i]["v"], ctx, scale, bt,  # noqa: E731
                                    s[i]["k_scale"], s[i]["v_scale"])
    elif case.op == "prefill":
        S = cfg["seqlen"]
        _guard_materialised(case, cfg["batch"] * cfg["hq"] * S * S * 10, "attention scores")
        scale = 1.0 / math.sqrt(cfg["head_dim"])
        mask = torch.ones(S, S, dtype=torch.bool, device=case.device).tril() if cfg["causal"] else None
        fn = lambda i: naive_prefill(s[i]["q"], s[i]["k"], s[i]["v"], scale, mask)  # noqa: E731
    elif case.op == "cache":
        from . import cache_attention
        fn = cache_attention.prepare_naive(case, _guard_materialised)
    elif case.op == "append":
        rows = case.shared["rows"]  # per set: (index tuple into the cache) for its [B * new] rows

        def fn(i):
            x = s[i]
            hkv, d = x["k_new"].shape[2:]
            for src, cache, sc in ((x["k_new"], x["k_cache"], x["k_scale"]), (x["v_new"], x["v_cache"], x["v_scale"])):
                scatter_rows(cache, rows[i], quantize(src.reshape(-1, hkv, d), sc, cache.dtype))
    else:
        raise Unsupported(case.op)
    return _probe(fn)


# --------------------------------------------------------------------------------- FlashInfer


def _flashinfer_plan(wrapper, *args, **kwargs):
    """plan() (0.2+) or begin_forward() (0.1); kv dtype keyword renamed across releases."""
    method = getattr(wrapper, "plan", None) or wrapper.begin_forward
    dtype_kw = {k: v for k, v in kwargs.items() if k not in ("kv_data_type",)}
    for kw in (kwargs, {**dtype_kw, "data_type": kwargs.get("kv_data_type")}, dtype_kw):
        try:
            return method(*args, **{k: v for k, v in kw.items() if v is not None})
        except TypeError:
            continue
    raise Unsupported("flashinfer: no plan() signature accepted these arguments")


def _paged_metadata(case: Case, n: int):
    """FlashInfer's CSR page table for a cache where every sequence holds n tokens:
    (indptr, indices, last_page_len, page_size). A contiguous [B, S_max, Hkv, D] cache is read as
    B pages of S_max rows."""
    cfg = case.config
    B = cfg["batch"]
    dev = case.device
    if cfg["paged"]:
        ps = cfg["page_size"]
        pages = -(-n // ps)
        indices = case.shared["block_table_long"][:, :pages].reshape(-1).to(torch.int32)
    else:
        ps = case.sets[0]["k" if case.op == "decode" else "k_cache"].shape[1]
        pages = 1
        indices = torch.arange(B, dtype=torch.int32, device=dev)
    indptr = torch.arange(0, B * pages + 1, pages, dtype=torch.int32, device=dev)
    last = torch.full((B,), n - (pages - 1) * ps, dtype=torch.int32, device=dev)
    return indptr, indices, last, ps


def _prepare_flashinfer(case: Case):
    try:
        import flashinfer
    except Exception as e:
        raise Unsupported(f"flashinfer is not importable ({type(e).__name__})") from None
    if case.device.type != "cuda":
        raise Unsupported("flashinfer runs on CUDA devices only")
    cfg = case.config
    s = case.sets
    workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=case.device)
    if case.op == "decode":
        indptr, indices, last, ps = _paged_metadata(case, cfg["context"])
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=cfg["hq"] // cfg["hkv"] >= 4)
        _flashinfer_plan(wrapper, indptr, indices, last, cfg["hq"], cfg["hkv"], cfg["head_dim"], ps,
                         q_data_type=case.dtype, kv_data_type=case.kv_dtype)
        run = getattr(wrapper, "run", None) or wrapper.forward
        if case.kv_dtype in FP8_DTYPES:
            ks, vs = float(case.shared["k_scale_value"]), float(case.shared["v_scale_value"])
            fn = lambda i: run(s[i]["q"], (s[i]["k"], s[i]["v"]), k_scale=ks, v_scale=vs)  # noqa: E731
        else:
            fn = lambda i: run(s[i]["q"], (s[i]["k"], s[i]["v"]))  # noqa: E731
    elif case.op == "prefill":
        if case.kv_dtype != case.dtype:
            raise Unsupported("fp8 prefill is not compared")
        B, S = cfg["batch"], cfg["seqlen"]
        indptr = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=case.device)
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
        _flashinfer_plan(wrapper, indptr, indptr, cfg["hq"], cfg["hkv"], cfg["head_dim"], causal=cfg["causal"],
                         q_data_type=case.dtype)
        run = getattr(wrapper, "run", None) or wrapper.forward
        flat = [(x["q"].flatten(0, 1), x["k"].flatten(0, 1), x["v"].flatten(0, 1)) for x in s]
        fn = lambda i: run(*flat[i]).view(B, S, cfg["hq"], cfg["head_dim"])  # noqa: E731
    elif case.op == "append":
        if case.kv_dtype != case.dtype:
            raise Unsupported("flashinfer's append does not quantize to fp8 with a scale")
        from flashinfer import page
        B, new = cfg["batch"], cfg["new_tokens"]
        hkv, d = cfg["hkv"], cfg["head_dim"]
        prepared = []
        for x in s:
            n = x["start"] + new  # every sequence's length after this set's append
            indptr, indices, last, ps = _paged_metadata(case, n)
            lengths = torch.full((B,), n, dtype=torch.int32, device=case.device)
            append_indptr = torch.arange(0, B * new + 1, new, dtype=torch.int32, device=case.device)
            batch_idx, positions = page.get_batch_indices_positions(append_indptr, lengths, B * new)
            caches = (x["k_cache"], x["v_cache"])
            prepared.append((x["k_new"].reshape(-1, hkv, d), x["v_new"].reshape(-1, hkv, d), batch_idx, positions,
                             caches, indices, indptr, last))
        fn = lambda i: page.append_paged_kv_cache(*prepared[i], kv_layout="NHD")  # noqa: E731
    elif case.op == "cache":
        from . import cache_attention
        fn = cache_attention.prepare_flashinfer(case, flashinfer, _flashinfer_plan)
    else:
        raise Unsupported(case.op)
    return _probe(fn)


# ----------------------------------------------------------------------------------- registry

_PREPARE = {
    "kvkernels-cuda": _kvk("cuda"),
    "kvkernels-triton": _kvk("triton"),
    "flashinfer": _prepare_flashinfer,
    "sdpa-flash": _sdpa("sdpa-flash"),
    "sdpa-cudnn": _sdpa("sdpa-cudnn"),
    "sdpa-efficient": _sdpa("sdpa-efficient"),
    "sdpa-math": _sdpa("sdpa-math"),
    "flex": _prepare_flex,
    "naive": _prepare_naive,
}

# Which impls are offered for which op (an offered impl may still reject a given case).
OFFERED = {
    "decode": tuple(_PREPARE),
    "prefill": tuple(_PREPARE),
    "append": ("kvkernels-cuda", "kvkernels-triton", "flashinfer", "naive"),
    "cache": ("kvkernels-cuda", "kvkernels-triton", "flashinfer", "sdpa-cudnn", "sdpa-efficient", "sdpa-math",
              "naive"),
}


def impls_for(op: str) -> list[str]:
    return list(OFFERED[op])


def prepare(impl: str, case: Case):
    """fn(i) running `impl` on input set i of `case`; raises Unsupported with the reason."""
    if impl not in OFFERED[case.op]:
        raise Unsupported(f"{impl} is not offered for {case.op}")
    return _PREPARE[impl](case)


def max_abs_error(expected, out) -> float | None:
    """max |out - expected| of an attention output (the first element of an (out, lse) pair)."""
    if expected is None or out is None:
        return None
    if isinstance(out, tuple):
        out = out[0]
    return float((out.float() - expected).abs().max())


def cache_layout(config: dict, batch: int, capacity: int, hkv: int, d: int, device, seed: int, shared: dict):
    """(block_table or None, cache shape) for `capacity` tokens a sequence. A paged cache gets its
    pages in a shuffled order, as an allocator leaves them; the int64 copy of the table goes to
    shared["block_table_long"] for the peers that index with it."""
    if not config["paged"]:
        return None, (batch, capacity, hkv, d)
    ps = config["page_size"]
    pages = -(-capacity // ps)
    perm = torch.randperm(batch * pages, generator=torch.Generator().manual_seed(seed))
    block_table = perm.view(batch, pages).to(device=device, dtype=torch.int32)
    shared["block_table_long"] = block_table.long()
    return block_table, (batch * pages, ps, hkv, d)
