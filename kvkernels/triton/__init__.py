"""The "triton" backend: one module per op (prefill.py, decode.py, append.py), each a private
@triton.jit kernel with its formula in the docstring and a thin launcher beside it. Entry points
follow the normalised signatures of kvkernels.api.

Without a CUDA device Triton can only interpret, so TRITON_INTERPRET=1 is set before any kernel is
defined; that is how the CPU test suite runs these kernels on CPU tensors.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

# Triton picks interpreted or compiled functions when it defines them, its own helpers included:
# switching the interpreter on after `import triton` leaves those helpers compiled-only.
_LATE = "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_reason(*tensors) -> str | None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRET:
            return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing kvkernels")
        if t.device.type == "cpu" and _LATE:
            return ("triton was imported before kvkernels without TRITON_INTERPRET=1, so its interpreter is "
                    "incomplete; set TRITON_INTERPRET=1 or import kvkernels first")
        if t.device.type not in ("cpu", "cuda"):
            return f"tensors on {t.device.type} are not supported by Triton here"
    return None


def unsupported(op: str, **kw) -> str | None:
    reason = _device_reason(*(v for v in kw.values() if isinstance(v, torch.Tensor)))
    if reason:
        return reason
    module = _submodule(op)
    return module.unsupported(op, **kw)


_SUBMODULES = {"append": "append", "append_slots": "append", "decode": "decode", "prefill": "prefill",
               "cache_attention": "cache_attn"}


def _submodule(op: str):
    if op not in _SUBMODULES:
        raise ValueError(op)
    return importlib.import_module(f"{__name__}.{_SUBMODULES[op]}")


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

