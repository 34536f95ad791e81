"""CUDA prefill: torch.ops.kvkernels_C.prefill (csrc/kernels/prefill_sm80.cuh, prefill_sm90.cuh).

Two kernels, one chosen per call by the device's compute capability (`select_path`):
  path 90  wgmma + TMA + warp specialisation, in the sm_90a cubin: compute capability 9.0
           (H100/H200) when the tensors suit TMA (no zero strides);
  path 80  mma.sync + ldmatrix + cp.async: every other sm_80+ device the build has SASS for
           (sm_80/86/87/89 from the sm_80 cubin), and H100 when path 90 cannot take the call:
           calls with alibi_slopes (ALiBi is in the path-80 kernel only) or tensors TMA cannot take.
KVKERNELS_PREFILL_PATH=80 or 90 forces one (e.g. to test or time the sm80 kernel on an H100);
auto otherwise. The emulator (CPU tensors) runs path 80 unless forced to 90.

What the kernels take (anything else gets a reason from `unsupported`, and auto selection gives
the call to Triton): float16/bfloat16; head dims 64, 128, 256; any GQA group; dense or varlen;
any causal/window/softcap; ALiBi (path 80; not with a softcap at D = 256); q, k, v starting 16-byte
aligned, contiguous in the last dimension, every other stride of a dimension longer than 1 a multiple
of 16 bytes (tiles travel as 16-byte copies).

This wrapper allocates out and lse from shapes and never reads tensor values, so a call is
CUDA-graph capturable and the raw op allocates nothing.
"""

from __future__ import annotations

import functools
import os

import torch

from . import (EMULATOR_CAPABILITY, EMULATOR_SM90_CAPABILITY, EMULATOR_SM90_SMEM_OPTIN, EMULATOR_SMEM_OPTIN, _load,
               arch_list, device_reason, emulated, layout_reason, ops)

HEAD_DIMS = (64, 128, 256)
PATH_SM80 = 80
PATH_SM90 = 90
PATHS = (PATH_SM90, PATH_SM80)  # preference order
_DTYPES = (torch.float16, torch.bfloat16)
_MAX_GRID_YZ = 65535         # CUDA grid y (query heads) and z (sequences)
_MAX_TOKENS = 2**30          # Tq + Tk: int32 row arithmetic in the kernels (csrc/ops/prefill.cpp)
_PATH_ENV = "KVKERNELS_PREFILL_PATH"


# ----------------------------------------------------------------------------- path selection


def parse_archs(arch_list: str) -> list[tuple[int, int, str, bool]]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "8.6+PTX", "8.0 9.0a") -> [(major, minor, suffix, ptx)]."""
    out = []
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        entry = entry.removesuffix("+PTX")
        major, _, rest = entry.partition(".")
        minor = "".join(c for c in rest if c.isdigit())
        suffix = rest[len(minor):]
        out.append((int(major), int(minor or 0), suffix, ptx))
    return out


def runnable_paths(capability: tuple[int, int], arch_list: str) -> tuple[int, ...]:
    """The prefill paths whose kernels have code this device can run, preferred first.

    Every cubin holds both kernels, but the path-90 kernel is real only in the sm_90a cubin (a trap
    elsewhere), and an arch-specific ("a") cubin runs only on exactly its architecture. A plain
    sm_XY cubin runs on sm_XZ with Z >= Y (same major); PTX of compute_XY JIT-compiles for any
    newer device.
    """
    major, minor = capability
    if major < 8:
        return ()
    archs = parse_archs(arch_list)
    paths = []
    if (major, minor) == (9, 0) and any((a, b, s) == (9, 0, "a") for a, b, s, _ in archs):
        paths.append(PATH_SM90)
    for a, b, suffix, ptx in archs:
        exact = (a, b) == (major, minor)
        same_family = suffix == "" and a == major and b <= minor
        jit = ptx and suffix == "" and (a, b) <= (major, minor)
        if a >= 8 and (exact or same_family or jit):
            paths.append(PATH_SM80)
            break
    return tuple(paths)


def select_path(capability: tuple[int, int], arch_list: str, *, tma_ok: bool, smem_optin: int,
                smem_needed: dict[int, int], forced: int | None = None, alibi: bool = False) -> int | None:
    """The path for one call, or None when no kernel of this build can run it here.

    tma_ok: the tensors suit TMA (path 90); alibi: the call has ALiBi slopes, which only path 80
    adds (path 90 is then not usable); smem_optin: the device's per-block shared memory
    limit; smem_needed: path -> bytes the kernel's tiles need (prefill_plan); forced: a path
    demanded through KVKERNELS_PREFILL_PATH.
    """
    usable = [p for p in runnable_paths(capability, arch_list)
              if smem_needed.get(p, 1 << 62) <= smem_optin and (p != PATH_SM90 or (tma_ok and not alibi))]
    if forced is not None:
        return forced if forced in usable else None
    return usable[0] if usable else None


def forced_path() -> int | None:
    """KVKERNELS_PREFILL_PATH: 80 / 90 (also sm80 / sm90), or unset / auto."""
    value = os.environ.get(_PATH_ENV, "").strip().lower().removeprefix("sm")
    if value in ("", "auto"):
        return None
    if value not in ("80", "90"):
        raise ValueError(f"{_PATH_ENV}={value!r}: expected 80, 90 or auto")
    return int(value)


@functools.lru_cache(maxsize=None)
def _device(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or (227 if props.major == 9 else 99) * 1024
    return (props.major, props.minor), optin


@functools.lru_cache(maxsize=None)
def plan(path: int, head_dim: int, batch: int, num_heads: int, max_seqlen_q: int) -> dict[str, int]:
    """The launch geometry of one call, from the kernels' own tile table (csrc/kernels/prefill_config.h):
    block_m, block_n, threads, smem_bytes, grid_x (query row blocks), grid_y (heads), grid_z (sequences)."""
    # A CPU op in both builds (the GPU one when present: its tile table is the one that launches).
    namespace = torch.ops.kvkernels_C if _load() is None else torch.ops.kvkernels_emu
    values = namespace.prefill_plan(path, head_dim, batch, num_heads, max_seqlen_q)
    keys = ("block_m", "block_n", "threads", "smem_bytes", "grid_x", "grid_y", "grid_z")
    return dict(zip(keys, values))


def _target(q: torch.Tensor) -> tuple[tuple[int, int], int, str]:
    """(compute capability, per-block shared memory limit, archs with code) where q's kernels run:
    its GPU and this build's cubins, or the emulator: an sm_80 device, or an sm_90a one (which runs
    both kernels) when KVKERNELS_PREFILL_PATH=90 asks for the wgmma kernel."""
    if emulated(q):
        if forced_path() == PATH_SM90:
            return EMULATOR_SM90_CAPABILITY, EMULATOR_SM90_SMEM_OPTIN, "8.0;9.0a"
        return EMULATOR_CAPABILITY, EMULATOR_SMEM_OPTIN, "8.0"
    capability, optin = _device(q.device.index if q.device.index is not None else torch.cuda.current_device())
    return capability, optin, arch_list()


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA tensor maps need a non-zero stride along every dimension longer than 1 (an expanded
    k/v has stride 0 there)."""
    return all(t.stride(d) != 0 for t in tensors for d in range(t.dim() - 1) if t.shape[d] > 1)


