"""The public ops: validate -> choose a backend -> call the registered custom op.

Each op is a `torch.library.custom_op` (`torch.ops.kvkernels.*`) with a fake implementation, so
torch.compile(fullgraph=True) traces it and CUDA graphs capture it; the appends declare the caches
they mutate. The op body dispatches on the backend name it is given:

  "cuda"       kvkernels.cuda: hand-written kernels of the compiled extension (kvkernels._C)
  "triton"     kvkernels.triton: Triton kernels (on CPU tensors: the Triton interpreter)
  "reference"  kvkernels.reference: plain PyTorch, the oracle

backend=None (auto): CUDA tensors get "cuda" when the extension is built and supports the
configuration, else "triton"; CPU tensors get "reference". KVKERNELS_BACKEND overrides auto.

Every backend module exposes the same normalised entry points (arguments validated, defaults
resolved, causal folded into the window):

  prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, window_left, window_right, softcap, alibi_slopes=None) -> (out, lse)
  decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, window_left, softcap,
                   k_scale, v_scale, num_splits, batch_invariant, alibi_slopes=None) -> (out, lse)
  cache_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, block_table, causal,
                  softmax_scale, window_left, softcap, k_scale, v_scale, num_splits, batch_invariant,
                  alibi_slopes=None) -> (out, lse)
      (alibi_slopes: fp32 [B, Hq], batch stride 0 for per-head slopes; passed only when given, so a
      call without ALiBi is the same call as before)
  append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, cu_seqlens=None,
            rotary_cos=None, rotary_sin=None, rotary_interleaved=False) -> None
      (k/v [B, S_new, Hkv, D] with cu_seqlens None, or ragged [T, Hkv, D] with cu_seqlens int32 [B+1];
      rotary_cos/sin [max_position, rotary_dim / 2]: keys rotated at their positions before storing)
  append_kv_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, positions=None,
                  rotary_cos=None, rotary_sin=None, rotary_interleaved=False) -> None
  unsupported(op, **normalised args) -> str | None     # why this backend cannot run it
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from typing import Optional

import torch

from . import config
from . import validation as V
# Imported first so that, without a GPU, TRITON_INTERPRET=1 is set before the custom-op machinery
# (torch._dynamo) imports triton: kernels decorated before that setting cannot be interpreted.
from . import triton as _triton_mode  # noqa: F401,E402

# ------------------------------------------------------------------------------------ backends


class _ReferenceBackend:
    """Adapts kvkernels.reference to the normalised backend entry points."""

    @staticmethod
    def unsupported(op, **kw):
        return None

    @staticmethod
    def prefill_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, softcap,
                          alibi_slopes=None):
        from . import reference
        return reference.prefill_attention(q, k, v, softmax_scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                           window_size=(window_left, window_right), softcap=softcap,
                                           alibi_slopes=alibi_slopes)

    @staticmethod
    def decode_attention(q, k_cache, v_cache, seqlens, block_table, scale, window_left, softcap, k_scale, v_scale,
               num_splits, batch_invariant, alibi_slopes=None):
        from . import reference
        out, lse = reference.decode_attention(q, k_cache, v_cache, seqlens, block_table=block_table,
                                              softmax_scale=scale, window_left=window_left, softcap=softcap,
                                              k_scale=k_scale, v_scale=v_scale, alibi_slopes=alibi_slopes)
        return out, lse.to(torch.float32)

    @staticmethod
    def cache_attention(q, k_cache, v_cache, seqlens, cu_q, max_q, block_table, causal, scale, window_left,
                        softcap, k_scale, v_scale, num_splits, batch_invariant, alibi_slopes=None):
        from . import reference
        out, lse = reference.cache_attention(q, k_cache, v_cache, seqlens, cu_seqlens_q=cu_q,
                                             block_table=block_table, causal=causal, softmax_scale=scale,
                                             window_left=window_left, softcap=softcap, k_scale=k_scale,
                                             v_scale=v_scale, alibi_slopes=alibi_slopes)
        return out, lse.to(torch.float32)

    @staticmethod
    def append_kv(k, v, k_cache, v_cache, seqlens, block_table, k_scale, v_scale, cu_seqlens=None,
                  rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
        from . import reference
        reference.append_kv(k, v, k_cache, v_cache, seqlens, block_table=block_table,
                            k_scale=k_scale, v_scale=v_scale, cu_seqlens=cu_seqlens, rotary_cos=rotary_cos,
                            rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved)

    @staticmethod
    def append_kv_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, positions=None,
                        rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
        from . import reference
        reference.append_kv_slots(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale,
                                  positions=positions, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                  rotary_interleaved=rotary_interleaved)


@functools.lru_cache(maxsize=None)
def get_backend(name: str):
    """The backend module for a name; raises RuntimeError if it cannot be loaded here."""
    if name == "reference":
        return _ReferenceBackend
    if name == "triton":
        return importlib.import_module("kvkernels.triton")
    if name == "cuda":
        module = importlib.import_module("kvkernels.cuda")
        if not module.available():
            raise RuntimeError(f"backend 'cuda' is not available: {module.unavailable_reason()}")
        return module
    raise ValueError(f"backend must be one of {config.BACKENDS} or None, got {name!r}")


def _cuda_usable() -> bool:
    try:
        get_backend("cuda")
        return True
    except (RuntimeError, ImportError):
        return False


_fallback_warned: set = set()


def resolve_backend(op: str, backend: str | None, device: torch.device, **kw) -> str:
    """Pick the backend for one call and check it can run these arguments."""
    if backend is not None and backend not in config.BACKENDS:
        raise ValueError(f"backend must be one of {config.BACKENDS} or None, got {backend!r}")
    explicit = backend or config.backend_override()
    if explicit is not None:
        try:
            reason = get_backend(explicit).unsupported(op, **kw)
        except RuntimeError as e:
            raise ValueError(str(e)) from None
        if reason:
            raise ValueError(f"backend {explicit!r} does not support this {op} call: {reason}")
        return explicit
    if device.type != "cuda":
        return "reference"
    for name in ("cuda", "triton"):
        if name == "cuda" and not _cuda_usable():
            continue
        try:
            if get_backend(name).unsupported(op, **kw) is None:
                return name
        except ImportError:
            continue
    if op not in _fallback_warned:
        _fallback_warned.add(op)
        warnings.warn(f"kvkernels: no kernel supports this {op} configuration; using the PyTorch reference",
                      RuntimeWarning, stacklevel=3)
    return "reference"


# ---------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("kvkernels::prefill_attention", mutates_args=())
def _prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                softmax_scale: float, window_left: int, window_right: int, softcap: float,
                backend: str, alibi_slopes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    # alibi_slopes comes last, with a default, so calls without it keep their arguments; the backends
    # are only given it when it is there.
    extra = () if alibi_slopes is None else (alibi_slopes,)
    out, lse = get_backend(backend).prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            softmax_scale, window_left, window_right, softcap, *extra)
    return out, lse.to(torch.float32)


@_prefill_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
      window_right, softcap, backend, alibi_slopes=None):
    if q.dim() == 4:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("kvkernels::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               block_table: Optional[torch.Tensor], softmax_scale: float, window_left: int, softcap: float,
               k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], num_splits: int,
               batch_invariant: bool, backend: str,
               alibi_slopes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    extra = () if alibi_slopes is None else (alibi_slopes,)
    out, lse = get_backend(backend).decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale,
                                           window_left, softcap, k_scale, v_scale, num_splits, batch_invariant,
                                           *extra)
    return out, lse.to(torch.float32)


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, window_left, softcap, k_scale, v_scale,
      num_splits, batch_invariant, backend, alibi_slopes=None):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("kvkernels::cache_attention", mutates_args=())
def _cache_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                        cu_seqlens_q: Optional[torch.Tensor], max_seqlen_q: int, block_table: Optional[torch.Tensor],
                        causal: bool, softmax_scale: float, window_left: int, softcap: float,
                        k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], num_splits: int,
                        batch_invariant: bool, backend: str,
                        alibi_slopes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    extra = () if alibi_slopes is None else (alibi_slopes,)
    out, lse = get_backend(backend).cache_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q,
                                                    block_table, causal, softmax_scale, window_left, softcap,
                                                    k_scale, v_scale, num_splits, batch_invariant, *extra)
    return out, lse.to(torch.float32)


@_cache_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q, block_table, causal, softmax_scale,
      window_left, softcap, k_scale, v_scale, num_splits, batch_invariant, backend, alibi_slopes=None):
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("kvkernels::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor], k_scale: Optional[torch.Tensor],
               v_scale: Optional[torch.Tensor], backend: str, cu_seqlens: Optional[torch.Tensor] = None,
               rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
               rotary_interleaved: bool = False) -> None:
    # cu_seqlens (ragged k/v [T, Hkv, D]) and the rotary tables come last, with defaults, so earlier
    # calls keep their arguments; the backends are only given the rotary arguments when rotary is on.
    extra = () if rotary_cos is None else (rotary_cos, rotary_sin, rotary_interleaved)
    get_backend(backend).append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, cu_seqlens,
                                   *extra)


@_append_op.register_fake
def _(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, backend, cu_seqlens=None,
      rotary_cos=None, rotary_sin=None, rotary_interleaved=False):
    return None


@torch.library.custom_op("kvkernels::append_kv_slots", mutates_args=("k_cache", "v_cache"))
def _append_slots_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor],
                     backend: str, positions: Optional[torch.Tensor] = None,
                     rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                     rotary_interleaved: bool = False) -> None:
    extra = () if rotary_cos is None else (positions, rotary_cos, rotary_sin, rotary_interleaved)
    get_backend(backend).append_kv_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, *extra)


@_append_slots_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, backend, positions=None, rotary_cos=None,
      rotary_sin=None, rotary_interleaved=False):
    return None


# ------------------------------------------------------------------------------------ public ops


def _default_scale(softmax_scale, d: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    V.scalar("softmax_scale", softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _softcap(softcap) -> float:
    V.scalar("softcap", softcap, minimum=0.0)
    return float(softcap)


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's names


# kv_cache_dtype -> the fp8 format uint8 storage is read as ("auto": the caches' own dtype)
_FP8_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _cache_storage(k_cache, v_cache, kv_cache_dtype):
    """vLLM's kv_cache_dtype: "auto" takes the caches as they are (float8_e4m3fn and float8_e5m2
    tensors included); "fp8"/"fp8_e4m3" reads uint8 storage as float8_e4m3fn and "fp8_e5m2" as
    float8_e5m2 (a zero-copy .view, so appends land in the caller's tensor). A float8 tensor passed
    with a kv_cache_dtype must be that format."""
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} (vLLM's names), got {kv_cache_dtype!r}")
    fmt = _FP8_FORMATS.get(kv_cache_dtype)
    out = []
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if isinstance(c, torch.Tensor):
            if fmt is None and c.dtype == torch.uint8:
                raise TypeError(f"{name} is uint8 storage: pass kv_cache_dtype='fp8' or 'fp8_e4m3' (e4m3) or "
                                f"'fp8_e5m2' (e5m2) to read it as fp8")
            if fmt is not None:
                if c.dtype == torch.uint8:
                    c = c.view(fmt)
                elif c.dtype != fmt:
                    raise TypeError(f"kv_cache_dtype={kv_cache_dtype!r} reads {name} as "
                                    f"{str(fmt).replace('torch.', '')}: it must be uint8 storage or "
                                    f"{str(fmt).replace('torch.', '')}, got {str(c.dtype).replace('torch.', '')}")
        out.append(c)
    return out[0], out[1]


def _attention_scales(k_scale, v_scale, cache_dtype, hkv: int, device):
    """fp32 [Hkv] scales for the kernels, which fold them into the score scale and the output (in fp32):
    always for fp8 caches; for another cache only when a scale other than the number 1.0 is given
    (then both, the missing one as 1), else (None, None): nothing to apply, nothing loaded."""
    if cache_dtype in V.FP8_DTYPES:
        return V.fp8_scales(k_scale, v_scale, cache_dtype, hkv, device)
    k_scale, v_scale = V.unquantized_scales(k_scale, v_scale, cache_dtype, hkv, device)
    if k_scale is None and v_scale is None:
        return None, None
    one = torch.ones((), dtype=torch.float32, device=device).expand(hkv)  # a fill: capturable in CUDA graphs
    return (one if k_scale is None else k_scale), (one if v_scale is None else v_scale)


def _scale_rows(x: torch.Tensor, scale, op) -> torch.Tensor:
    """x [..., Hkv, D] times / divided by scale [Hkv, 1], in fp32 (fp64 for fp64 x), rounded once to x's
    dtype. A scale of 1 changes no bit."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return op(wide, scale.to(wide.dtype)).to(x.dtype)


def prefill_attention(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      max_seqlen_q=None, max_seqlen_k=None, window_size=(-1, -1), softcap=0.0,
                      alibi_slopes=None, return_lse=False, backend=None):
    """Flash-attention forward over whole prompts.

    dense:  q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D] (+ lse [B, Hq, Sq] fp32)
    varlen: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_q/k int32 [B+1] -> out [Tq, Hq, D] (+ lse [Hq, Tq])

    causal is bottom-right aligned: query i sees key j iff j <= i + Sk - Sq. window_size=(left, right),
    -1 unbounded: j in [i + Sk - Sq - left, i + Sk - Sq + right]. softcap > 0: scores =
    softcap * tanh(scores / softcap). softmax_scale defaults to 1/sqrt(D). A query row that sees no
    key gets out 0 and lse -inf. max_seqlen_q/k (varlen) cost a device sync when omitted.
    alibi_slopes fp32 [Hq] or [B, Hq] (FlashAttention's ALiBi): -slope[b, h] * |i + Sk - Sq - j| is
    added to the score of query i and key j (Sq, Sk: that sequence's lengths when varlen), after the
    softcap and not multiplied by softmax_scale; causal and window masks apply as without it.
    """
    V.tensor("q", q, rank=(3, 4), dtypes=V.FLOAT_DTYPES)
    device = q.device
    varlen = q.dim() == 3
    V.tensor("k", k, rank=q.dim(), dtypes=(q.dtype,), device=device)
    V.tensor("v", v, rank=q.dim(), dtypes=(q.dtype,), device=device)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        V.last_dim_contiguous(name, x)
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    V.head_dim("q", d)
    if k.shape[-1] != d:
        raise ValueError(f"k and v must have head dim {d} like q, got {k.shape[-1]}")
    V.heads(hq, hkv)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= 0 or -1 (unbounded), got {tuple(window_size)}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    scale = _default_scale(softmax_scale, d)
    softcap = _softcap(softcap)

    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("q is 3-D (varlen): cu_seqlens_q and cu_seqlens_k are required")
        V.cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], device)
        V.cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], device)
        if cu_seqlens_q.shape != cu_seqlens_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have shape [batch + 1], got "
                             f"{list(cu_seqlens_q.shape)} and {list(cu_seqlens_k.shape)}")
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.numel() > 1 else 0
        V.scalar("max_seqlen_q", max_seqlen_q, kind=int, minimum=0)
        V.scalar("max_seqlen_k", max_seqlen_k, kind=int, minimum=0)
        V.max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q)
        V.max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k)
    else:
        for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k),
                        ("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if x is not None:
                raise ValueError(f"{name} is only for varlen (3-D q); q is 4-D [B, Sq, Hq, D]")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k must have batch {q.shape[0]} like q, got {k.shape[0]}")
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    alibi = V.alibi_slopes(alibi_slopes, cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0], hq, device)

    backend = resolve_backend("prefill", backend, device, q=q, k=k, v=v, varlen=varlen,
                              window_left=left, window_right=right, softcap=softcap, alibi=alibi is not None,
                              softmax_scale=scale)
    extra = () if alibi is None else (alibi,)  # without ALiBi: the same graph as before it existed
    out, lse = torch.ops.kvkernels.prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                     max_seqlen_k, scale, left, right, softcap, backend, *extra)
    return (out, lse) if return_lse else out


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, softmax_scale=None, window_left=-1,
                     softcap=0.0, k_scale=None, v_scale=None, num_splits=0, return_lse=False, kv_cache_dtype="auto",
                     alibi_slopes=None, backend=None):
    """One query token per sequence against its KV cache.

    q [B, Hq, D]; cache_seqlens int32 [B]: sequence b attends to positions [0, cache_seqlens[b]).
    contiguous: k_cache/v_cache [B, S_max, Hkv, D]
    paged:      k_cache/v_cache [num_pages, page_size, Hkv, D], block_table int32 [B, max_pages];
                position p of sequence b is row p % page_size of page block_table[b, p // page_size].
    window_left >= 0: only the last window_left + 1 positions are seen. A cache holds value / scale:
    k_scale/v_scale are numbers or fp32 tensors of shape [] or [Hkv] (default 1), > 0, for fp8
    (float8_e4m3fn or float8_e5m2; K and V in the same format) caches and 16-bit ones alike (vLLM
    passes them for every cache); the kernels fold them into the score scale and the output in fp32.
    The number 1.0 (or None) with a 16-bit cache costs nothing; a tensor is loaded once per head (1.0
    is exact).
    kv_cache_dtype: "auto", or vLLM's "fp8"/"fp8_e4m3" to read uint8 caches as float8_e4m3fn and
    "fp8_e5m2" as float8_e5m2 (a view, no copy).
    -> out [B, Hq, D] in q's dtype (+ lse [B, Hq] fp32). An empty sequence gives out 0, lse -inf.
    num_splits: 0 = heuristic, n >= 1 forces n KV splits.
    alibi_slopes fp32 [Hq] or [B, Hq] (FlashAttention's ALiBi, Sq = 1, Sk = cache_seqlens[b]): the score
    of position j gets -slope[b, h] * (cache_seqlens[b] - 1 - j), after the softcap, unscaled.
    """
    k_cache, v_cache = _cache_storage(k_cache, v_cache, kv_cache_dtype)
    V.tensor("q", q, rank=3, dtypes=V.FLOAT_DTYPES)
    device = q.device
    V.cache_pair(k_cache, v_cache, device)
    if k_cache.dtype != q.dtype and k_cache.dtype not in V.FP8_DTYPES:
        raise TypeError(f"k_cache/v_cache must have q's dtype {q.dtype} or be fp8 ({V.FP8_NAMES}), "
                        f"got {k_cache.dtype}")
    V.last_dim_contiguous("q", q)
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    V.head_dim("q", d)
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache/v_cache must have head dim {d} like q, got {k_cache.shape[3]}")
    V.heads(hq, hkv, kv_name="k_cache")
    V.cache_indexing(k_cache, cache_seqlens, block_table, B, device)
    V.scalar("window_left", window_left, kind=int, minimum=-1)
    V.scalar("num_splits", num_splits, kind=int, minimum=0)
    scale = _default_scale(softmax_scale, d)
    softcap = _softcap(softcap)
    k_scale, v_scale = _attention_scales(k_scale, v_scale, k_cache.dtype, hkv, device)
    V.cache_index_values(k_cache, cache_seqlens, block_table, extra=0)
    alibi = V.alibi_slopes(alibi_slopes, B, hq, device)

    backend = resolve_backend("decode", backend, device, q=q, k_cache=k_cache, v_cache=v_cache,
                              paged=block_table is not None, block_table=block_table, window_left=window_left,
                              softcap=softcap, alibi=alibi is not None)
    extra = () if alibi is None else (alibi,)
    out, lse = torch.ops.kvkernels.decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, scale,
                                                    window_left, softcap, k_scale, v_scale, num_splits,
                                                    config.batch_invariant(), backend, *extra)
    return (out, lse) if return_lse else out


