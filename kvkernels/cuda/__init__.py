"""The "cuda" backend: thin Python wrappers over the raw ops of the compiled extension
(`torch.ops.kvkernels_C.*`, registered by csrc/ops/*.cpp), one module per op:
append.py, decode.py, prefill.py. Entry points follow the normalised signatures of kvkernels.api.
"""

from __future__ import annotations

import functools
import importlib

import torch

@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Import the extension; returns why it is unusable, or None."""
    try:
        import kvkernels._C  # noqa: F401  (registers torch.ops.kvkernels_C)
    except ImportError as e:
        return f"the CUDA extension kvkernels._C is not built ({e}); build with nvcc on PATH: " \
               f"pip install --no-build-isolation -e ."
    return None


def available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def has_op(name: str) -> bool:
    return available() and hasattr(torch.ops.kvkernels_C, name)


def layout_reason(name: str, t: torch.Tensor) -> str | None:
    """Why the kernels cannot read or write `t` as 16-byte vectors, or None if they can: its start
    must be 16-byte aligned, its last dimension contiguous and every other stride (of a dimension
    longer than 1) a multiple of 16 bytes. An empty tensor is never touched, so anything goes."""
    if t.numel() == 0:
        return None
    if t.data_ptr() % 16:
        return f"{name} does not start at a 16-byte aligned address"
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return f"{name} is not contiguous in its last dimension"
    for dim in range(t.dim() - 1):
        if t.shape[dim] > 1 and (t.stride(dim) * t.element_size()) % 16:
            return f"{name} stride {t.stride(dim)} of dim {dim} is not a multiple of 16 bytes"
    return None


_SUBMODULES = {"append": "append", "append_slots": "append", "decode": "decode", "prefill": "prefill",
               "cache_attention": "cache_attn"}


def _submodule(op: str):
    if op not in _SUBMODULES:
        raise ValueError(op)
    return importlib.import_module(f"{__name__}.{_SUBMODULES[op]}")


def unsupported(op: str, **kw) -> str | None:
    reason = _load()
    if reason:
        return reason
    try:
        module = _submodule(op)
    except ImportError:
        return f"no CUDA {op} kernel in this build"
    return module.unsupported(op, **kw)


# Entry points carry the public ops' names, distinct from the submodules' names (prefill, decode,
# append), which importing a submodule binds as attributes of this package.


def prefill_attention(*args):
    return _submodule("prefill").prefill(*args)


def decode_attention(*args):
    return _submodule("decode").decode(*args)


def cache_attention(*args):
    return _submodule("cache_attention").cache_attention(*args)


def append_kv(*args):
    return _submodule("append").append(*args)


def append_kv_slots(*args):
    return _submodule("append_slots").append_slots(*args)

