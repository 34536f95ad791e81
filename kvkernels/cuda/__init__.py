"""The "cuda" backend: thin Python wrappers over the raw ops of the compiled extension
(`torch.ops.kvkernels_C.*`, registered by csrc/ops/*.cpp), one module per op:
append.py, decode.py, prefill.py. Entry points follow the normalised signatures of kvkernels.api.

CPU tensors run the same kernels in the CUDA emulator (`torch.ops.kvkernels_emu.*`, csrc/emu/).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

# Where the kernels run: CUDA tensors on the GPU (kvkernels._C, ops torch.ops.kvkernels_C), CPU
# tensors in the CUDA emulator (kvkernels._emu, ops torch.ops.kvkernels_emu: the same kernel source
# built as host C++, csrc/emu/), just as backend="triton" on CPU tensors runs the Triton interpreter.
EMULATOR_CAPABILITY = (8, 0)  # the device csrc/emu/ plays by default (an A100)
EMULATOR_SMEM_OPTIN = 166912  # sm_80's per-block shared memory limit, enforced by the emulator
# ... and the one it plays for the prefill's path 90 (an H100: sm_90a's wgmma, TMA, mbarriers).
EMULATOR_SM90_CAPABILITY = (9, 0)
EMULATOR_SM90_SMEM_OPTIN = 232448
EMULATOR_SM_COUNT = 108       # an A100's, for the split planner


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Import the extension; returns why it is unusable, or None."""
    try:
        import kvkernels._C  # noqa: F401  (registers torch.ops.kvkernels_C)
    except ImportError as e:
        return f"the CUDA extension kvkernels._C is not built ({e}); build with nvcc on PATH: " \
               f"pip install --no-build-isolation -e ."
    return None


@functools.lru_cache(maxsize=None)
def _load_emulator() -> str | None:
    """Import the emulator build; returns why it is unusable, or None."""
    variant = os.environ.get("KVKERNELS_EMU_LIBRARY")
    if variant:  # another build of the emulator (sanitized, or a deliberately broken one in the tests)
        try:
            torch.ops.load_library(variant)
        except OSError as e:
            return f"KVKERNELS_EMU_LIBRARY={variant} does not load: {e}"
        return None
    try:
        import kvkernels._emu  # noqa: F401  (registers torch.ops.kvkernels_emu)
    except ImportError as e:
        return f"the CUDA emulator kvkernels._emu is not built ({e}); it builds with the extension " \
               f"(pip install --no-build-isolation -e ., unless KVKERNELS_SKIP_EMU=1)"
    return None


def available() -> bool:
    """The GPU build or the emulator is importable."""
    return _load() is None or _load_emulator() is None


def emulator_available() -> bool:
    return _load_emulator() is None


def extension_reason() -> str | None:
    """Why the GPU build kvkernels._C is unusable, or None."""
    return _load()


def emulator_reason() -> str | None:
    """Why the emulator build kvkernels._emu is unusable, or None."""
    return _load_emulator()


def unavailable_reason() -> str | None:
    if available():
        return None
    return f"{_load()}; {_load_emulator()}"


def ops(device: torch.device):
    """The raw-op namespace for tensors on `device`: the emulator's for the CPU."""
    return torch.ops.kvkernels_emu if device.type == "cpu" else torch.ops.kvkernels_C


def emulated(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def has_op(name: str, device_type: str = "cuda") -> bool:
    if device_type == "cpu":
        return _load_emulator() is None and hasattr(torch.ops.kvkernels_emu, name)
    return _load() is None and hasattr(torch.ops.kvkernels_C, name)


def device_capability(index: int | None) -> tuple[int, int] | None:
    """The compute capability of CUDA device `index` (None: the current one), or None when no device
    can be queried (a machine without a GPU, where only stand-in CUDA tensors exist)."""
    if not torch.cuda.is_available():
        return None
    return _capability(index if index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST the extension was built with."""
    from ..info import build_info
    return (build_info() or {}).get("archs") or "8.0;9.0a"


def device_reason(op_name: str, tensors: dict) -> str | None:
    """Why the kernel `op_name` cannot run where these tensors live, or None if it can: they must all
    be CUDA tensors of a device the binary holds code for (an sm_100 or sm_120 device gets no kernel
    image from an "8.0;9.0a" build), or all CPU tensors with the emulator built."""
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) != 1:
        return f"tensors on several devices: {sorted(str(d) for d in devices)}"
    device = devices.pop()
    if device.type == "cpu":
        reason = _load_emulator()
        if reason:
            return reason
        if not has_op(op_name, "cpu"):
            return f"this build of the emulator has no {op_name} kernel"
        return None
    if device.type != "cuda":
        name = next(n for n, t in tensors.items() if t is not None)
        return f"{name} is on {device}, the CUDA kernels need CUDA tensors (or CPU tensors, emulated)"
    reason = _load()
    if reason:
        return reason
    if not has_op(op_name):
        return f"this build of the extension has no {op_name} kernel"
    from .prefill import runnable_paths  # the cubin rules live with the prefill path choice
    capability = device_capability(device.index)
    if capability is not None and not runnable_paths(capability, arch_list()):
        return (f"the extension holds no code for compute capability {capability[0]}.{capability[1]} "
                f"(built for {arch_list()})")
    return None


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
    if not available():
        return unavailable_reason()
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