def cache_attention(q, k_cache, v_cache, cache_seqlens, *, cu_seqlens_q=None, max_seqlen_q=None, block_table=None,
                    causal=True, softmax_scale=None, window_left=-1, softcap=0.0, k_scale=None, v_scale=None,
                    num_splits=0, return_lse=False, kv_cache_dtype="auto", alibi_slopes=None, backend=None):
    """Several new query tokens per sequence against its KV cache (chunked prefill, speculative
    verification, prefix reuse, mixed batches of decodes and prefills).

    dense q [B, Sq, Hq, D] (n_b = Sq for every sequence), or ragged q [Tq, Hq, D] with cu_seqlens_q
    int32 [B+1] (sequence b's queries are rows cu[b]..cu[b+1]-1; n_b may be 0). k_cache/v_cache,
    cache_seqlens, block_table, k_scale/v_scale, kv_cache_dtype, softcap, softmax_scale, num_splits: as
    decode_attention.
    The cache already holds these queries' keys and values: cache_seqlens[b] counts sequence b's
    tokens including its n_b new ones, and query i sits at position p = cache_seqlens[b] - n_b + i.
    causal=True: it sees positions [0, p]; causal=False: [0, cache_seqlens[b]). window_left >= 0:
    additionally only positions >= p - window_left. alibi_slopes fp32 [Hq] or [B, Hq]: the score of
    position j gets -slope[b, h] * |p - j| (FlashAttention's ALiBi with Sq = n_b, Sk = cache_seqlens[b]).
    -> out like q, in q's dtype (+ lse [B, Hq, Sq] dense or [Hq, Tq] ragged, fp32 natural log). A query
    that sees nothing gets out 0 and lse -inf. decode_attention(q) equals cache_attention(q[:, None]).

    max_seqlen_q (ragged): the largest n_b; it sizes the launch, so it must not be smaller than any
    n_b. Omitted, it is read from cu_seqlens_q (a device sync). n_b > cache_seqlens[b] > 0 and a too
    small max_seqlen_q are ValueErrors where the values can be read for free (CPU tensors, checked
    mode); a sequence with cache_seqlens[b] == 0 is an idle slot whose queries see nothing, as in
    decode_attention. Unchecked, a query with p < 0 sees nothing.
    """
    k_cache, v_cache = _cache_storage(k_cache, v_cache, kv_cache_dtype)
    V.tensor("q", q, rank=(3, 4), dtypes=V.FLOAT_DTYPES)
    device = q.device
    ragged = q.dim() == 3
    V.cache_pair(k_cache, v_cache, device)
    if k_cache.dtype != q.dtype and k_cache.dtype not in V.FP8_DTYPES:
        raise TypeError(f"k_cache/v_cache must have q's dtype {q.dtype} or be fp8 ({V.FP8_NAMES}), "
                        f"got {k_cache.dtype}")
    V.last_dim_contiguous("q", q)
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k_cache.shape[2]
    V.head_dim("q", d)
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache/v_cache must have head dim {d} like q, got {k_cache.shape[3]}")
    V.heads(hq, hkv, kv_name="k_cache")
    if ragged:
        if cu_seqlens_q is None:
            raise ValueError("q is 3-D [Tq, Hq, D] (ragged): cu_seqlens_q int32 [B+1] is required "
                             "(for one query per sequence use decode_attention, or q[:, None])")
        V.cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], device)
        B = cu_seqlens_q.shape[0] - 1
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if B > 0 else 0
        V.scalar("max_seqlen_q", max_seqlen_q, kind=int, minimum=0)
    else:
        if cu_seqlens_q is not None or max_seqlen_q is not None:
            raise ValueError("cu_seqlens_q/max_seqlen_q are only for ragged (3-D) q; q is 4-D [B, Sq, Hq, D]")
        B = q.shape[0]
        max_seqlen_q = q.shape[1]
    V.cache_indexing(k_cache, cache_seqlens, block_table, B, device)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    V.scalar("window_left", window_left, kind=int, minimum=-1)
    V.scalar("num_splits", num_splits, kind=int, minimum=0)
    scale = _default_scale(softmax_scale, d)
    softcap = _softcap(softcap)
    k_scale, v_scale = _attention_scales(k_scale, v_scale, k_cache.dtype, hkv, device)
    V.cache_index_values(k_cache, cache_seqlens, block_table, extra=0)
    V.query_counts(cache_seqlens, cu_seqlens_q, max_seqlen_q if ragged else None, None if ragged else q.shape[1])
    alibi = V.alibi_slopes(alibi_slopes, B, hq, device)

    backend = resolve_backend("cache_attention", backend, device, q=q, k_cache=k_cache, v_cache=v_cache,
                              paged=block_table is not None, block_table=block_table, ragged=ragged,
                              causal=causal, window_left=window_left, softcap=softcap, alibi=alibi is not None)
    extra = () if alibi is None else (alibi,)
    out, lse = torch.ops.kvkernels.cache_attention(q, k_cache, v_cache, cache_seqlens, cu_seqlens_q, max_seqlen_q,
                                                   block_table, causal, scale, window_left, softcap, k_scale,
                                                   v_scale, num_splits, config.batch_invariant(), backend, *extra)
    return (out, lse) if return_lse else out


