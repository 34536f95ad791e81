"""Other builds of the CUDA emulator for the checks that prove it bites: a copy of csrc/ (optionally
with a deliberate bug patched into a kernel) built with extra flags (AddressSanitizer and
UndefinedBehaviorSanitizer), and a pytest run in a subprocess that loads it through
KVKERNELS_EMU_LIBRARY. Builds share one folder per variant name, so ninja rebuilds only what a patch
touches; `variant()` holds that folder's lock from the copy of the sources to the end of the run, so
two runs sharing a folder (xdist workers, or two test sessions of one checkout) never load each
other's patch."""

from __future__ import annotations

import contextlib
import fcntl
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
# The race checker (csrc/emu/racecheck.h): the compiler's ThreadSanitizer instrumentation, with its
# hooks defined by csrc/emu/racecheck/shadow.cpp (compiled without it) instead of by libtsan.
RACECHECK = ["-fsanitize=thread", "-DKVK_EMU_RACECHECK"]
RACE_SHADOW = os.path.join("emu", "racecheck", "shadow.cpp")
# The op families of the emulator library (csrc/emu/launch_<op>*.cpp and ops_<op>.cpp, each
# registering its own ops); the rest of csrc/emu/*.cpp is the emulator itself. A variant built for
# some of them compiles only theirs: a patch of one kernel recompiles only what runs it.
OPS = ("append", "cache_attention", "decode", "prefill")
REQUIRES = {"cache_attention": ("decode",)}  # its launcher completes its parameters with decode's


def cuda_include() -> str:
    """The toolkit headers the emulator built against (recorded by setup.py in _build_info.json)."""
    from kvkernels.info import build_info
    home = (build_info() or {}).get("cuda_home") or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    include = os.path.join(home, "include")
    if not os.path.exists(os.path.join(include, "cuda_fp16.h")):
        raise RuntimeError(f"no CUDA toolkit headers in {include} to build the emulator against")
    return include


def cute_include() -> str | None:
    """The CuTe headers of the nvidia-cutlass wheel (the independent layouts the emulator is checked
    against), or None without the wheel."""
    try:
        import cutlass_library
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.exists(os.path.join(path, "cute", "tensor.hpp")) else None


@contextlib.contextmanager
def variant(name: str, patches: dict[str, tuple[str, str]] | None = None, *, sanitize: bool = False,
            racecheck: bool = False, ops: tuple[str, ...] = OPS):
    """Builds csrc/ with `patches` ({path under csrc: (text, replacement)}, each text found exactly once)
    into its own extension library with the kernels of `ops` (see OPS) and yields the path of the .so,
    holding the variant folder's lock until the block ends: run the tests that load it inside the
    block. sanitize: AddressSanitizer and UndefinedBehaviorSanitizer; racecheck: the shared-memory race
    checker (one or the other)."""
    assert not (sanitize and racecheck), "AddressSanitizer and the race checker's instrumentation do not mix"
    assert ops and set(ops) <= set(OPS), ops
    ops = tuple(sorted(set(ops).union(*(REQUIRES.get(op, ()) for op in ops))))
    folder = name if ops == OPS else f"{name}-{'+'.join(ops)}"  # one build folder per op set
    tree = os.path.join(VARIANTS, folder)
    os.makedirs(tree, exist_ok=True)
    with open(os.path.join(tree, ".variant.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield _build_locked(tree, folder, patches, sanitize, racecheck, ops)


def _sources(src: str, ops: tuple[str, ...]) -> list[str]:
    """The emulator library's translation units for `ops`: the emulator and those ops' launchers and glue."""
    def family(path: str) -> str | None:
        base = os.path.basename(path)
        return next((op for op in OPS if base == f"ops_{op}.cpp" or base.startswith(f"launch_{op}")), None)
    return sorted(p for p in glob.glob(os.path.join(src, "emu", "*.cpp")) if family(p) in (None, *ops))


def _build_locked(tree: str, name: str, patches, sanitize: bool, racecheck: bool, ops: tuple[str, ...]) -> str:
    src = os.path.join(tree, "csrc")
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
    # torch's builder leaves its own lock file behind when a build is killed, and then waits for it
    # forever; under our lock nobody else builds here, so a leftover one is stale.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(build_dir, "lock"))
    mode = "sanitize" if sanitize else "racecheck" if racecheck else "plain"
    if racecheck:
        _build_race_shadow(src, build_dir)
    # torch's builder also loads the library: in a subprocess, with the sanitizer runtimes preloaded
    # when the library needs them (never in this process).
    result = subprocess.run([sys.executable, __file__, src, build_dir, mode, ",".join(ops)],
                            env=_env(sanitize), capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"building the emulator variant {name} failed:\n{result.stdout[-3000:]}"
                           f"{result.stderr[-3000:]}")
    return os.path.join(build_dir, "_emu.so")


def _build_race_shadow(src: str, build_dir: str) -> None:
    """The race checker's shadow and hooks, an object of its own built without instrumentation; the
    library is relinked when it changes (ninja does not know the object)."""
    source = os.path.join(src, RACE_SHADOW)
    obj = os.path.join(build_dir, "race_shadow.o")
    inputs = (source, os.path.join(src, "emu", "racecheck.h"))
    if os.path.exists(obj) and all(os.path.getmtime(obj) >= os.path.getmtime(p) for p in inputs):
        return
    subprocess.run(["g++", "-std=c++17", "-O2", "-fPIC", "-I", src, "-c", source, "-o", obj], check=True,
                   capture_output=True, text=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(build_dir, "_emu.so"))


def _build_here(src: str, build_dir: str, mode: str, ops: tuple[str, ...]) -> None:
    from torch.utils.cpp_extension import load

    flags = ["-O1", "-g", "-fno-strict-aliasing", "-ffp-contract=off", "-DKVK_EMULATE"]  # as setup.py
    ldflags = ["-Wl,-Bsymbolic"]
    if mode == "sanitize":
        flags += SANITIZE
        ldflags += SANITIZE
    elif mode == "racecheck":  # instrumented, but linked against the shadow instead of libtsan
        flags += RACECHECK
        ldflags += [os.path.join(build_dir, "race_shadow.o")]
    load(name="_emu", sources=_sources(src, ops),
         extra_include_paths=[src, cuda_include()], extra_cflags=flags, extra_ldflags=ldflags,
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


if __name__ == "__main__":  # variant(): python emu_variant.py SRC BUILD_DIR plain|sanitize|racecheck OP,OP,...
    _build_here(sys.argv[1], sys.argv[2], sys.argv[3], tuple(sys.argv[4].split(",")))
