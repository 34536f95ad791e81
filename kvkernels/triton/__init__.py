"""The "triton" backend: one module per op (prefill.py, decode.py, append.py), each a private
@triton.jit kernel with its formula in the docstring and a thin launcher beside it. Entry points
follow the normalised signatures of kvkernels.api.

Without a CUDA device Triton can only interpret, so TRITON_INTERPRET=1 is set before any kernel is
defined; that is how the CPU test suite runs these kernels on CPU tensors.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

# Triton picks interpreted or compiled functions when it defines them, its own helpers included:
# switching the interpreter on after `import triton` leaves those helpers compiled-only.
_LATE = "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Target:
    """The GPU a launch is planned for: its compute capability and its per-block shared-memory limit
    (the opt-in maximum a kernel may request; sm_80 166 912 B, sm_86/sm_89 101 376 B, sm_90 232 448 B).
    Launch configurations are chosen from these numbers, so a new GPU gets configs that fit it."""
    capability: tuple[int, int]
    max_shared_mem: int

    @property
    def arch(self) -> int:
        return self.capability[0] * 10 + self.capability[1]


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if not smem:  # the same attribute Triton checks a compiled kernel against at load time
        import triton
        smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return Target((props.major, props.minor), int(smem))


def device_target(device: torch.device) -> Target | None:
    """The Target of a CUDA device; None for CPU tensors (the interpreter has no hardware limits)."""
    if device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class KernelConfig:
    """Block-size constexprs and the launch options of one configuration."""
    meta: tuple[tuple[str, int], ...]  # (("BLOCK_M", 64), ...): hashable, so autotuners can be cached
    num_warps: int = 4
    num_stages: int = 2

    def kwargs(self) -> dict:
        return {**dict(self.meta), "num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclass
class Launch:
    """One kernel launch as a wrapper plans it: grid(meta) -> grid, the positional arguments and the
    constexprs, and the configurations it may run with (one: fixed; several: autotuned over them,
    keyed by autotune_key). tests/test_triton_aot.py compiles these same launches ahead of time for
    sm_80, sm_89 and sm_90, so what it checks is what the wrappers run."""
    kernel: object
    grid: Callable[[dict], tuple]
    args: tuple
    constexprs: dict
    configs: tuple[KernelConfig, ...]
    autotune_key: tuple[str, ...] = ()
    name: str = field(default="")

    def run(self) -> None:
        if len(self.configs) == 1:
            cfg = self.configs[0]
            meta = {**self.constexprs, **cfg.kwargs()}
            self.kernel[self.grid(meta)](*self.args, **meta)
        else:
            _autotuned(self.kernel, self.configs, self.autotune_key)[self.grid](*self.args, **self.constexprs)


@functools.lru_cache(maxsize=None)
def _autotuned(kernel, configs: tuple[KernelConfig, ...], key: tuple[str, ...]):
    import triton
    return triton.autotune(configs=[triton.Config(dict(c.meta), num_warps=c.num_warps, num_stages=c.num_stages)
                                    for c in configs], key=list(key))(kernel)


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