def _append_sources(k, v, k_cache, device, rank):
    V.tensor("k", k, rank=rank, dtypes=V.FLOAT_DTYPES, device=device)
    V.tensor("v", v, rank=rank, dtypes=(k.dtype,), device=device)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    V.last_dim_contiguous("k", k)
    V.last_dim_contiguous("v", v)
    if k_cache.dtype not in V.FP8_DTYPES and k.dtype != k_cache.dtype:
        raise TypeError(f"k/v must have the cache's dtype {k_cache.dtype}, got {k.dtype}")
    if tuple(k.shape[-2:]) != tuple(k_cache.shape[-2:]):
        raise ValueError(f"k/v rows must be [Hkv, D] = {list(k_cache.shape[-2:])} like the cache, got {list(k.shape[-2:])}")


def append_kv(k, v, k_cache, v_cache, cache_seqlens, *, block_table=None, k_scale=None, v_scale=None,
              cu_seqlens=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
              kv_cache_dtype="auto", backend=None) -> None:
    """Write new keys/values into the cache in place.

    dense:  k/v [B, S_new, Hkv, D]
    ragged: k/v [T, Hkv, D] with cu_seqlens int32 [B+1]: sequence b's n_b = cu_seqlens[b+1] - cu_seqlens[b]
            tokens are rows cu_seqlens[b] .. cu_seqlens[b+1] - 1 (n_b may be 0), so a batch mixing
            1-token decodes and long prompt chunks appends in one launch.
    Token i of sequence b goes to position cache_seqlens[b] + i (through block_table when paged).
    cache_seqlens is not modified. fp8 caches store saturate(value / scale) rounded to nearest even
    (float8_e4m3fn: to +-448, NaN keeping its sign; float8_e5m2: to +-57344, infinities included, NaN
    becoming 0x7F, as the hardware's cvt.rn.satfinite converts; kvkernels.reference.quantize); 16-bit
    caches given a scale other than the number 1.0 store value / scale rounded to the cache dtype (a
    scale of 1 is exact).
    kv_cache_dtype: as decode_attention ("fp8" writes uint8 storage through a float8_e4m3fn view,
    "fp8_e5m2" through a float8_e5m2 view).
    Nothing outside the written slots changes, bit for bit. Index values (cu_seqlens offsets, capacity per sequence, pages,
    a slot written twice through a shared page) are checked where that costs no device sync (CPU
    tensors, or checked mode); a call that fails validation writes nothing.

    Fused rotary embedding (keys only): rotary_cos/rotary_sin [max_position, rotary_dim / 2], k's
    dtype or float32, k float16/bfloat16/float32. Key i of sequence b is rotated at position
    cache_seqlens[b] + i before it is stored: its first rotary_dim dims (2 <= rotary_dim <= D; the
    rest pass through unchanged) in pairs (x[j], x[j + rotary_dim/2]) (GPT-NeoX, rotary_interleaved=
    False) or (x[2j], x[2j+1]) (GPT-J, True), x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, computed
    in float32 and rounded once to the cache dtype (fp8: quantized once with k_scale). Values are
    stored as they are, in the same launch. Every position must be < max_position (checked with the
    other index values; unchecked, a token past the table is not written). Queries: apply_rotary.
    """
    k_cache, v_cache = _cache_storage(k_cache, v_cache, kv_cache_dtype)
    if not isinstance(k_cache, torch.Tensor):
        raise TypeError(f"k_cache must be a torch.Tensor, got {type(k_cache).__name__}")
    device = k_cache.device
    V.cache_pair(k_cache, v_cache, device)
    ragged = cu_seqlens is not None
    if ragged and isinstance(k, torch.Tensor) and k.dim() == 4:
        raise ValueError(f"cu_seqlens is only for ragged k/v [T, Hkv, D]; k is 4-D {list(k.shape)} "
                         f"[B, S_new, Hkv, D] (drop cu_seqlens, or pass k.flatten(0, 1))")
    if not ragged and isinstance(k, torch.Tensor) and k.dim() == 3:
        raise ValueError(f"k must have 4 dimensions [B, S_new, Hkv, D], got shape {tuple(k.shape)}; a 3-D k is "
                         f"ragged [T, Hkv, D] and needs cu_seqlens int32 [B+1]")
    _append_sources(k, v, k_cache, device, rank=3 if ragged else 4)
    if ragged:
        V.tensor("cu_seqlens", cu_seqlens, rank=1, dtypes=V.INDEX_DTYPES, device=device)
        if cu_seqlens.shape[0] < 1:
            raise ValueError(f"cu_seqlens must have shape [batch + 1], got {list(cu_seqlens.shape)}")
        B, s_new = cu_seqlens.shape[0] - 1, 0
    else:
        B, s_new = k.shape[:2]
    hkv = k_cache.shape[2]
    V.cache_indexing(k_cache, cache_seqlens, block_table, B, device)
    k_fold, v_fold = V.unquantized_scales(k_scale, v_scale, k_cache.dtype, hkv, device)
    k_scale, v_scale = V.fp8_scales(k_scale, v_scale, k_cache.dtype, hkv, device)
    max_position = V.rotary_tables(rotary_cos, rotary_sin, k, "k", rotary_interleaved, device)
    V.append_index_values(k_cache, cache_seqlens, block_table, cu_seqlens, s_new, k.shape[0], max_position)

    rotary = max_position is not None
    backend = resolve_backend("append", backend, device, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                              paged=block_table is not None, ragged=ragged, rotary_cos=rotary_cos if rotary else None)
    k, v, rotary = _divide_16bit_scales(k, v, k_fold, v_fold, rotary, rotary_cos, rotary_sin, rotary_interleaved,
                                        lambda: _token_positions(cache_seqlens, cu_seqlens, k))
    if rotary:
        torch.ops.kvkernels.append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, backend,
                                      cu_seqlens, rotary_cos, rotary_sin, rotary_interleaved)
    else:  # the same graph as before rotary existed
        torch.ops.kvkernels.append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, backend,
                                      cu_seqlens)