def path_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi: bool = False) -> int | None:
    capability, optin, archs = _target(q)
    d = q.shape[-1]
    needed = {p: plan(p, d, 1, 1, 1)["smem_bytes"] for p in PATHS}
    return select_path(capability, archs, tma_ok=_tma_ok(q, k, v), smem_optin=optin, smem_needed=needed,
                       forced=forced_path(), alibi=alibi)


# ------------------------------------------------------------------------------- unsupported


def config_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: bool) -> str | None:
    """Why the kernels cannot take these tensors (dtype, head dim, sizes, layout), device aside."""
    if q.dtype not in _DTYPES:
        return f"the CUDA prefill kernels take float16/bfloat16, not {str(q.dtype).replace('torch.', '')}"
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"head dim {d} is not one of {HEAD_DIMS} (the CUDA prefill kernels' template head dims)"
    if q.shape[-2] > _MAX_GRID_YZ:
        return f"{q.shape[-2]} query heads is more than one launch takes ({_MAX_GRID_YZ})"
    if not varlen and q.shape[0] > _MAX_GRID_YZ:
        return f"a batch of {q.shape[0]} is more than one launch takes ({_MAX_GRID_YZ})"
    tokens = (q.shape[0] * q.shape[1] + k.shape[0] * k.shape[1]) if not varlen else q.shape[0] + k.shape[0]
    if tokens > _MAX_TOKENS:
        return f"{tokens} query + key tokens is more than one launch takes ({_MAX_TOKENS})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        reason = layout_reason(name, t)
        if reason:
            return reason
    return None


def unsupported(op: str, *, q, k, v, varlen=False, alibi=False, softcap=0.0, softmax_scale=1.0,
                **_) -> str | None:
    reason = device_reason("prefill", {"q": q, "k": k, "v": v}) or config_reason(q, k, v, varlen)
    if reason:
        return reason
    if alibi and softcap > 0 and q.shape[-1] == 256:
        # The ALiBi bias after the tanh is compiled out of the D = 256 kernel: its registers would spill.
        return "alibi_slopes with a softcap at head dim 256 (the Triton kernel and the reference take it)"
    if alibi and softmax_scale == 0:
        return "alibi_slopes with softmax_scale 0 (the bias joins the raw scores as -slope / softmax_scale)"
    if path_for(q, k, v, alibi) is None:
        capability, _, archs = _target(q)
        forced = forced_path()
        where = (f"the emulator (compute capability {capability[0]}.{capability[1]})" if emulated(q) else
                 f"compute capability {capability[0]}.{capability[1]}")
        return (f"no CUDA prefill kernel of this build runs on {where}"
                + (f" with {_PATH_ENV}={forced}" if forced else "") + (" with alibi_slopes" if alibi else "")
                + f" (built for {archs})")
    return None


# ------------------------------------------------------------------------------------- entry


def prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
            window_right, softcap, alibi_slopes=None):
    """Normalised entry point (see kvkernels.api) -> (out like q, lse fp32).

    dense:  q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D], lse [B, Hq, Sq]
    varlen: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_q/k int32 [B + 1] -> out [Tq, Hq, D], lse [Hq, Tq]
    window_left/right: -1 unbounded, causal already folded into window_right. A row that sees no key
    gets out 0 and lse -inf (natural log). alibi_slopes fp32 [B, Hq] (batch stride may be 0) or None:
    with slopes the call runs on path 80.
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.dim() == 4:
        lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    path = path_for(q, k, v, alibi_slopes is not None)
    if path is None:  # unsupported() said so first when the backend was chosen
        raise RuntimeError("no CUDA prefill kernel of this build runs on this device")
    ops(q.device).prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, max_seqlen_q, max_seqlen_k,
                          float(softmax_scale), int(window_left), int(window_right), float(softcap), path, alibi_slopes)
    return out, lse
