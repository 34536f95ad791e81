"""Build kvkernels: the Python package, plus the CUDA extension `kvkernels._C` when nvcc is found.

    pip install --no-build-isolation -e .        # builds the extension if nvcc is on PATH
    KVKERNELS_SKIP_CUDA=1 pip install ...        # Triton + reference only
    KVKERNELS_SKIP_EMU=1 pip install ...         # without the CPU emulator kvkernels._emu
    TORCH_CUDA_ARCH_LIST="9.0a" pip install ...  # default "8.0;9.0a"

The same kernels also build as host C++ into `kvkernels._emu` (csrc/emu/: the CPU emulator of the
sm_80 instructions, ops torch.ops.kvkernels_emu.* on CPU tensors); that needs the toolkit's headers
only (cuda_fp16.h & co. compile on the host), no nvcc run and no GPU.

Kernel files (csrc/kernels/*.cuh, csrc/launch/*.cu) include CUDA headers only; torch glue lives
in csrc/ops/*.cpp. A .cu including torch/extension.h costs ~2 minutes on 2 cores, a CUDA-only
.cu a few seconds, so that split is what keeps the build short.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _find_cuda_home():
    """The CUDA toolkit root holding bin/nvcc and lib64/libcudart.so.

    nvcc may be reached through a wrapper or link outside the toolkit (e.g. /usr/local/bin/nvcc),
    in which case torch's guess (the parent of nvcc's folder) is wrong and -lcudart fails.
    """
    def is_toolkit(path):
        return (path and os.path.exists(os.path.join(path, "bin", "nvcc"))
                and (os.path.exists(os.path.join(path, "lib64", "libcudart.so"))
                     or os.path.exists(os.path.join(path, "lib", "libcudart.so"))))

    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if is_toolkit(env):
        return env
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a shell wrapper: `exec /path/to/cuda/bin/nvcc "$@"`
            with open(nvcc, "r", errors="ignore") as f:
                for token in f.read(4096).split():
                    if token.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if is_toolkit(path):
            return path
    return None


def _cuda_extension():
    if os.environ.get("KVKERNELS_SKIP_CUDA", "0") == "1":
        print("kvkernels: KVKERNELS_SKIP_CUDA=1, building without the CUDA extension")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        print("kvkernels: nvcc not found, building without the CUDA extension (Triton + reference)")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home  # must precede the import below, which reads it once
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/launch/*.cu"))
    # No -std: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.14;
    # an explicit -std=c++17 breaks the torch glue, and nvcc refuses two -std flags).
    nvcc_flags = [
        "-O3", "-lineinfo",
        "--expt-relaxed-constexpr",
        # No --use_fast_math: fp8 quantization divides with IEEE rounding to match the reference
        # bit for bit; kernels that want fast exp use exp2f/ex2.approx explicitly.
        "-Xptxas=-warn-spills,-warn-lmem-usage",
    ]
    if os.environ.get("KVKERNELS_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    ext = CUDAExtension(
        name="kvkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    _write_build_info(cuda_home)
    return [ext] + _emu_extension(cuda_home), {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _emu_extension(cuda_home):
    """kvkernels._emu: csrc/kernels and csrc/launch compiled by the host compiler against the
    emulator (csrc/emu/device.h, emu/ptx.h), plus the torch glue of csrc/ops for CPU tensors."""
    if os.environ.get("KVKERNELS_SKIP_EMU", "0") == "1":
        print("kvkernels: KVKERNELS_SKIP_EMU=1, building without the CUDA emulator")
        return []
    from torch.utils.cpp_extension import CppExtension

    return [CppExtension(
        name="kvkernels._emu",
        sources=sorted(glob.glob("csrc/emu/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(cuda_home, "include")],
        # -fno-strict-aliasing: the kernels view registers and shared memory through casts that nvcc
        # accepts and GCC's aliasing rules would not.
        # -ffp-contract=off: the kernels' fp32 arithmetic must round each product and sum on its own,
        # as on the GPU where they say so with __fmul_rn & co (GCC contracts a*b + c into an FMA by
        # default wherever the target has one, e.g. aarch64 or -march=native).
        extra_compile_args=["-O2", "-fno-strict-aliasing", "-ffp-contract=off", "-DKVK_EMULATE"],
        # -Bsymbolic: the module's own definitions win over same-named ones already loaded, namely
        # libcudart's cudaGetLastError & co. (torch loads it globally) and kvkernels._C's host stubs
        # of the very same kernel templates, which would launch on a GPU instead of emulating.
        extra_link_args=["-Wl,-Bsymbolic"],
    )]


def _write_build_info(cuda_home):
    try:
        nvcc_version = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                                      capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception:  # noqa: BLE001 - informational only
        nvcc_version = "unknown"
    import torch

    info = {"archs": os.environ["TORCH_CUDA_ARCH_LIST"], "cuda_home": cuda_home,
            "nvcc": nvcc_version, "torch": torch.__version__, "python": sys.version.split()[0]}
    with open(os.path.join(ROOT, "kvkernels", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass, package_data={"kvkernels": ["_build_info.json"]})