def _token_positions(cache_seqlens, cu_seqlens, k):
    """Position of every new token (dense [B, S_new], ragged [T]) without reading values on the host."""
    if cu_seqlens is None:
        return cache_seqlens.long()[:, None] + torch.arange(k.shape[1], device=k.device)
    starts = cu_seqlens.long()
    seq = torch.repeat_interleave(torch.arange(starts.numel() - 1, device=k.device), starts[1:] - starts[:-1],
                                  output_size=k.shape[0])
    return cache_seqlens.long()[seq] + torch.arange(k.shape[0], device=k.device) - starts[seq]


def _divide_16bit_scales(k, v, k_fold, v_fold, rotary, cos, sin, interleaved, positions):
    """k/v divided by the scales of a 16-bit cache (fp32, rounded once; None: nothing to divide).
    A scaled cache stores rotate(k) / scale, so a rotated k is rotated here, in fp32 at positions(),
    before the division, and the kernel then stores it as it is. -> (k, v, whether the kernel rotates)."""
    if k_fold is not None and rotary:
        from . import reference
        wide = reference.rotary_fp32(k, cos, sin, positions(), interleaved)
        k, rotary = (wide / k_fold.unsqueeze(-1)).to(k.dtype), False
    elif k_fold is not None:
        k = _scale_rows(k, k_fold.unsqueeze(-1), torch.div)
    if v_fold is not None:
        v = _scale_rows(v, v_fold.unsqueeze(-1), torch.div)
    return k, v, rotary


