"""The "cuda" backend: thin Python wrappers over the raw ops of the compiled extension
(`torch.ops.kvkernels_C.*`, registered by csrc/ops/*.cpp), one module per op:
append.py, decode.py, prefill.py. Entry points follow the normalised signatures of kvkernels.api.
"""

from __future__ import annotations

import functools

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


def _submodule(op: str):
    if op in ("append", "append_slots"):
        from . import append
        return append
    if op == "decode":
        from . import decode
        return decode
    if op == "prefill":
        from . import prefill
        return prefill
    raise ValueError(op)


def unsupported(op: str, **kw) -> str | None:
    reason = _load()
    if reason:
        return reason
    try:
        module = _submodule(op)
    except ImportError:
        return f"no CUDA {op} kernel in this build"
    return module.unsupported(op, **kw)


def prefill(*args):
    from . import prefill as _prefill
    return _prefill.prefill(*args)


def decode(*args):
    from . import decode as _decode
    return _decode.decode(*args)


def append(*args):
    from . import append as _append
    return _append.append(*args)


def append_slots(*args):
    from . import append as _append
    return _append.append_slots(*args)
