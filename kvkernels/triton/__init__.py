"""The "triton" backend: one module per op (prefill.py, decode.py, append.py), each a private
@triton.jit kernel with its formula in the docstring and a thin launcher beside it. Entry points
follow the normalised signatures of kvkernels.api.

Without a CUDA device Triton can only interpret, so TRITON_INTERPRET=1 is set before any kernel is
defined; that is how the CPU test suite runs these kernels on CPU tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_reason(*tensors) -> str | None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRET:
            return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing kvkernels")
        if t.device.type not in ("cpu", "cuda"):
            return f"tensors on {t.device.type} are not supported by Triton here"
    return None


def unsupported(op: str, **kw) -> str | None:
    reason = _device_reason(*(v for v in kw.values() if isinstance(v, torch.Tensor)))
    if reason:
        return reason
    module = _submodule(op)
    return module.unsupported(op, **kw)


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


def prefill(*args):
    from .prefill import prefill as run
    return run(*args)


def decode(*args):
    from .decode import decode as run
    return run(*args)


def append(*args):
    from .append import append as run
    return run(*args)


def append_slots(*args):
    from .append import append_slots as run
    return run(*args)