def append_kv_slots(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None, positions=None,
                    rotary_cos=None, rotary_sin=None, rotary_interleaved=False, kv_cache_dtype="auto",
                    backend=None) -> None:
    """Write token t at slot slot_mapping[t], in place (vLLM's reshape_and_cache).

    k/v [T, Hkv, D]; slot_mapping int32/int64 [T]; slot s -> page s // page_size, row s % page_size of a
    [num_pages, page_size, Hkv, D] cache (a contiguous [B, S_max, Hkv, D] cache is addressed as its
    flattened B * S_max rows). Negative slots are skipped. k_scale/v_scale and kv_cache_dtype as append_kv.
    rotary_cos/rotary_sin/rotary_interleaved: as append_kv, key t rotated at positions[t]; positions
    int32/int64 [T] is required with them (and only with them). A written token's position must be in
    [0, max_position) (checked where that costs no sync; unchecked, a token past the table is not written).
    """
    k_cache, v_cache = _cache_storage(k_cache, v_cache, kv_cache_dtype)
    if not isinstance(k_cache, torch.Tensor):
        raise TypeError(f"k_cache must be a torch.Tensor, got {type(k_cache).__name__}")
    device = k_cache.device
    V.cache_pair(k_cache, v_cache, device)
    _append_sources(k, v, k_cache, device, rank=3)
    V.tensor("slot_mapping", slot_mapping, rank=1, dtypes=(torch.int32, torch.int64), device=device)
    V.shape("slot_mapping", slot_mapping, (k.shape[0],), "one slot per token")
    k_fold, v_fold = V.unquantized_scales(k_scale, v_scale, k_cache.dtype, k_cache.shape[2], device)
    k_scale, v_scale = V.fp8_scales(k_scale, v_scale, k_cache.dtype, k_cache.shape[2], device)
    max_position = V.rotary_tables(rotary_cos, rotary_sin, k, "k", rotary_interleaved, device)
    rotary = max_position is not None
    if rotary and positions is None:
        raise ValueError("append_kv_slots with rotary_cos/rotary_sin needs positions int32/int64 [T] "
                         "(each token's position in its sequence)")
    if not rotary and positions is not None:
        raise ValueError("positions is only used by the rotary embedding: pass rotary_cos and rotary_sin too")
    if rotary:
        V.rotary_positions("positions", positions, (k.shape[0],), max_position, device, keep=slot_mapping >= 0)
    if V.values_checkable(slot_mapping) and slot_mapping.numel():
        slot_mapping_host = V.host_copies(slot_mapping)[0]
        rows = k_cache.shape[0] * k_cache.shape[1]
        hi = int(slot_mapping_host.max())
        if hi >= rows:
            raise ValueError(f"slot_mapping.max() = {hi} is past the cache's {rows} slots (pages * page_size)")
        kept = slot_mapping_host[slot_mapping_host >= 0]
        if kept.numel() != torch.unique(kept).numel():
            raise ValueError("slot_mapping writes the same slot twice (the result would be undefined)")

    backend = resolve_backend("append_slots", backend, device, k=k, v=v, k_cache=k_cache, v_cache=v_cache,
                              paged=True, rotary_cos=rotary_cos if rotary else None)
    k, v, rotary = _divide_16bit_scales(k, v, k_fold, v_fold, rotary, rotary_cos, rotary_sin, rotary_interleaved,
                                        lambda: positions)
    if rotary:
        torch.ops.kvkernels.append_kv_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, backend,
                                            positions, rotary_cos, rotary_sin, rotary_interleaved)
    else:
        torch.ops.kvkernels.append_kv_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, backend)


