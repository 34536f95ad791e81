"""CUDA append: torch.ops.kvkernels_C.append_kv / append_kv_slots (csrc/kernels/append.cuh).

What the kernels take (anything else gets a reason from `unsupported`, and auto selection gives
the call to Triton):
  * dense k/v [B, S_new, Hkv, D], or ragged k/v [T, Hkv, D] with cu_seqlens [B + 1] (each token's
    sequence found by binary search in the kernel);
  * caches of any dtype written from sources of the same dtype (a bit copy), or float8_e4m3fn /
    float8_e5m2 caches written from float16 / bfloat16 / float32 sources (saturate(value / scale),
    bit-exact with kvkernels.reference.quantize);
  * any head dim whose cache row is a whole number of 16-byte vectors (D * cache element size % 16
    == 0: D % 8 for fp16/bf16, D % 16 for fp8, D % 4 for fp32), any number of heads;
  * any strides, as long as every tensor (k, v, k_cache, v_cache) starts 16-byte aligned, its last
    dimension is contiguous and every other stride of a dimension longer than 1 is a multiple of
    16 bytes: each thread moves one 16-byte vector;
  * a fused rotary embedding of the keys (rotary_cos/rotary_sin, any rotary_dim <= D) for float16,
    bfloat16 and float32 keys, into caches of their dtype or fp8, bit-exact with
    kvkernels.reference.rotary_fp32 (an extension built before rotary declines these calls).
"""

from __future__ import annotations

import functools

import torch

from . import device_reason, layout_reason, ops

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FP8_SOURCES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1
_THREADS = 128  # kAppendThreads in csrc/kernels/append.cuh
_MAX_GRID_Y = 65535


@functools.lru_cache(maxsize=None)
def _has_rotary(device_type: str) -> bool:
    """An extension built before the rotary kernels has no rotary_cos argument."""
    schema = ops(torch.device(device_type)).append_kv.default._schema
    return any(a.name == "rotary_cos" for a in schema.arguments)


@functools.lru_cache(maxsize=None)
def _has_ragged(device_type: str) -> bool:
    """An extension built before ragged appends has no cu_seqlens argument: auto selection then
    gives ragged calls to Triton instead of failing in the raw op."""
    schema = ops(torch.device(device_type)).append_kv.default._schema
    return any(a.name == "cu_seqlens" for a in schema.arguments)


def unsupported(op: str, *, k, k_cache, v=None, v_cache=None, ragged=False, rotary_cos=None, **_) -> str | None:
    op_name = "append_kv" if op == "append" else "append_kv_slots"
    tensors = {"k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache}
    reason = device_reason(op_name, tensors)
    if reason:
        return reason
    if rotary_cos is not None and not _has_rotary(k_cache.device.type):
        return "this build of the extension has no fused rotary append kernel (rebuild it)"
    if ragged and not _has_ragged(k_cache.device.type):
        return "this build of the extension has no ragged append_kv kernel (rebuild it)"
    if k_cache.dtype in _FP8:
        if k.dtype not in _FP8_SOURCES:
            return f"an fp8 cache is written from float16, bfloat16 or float32 sources, not {k.dtype}"
    elif k.dtype != k_cache.dtype:
        return f"k dtype {k.dtype} differs from the cache dtype {k_cache.dtype}"
    d = k_cache.shape[-1]
    row_bytes = d * k_cache.element_size()
    if row_bytes % 16:
        return f"head dim {d} of {k_cache.dtype} is not a whole number of 16-byte vectors"
    for name, t in tensors.items():
        reason = None if t is None else layout_reason(name, t)
        if reason:
            return reason
    tokens = k.shape[0] * (k.shape[1] if k.dim() == 4 else 1)  # [B, S_new, ...] or [T, ...] (slots, ragged)
    row_vecs = k_cache.shape[2] * row_bytes // 16
    if tokens > _INT32_MAX or row_vecs > _INT32_MAX or -(-row_vecs // _THREADS) > _MAX_GRID_Y:
        return f"{tokens} tokens of {row_vecs} vectors is too large for one launch"
    return None


def append(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, cu_seqlens=None,
           rotary_cos=None, rotary_sin=None, rotary_interleaved=False) -> None:
    """k/v [B, S_new, Hkv, D], or ragged [T, Hkv, D] with cu_seqlens int32 [B + 1]; caches [B, S_max, Hkv, D]
    or paged [pages, page_size, Hkv, D] with block_table int32 [B, max_pages]; cache_seqlens int32 [B];
    k_scale/v_scale fp32 [Hkv] (fp8); rotary_cos/rotary_sin [max_position, rotary_dim / 2]."""
    if rotary_cos is not None:
        ops(k_cache.device).append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale,
                                      cu_seqlens, rotary_cos, rotary_sin, rotary_interleaved)
    elif cu_seqlens is None:  # the dense call keeps working with an extension built before the ragged kernels
        ops(k_cache.device).append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale)
    else:
        ops(k_cache.device).append_kv(k, v, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale,
                                      cu_seqlens)


def append_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, positions=None, rotary_cos=None,
                 rotary_sin=None, rotary_interleaved=False) -> None:
    """k/v [T, Hkv, D]; caches [pages, page_size, Hkv, D]; slot_mapping int32/int64 [T], s < 0 skipped;
    rotary: key t rotated at positions[t] (int32/int64 [T])."""
    if rotary_cos is not None:
        ops(k_cache.device).append_kv_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, positions,
                                            rotary_cos, rotary_sin, rotary_interleaved)
    else:
        ops(k_cache.device).append_kv_slots(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
