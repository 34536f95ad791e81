"""`kvkernels info`: versions, GPU, usable backends, and how the CUDA extension was built."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch


def build_info() -> dict | None:
    """What setup.py recorded when it built kvkernels._C (archs, nvcc, torch), or None."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the Triton wheel (which ships one)."""
    import shutil
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def extension_archs() -> list[str]:
    """SASS architectures actually inside the built extension (cuobjdump --list-elf), or []."""
    import re
    import subprocess

    from .cuda import extension_reason
    tool = find_cuobjdump()
    if extension_reason() is not None or tool is None:
        return []
    import kvkernels._C as ext
    try:
        listing = subprocess.run([tool, "--list-elf", ext.__file__], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", listing)))


def collect() -> dict:
    from . import config
    from .api import get_backend
    from .cuda import emulator_reason, extension_reason

    info = {
        "kvkernels": __import__("kvkernels").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": None,
        "gpu": None,
        "backends": {},
        "extension": {"built": extension_reason() is None, "reason": extension_reason(),
                      "build": build_info(), "archs_in_binary": extension_archs()},
        # The same CUDA kernels built for the host against the sm_80 emulator (csrc/emu/).
        "emulator": {"built": emulator_reason() is None, "reason": emulator_reason()},
        "env": {k: os.environ[k] for k in ("KVKERNELS_BACKEND", "KVKERNELS_CHECK", "KVKERNELS_BATCH_INVARIANT")
                if k in os.environ},
        "modes": {"checked": config.checked_mode(), "batch_invariant": config.batch_invariant()},
    }
    if config.USER_TRITON_INTERPRET is not None:
        info["env"]["TRITON_INTERPRET"] = config.USER_TRITON_INTERPRET
    info["triton_interpret"] = {"value": os.environ.get("TRITON_INTERPRET"),
                                "set_by": "user" if config.USER_TRITON_INTERPRET is not None
                                else ("kvkernels (no GPU)" if "TRITON_INTERPRET" in os.environ else None)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}
    for name in config.BACKENDS:
        try:
            get_backend(name)
            usable = True
            note = ""
        except (RuntimeError, ImportError) as e:
            usable, note = False, str(e)
        if name == "triton" and usable and not torch.cuda.is_available():
            note = "interpreter only (TRITON_INTERPRET=1): correct but slow, for tests"
        if name == "cuda" and usable and not torch.cuda.is_available():
            if emulator_reason() is None:
                note = "no CUDA device: CPU tensors run the kernels in the emulator (correct but slow, for tests)"
            else:
                usable, note = False, "built, but no CUDA device to launch on"
        info["backends"][name] = {"usable": usable, "note": note}
    info["auto"], info["warnings"] = _auto_choice(info["backends"])
    return info


def _auto_choice(backends: dict) -> tuple[str, list[str]]:
    """-> (what backend=None picks, warnings about KVKERNELS_BACKEND)."""
    from . import config
    auto = "cuda > triton on CUDA tensors" if torch.cuda.is_available() else "reference on CPU tensors"
    raw = os.environ.get("KVKERNELS_BACKEND", "")
    try:
        forced = config.backend_override()
    except ValueError:
        return auto, [f"KVKERNELS_BACKEND={raw!r} is not a backend (one of {', '.join(config.BACKENDS)} or auto): "
                      "every op call will raise ValueError; unset it or pick one of those"]
    if forced is None:
        return auto, []
    choice = f"{forced} (forced by KVKERNELS_BACKEND)"
    if not backends.get(forced, {}).get("usable", False):
        note = backends.get(forced, {}).get("note", "")
        return choice, [f"KVKERNELS_BACKEND={forced} forces a backend that is unusable here ({note}): op calls "
                        f"will raise ValueError; unset KVKERNELS_BACKEND to choose automatically"]
    return choice, []


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"kvkernels {info['kvkernels']}  python {info['python']}  torch {info['torch']} "
          f"(CUDA {info['torch_cuda']})  triton {info['triton']}")
    gpu = info["gpu"]
    print("GPU: " + (f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs, "
                     f"{gpu['memory_gib']} GiB)" if gpu else "none (CPU: reference backend, Triton interpreter)"))
    ext = info["extension"]
    if ext["built"]:
        b = ext["build"] or {}
        print(f"CUDA extension: built for TORCH_CUDA_ARCH_LIST={b.get('archs', '?')} "
              f"(SASS in binary: {', '.join(ext['archs_in_binary']) or '?'}; {b.get('nvcc', '?')})")
    else:
        print(f"CUDA extension: not built ({ext['reason']})")
    emu = info["emulator"]
    print("CUDA emulator: " + ("built (kvkernels._emu: the CUDA kernels on CPU tensors, sm_80 instructions emulated)"
                               if emu["built"] else f"not built ({emu['reason']})"))
    print("backends:")
    for name, b in info["backends"].items():
        print(f"  {name:<10} {'usable' if b['usable'] else 'unusable':<9} {b['note']}")
    print(f"auto choice: {info['auto']}")
    if info["env"]:
        print("environment (yours): " + "  ".join(f"{k}={v}" for k, v in info["env"].items()))
    ti = info["triton_interpret"]
    if ti["set_by"] and ti["set_by"] != "user":
        print(f"TRITON_INTERPRET={ti['value']} set by kvkernels: no GPU, so Triton kernels run in its interpreter")
    for w in info["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0