def apply_rotary(x, cos, sin, positions, *, interleaved=False, inplace=False):
    """Rotary embedding of queries (or keys kept outside a kvkernels cache): the same rotation, bit for
    bit, that append_kv(..., rotary_cos=cos, rotary_sin=sin) applies to the keys it stores.

    x [..., H, D] float16/bfloat16/float32, e.g. q [B, S, H, D] or ragged q [T, H, D]; positions
    int32/int64 of shape x.shape[:-2] ([B, S] or [T]): one position per token, shared by its H heads.
    cos/sin [max_position, rotary_dim / 2] (x's dtype or float32), interleaved: as append_kv's
    rotary_cos/rotary_sin/rotary_interleaved. Computed in float32, rounded once to x's dtype.
    -> a new tensor like x, or x itself rotated in place (inplace=True).
    Plain PyTorch (a few elementwise kernels on any device, traceable by torch.compile). Position values
    are checked against the table where that costs no sync (CPU tensors, or checked mode); unchecked, a
    position past the table fails in torch's indexing of cos/sin (on a GPU, a device-side assert).
    """
    V.tensor("x", x, rank=(3, 4, 5), dtypes=V.FLOAT_DTYPES)
    device = x.device
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {interleaved!r}")
    if cos is None or sin is None:
        raise ValueError("apply_rotary needs both cos and sin [max_position, rotary_dim / 2]")
    max_position = V.rotary_tables(cos, sin, x, "x", interleaved, device)
    V.rotary_positions("positions", positions, tuple(x.shape[:-2]), max_position, device)
    from . import reference
    out = reference.apply_rotary(x, cos, sin, positions, interleaved=interleaved)
    if inplace:
        x.copy_(out)
        return x
    return out


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Combine attention results over two disjoint key sets (split-KV, shared prefix + suffix).

    out_* [..., H, D], lse_* [..., H] fp32 natural log -> (out [..., H, D] in out_a's dtype, lse fp32).
    A side with lse -inf is empty, and so is one with lse +inf (how FlashAttention 2 and vLLM mark an
    empty partial state); an empty side's out is never read. Both empty gives out 0 and lse -inf.
    Our lse is natural-log; FlashInfer's is base 2: lse = lse2 * ln 2. See merge_states for N states.
    """
    V.tensor("out_a", out_a, rank=tuple(range(2, 6)), dtypes=V.FLOAT_DTYPES)
    device = out_a.device
    V.tensor("out_b", out_b, rank=out_a.dim(), dtypes=V.FLOAT_DTYPES, device=device)
    V.tensor("lse_a", lse_a, rank=out_a.dim() - 1, dtypes=(torch.float32, torch.float64), device=device)
    V.tensor("lse_b", lse_b, rank=out_a.dim() - 1, dtypes=(torch.float32, torch.float64), device=device)
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must have the same shape, got {list(out_a.shape)} and {list(out_b.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != out_a.shape[:-1]:
            raise ValueError(f"{name} must have shape {list(out_a.shape[:-1])} (out's shape without D), "
                             f"got {list(lse.shape)}")
    from . import reference
    return reference.merge_attention_states(out_a, lse_a, out_b, lse_b)


def merge_states(outs, lses):
    """Combine attention results over N disjoint key sets in one call (FlashInfer's merge_states).

    outs [N, ..., H, D] (N states stacked on dim 0, or a list of N tensors [..., H, D]);
    lses [N, ..., H] fp32 natural log (or a list) -> (out [..., H, D] in outs' dtype, lse [..., H] fp32).
    States are combined in index order with weights relative to the largest lse: deterministic, and
    as exact as merge_attention_states. lse -inf or +inf marks an empty state, whose out is never
    read; all empty gives out 0 and lse -inf. Natural log: FlashInfer's base-2 lse2 is lse / ln 2.
    """
    if isinstance(outs, (list, tuple)):
        if not outs:
            raise ValueError("outs must hold at least one state")
        for i, o in enumerate(outs):
            V.tensor(f"outs[{i}]", o, rank=tuple(range(2, 6)), dtypes=V.FLOAT_DTYPES, device=outs[0].device)
        outs = torch.stack(list(outs))
    if isinstance(lses, (list, tuple)):
        if not lses:
            raise ValueError("lses must hold at least one state")
        for i, l in enumerate(lses):
            V.tensor(f"lses[{i}]", l, rank=tuple(range(1, 5)), dtypes=(torch.float32, torch.float64),
                     device=lses[0].device)
        lses = torch.stack(list(lses))
    V.tensor("outs", outs, rank=tuple(range(3, 7)), dtypes=V.FLOAT_DTYPES)
    V.tensor("lses", lses, rank=outs.dim() - 1, dtypes=(torch.float32, torch.float64), device=outs.device)
    if lses.shape != outs.shape[:-1]:
        raise ValueError(f"lses must have shape {list(outs.shape[:-1])} (outs' shape without D), "
                         f"got {list(lses.shape)}")
    if outs.shape[0] < 1:
        raise ValueError("outs must hold at least one state (dim 0 is the state index)")
    from . import reference
    return reference.merge_states(outs, lses)
