"""Other builds of the CUDA emulator for the checks that prove it bites: a copy of csrc/ (optionally
with a deliberate bug patched into a kernel) built with extra flags (AddressSanitizer and
UndefinedBehaviorSanitizer), and a pytest run in a subprocess that loads it through
KVKERNELS_EMU_LIBRARY. Builds share one folder per variant name, so ninja rebuilds only what a patch
touches."""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One folder per checkout: two clones testing at once must not patch each other's copies.
VARIANTS = os.path.join(tempfile.gettempdir(), f"kvkernels-emu-variants-{os.getuid()}-"
                        f"{hashlib.sha1(ROOT.encode()).hexdigest()[:10]}")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def cuda_include() -> str:
    """The toolkit headers the emulator built against (recorded by setup.py in _build_info.json)."""
    from kvkernels.info import build_info
    home = (build_info() or {}).get("cuda_home") or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    include = os.path.join(home, "include")
    if not os.path.exists(os.path.join(include, "cuda_fp16.h")):
        raise RuntimeError(f"no CUDA toolkit headers in {include} to build the emulator against")
    return include


def build(name: str, patches: dict[str, tuple[str, str]] | None = None, *, sanitize: bool = False) -> str:
    """Builds csrc/ with `patches` ({path under csrc: (text, replacement)}, each text found exactly once)
    into its own extension library; returns the path of the .so."""
    tree = os.path.join(VARIANTS, name)
    src = os.path.join(tree, "csrc")
    os.makedirs(tree, exist_ok=True)
    # Copy file by file, keeping the modification time of unchanged files so ninja skips them.
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True):
        rel = os.path.relpath(path, os.path.join(ROOT, "csrc"))
        with open(path) as f:
            text = f.read()
        if patches and rel in patches:
            old, new = patches[rel]
            assert text.count(old) == 1, f"patch of {rel}: {old!r} found {text.count(old)} times"
            text = text.replace(old, new)
        dst = os.path.join(src, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):
            with open(dst) as f:
                if f.read() == text:
                    continue
        with open(dst, "w") as f:
            f.write(text)
    build_dir = os.path.join(tree, "build")
    os.makedirs(build_dir, exist_ok=True)
    # torch's builder also loads the library: in a subprocess, with the sanitizer runtimes preloaded
    # when the library needs them (never in this process).
    result = subprocess.run([sys.executable, __file__, src, build_dir, "1" if sanitize else "0"],
                            env=_env(sanitize), capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"building the emulator variant {name} failed:\n{result.stdout[-3000:]}"
                           f"{result.stderr[-3000:]}")
    return os.path.join(build_dir, "_emu.so")


def _build_here(src: str, build_dir: str, sanitize: bool) -> None:
    from torch.utils.cpp_extension import load

    flags = ["-O1", "-g", "-fno-strict-aliasing", "-DKVK_EMULATE"] + (SANITIZE if sanitize else [])
    load(name="_emu", sources=sorted(glob.glob(os.path.join(src, "emu", "*.cpp"))),
         extra_include_paths=[src, cuda_include()], extra_cflags=flags,
         extra_ldflags=["-Wl,-Bsymbolic"] + (SANITIZE if sanitize else []),
         build_directory=build_dir, is_python_module=False, verbose=False)


def _env(sanitize: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PYTEST_XDIST_WORKER", None)
    if sanitize:
        # The sanitizer runtimes go first: python and torch are not instrumented, only the kernels.
        libs = [subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                for lib in ("libasan.so", "libubsan.so")]
        env["LD_PRELOAD"] = ":".join(libs)
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
        env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    return env


def run_tests(library: str, args: list[str], *, sanitize: bool = False, timeout: int = 600):
    """pytest `args` in a subprocess whose emulator is `library` -> CompletedProcess (output in .stdout)."""
    env = dict(_env(sanitize), KVKERNELS_EMU_LIBRARY=library)
    # -s: a sanitizer report is written to fd 2 and the process exits at once, so pytest must not
    # capture it.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                           *(["-s"] if sanitize else []), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


if __name__ == "__main__":  # build(): python emu_variant.py SRC BUILD_DIR SANITIZE
    _build_here(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
