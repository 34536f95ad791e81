"""The emulator's mma.sync m16n8k16 and ldmatrix fragment layouts agree with CuTe's MMA and copy
traits (the nvidia-cutlass headers, compiled host-only) and with the PTX ISA's tables
(tests/emu/layout_check.cpp); an emulator with one operand's layout transposed fails the check."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import emu_variant

ROOT = emu_variant.ROOT
EMU_SOURCES = ("runtime.cpp", "ptx.cpp", "cuda_runtime.cpp", "sm90.cpp", "tma.cpp")

pytestmark = pytest.mark.skipif(emu_variant.cute_include() is None or shutil.which("g++") is None,
                                reason="needs g++ and the CuTe headers (pip install nvidia-cutlass)")


def build_and_run(tmp_path, emu_dir: str):
    try:
        cuda = emu_variant.cuda_include()
    except RuntimeError as e:
        pytest.skip(str(e))
    exe = str(tmp_path / "layout_check")
    cmd = ["g++", "-std=c++17", "-O1", "-fno-strict-aliasing", "-DKVK_EMULATE", f"-I{emu_variant.cute_include()}",
           f"-I{tmp_path / 'csrc'}", f"-I{os.path.join(ROOT, 'csrc')}", f"-I{cuda}", f"-I{os.path.join(cuda, 'cccl')}",
           os.path.join(ROOT, "tests", "emu", "layout_check.cpp"),
           *[os.path.join(emu_dir, f) for f in EMU_SOURCES], "-ldl", "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    return subprocess.run([exe], capture_output=True, text=True, timeout=120)


def test_emulated_layouts_match_cute_and_the_ptx_isa(tmp_path):
    result = build_and_run(tmp_path, os.path.join(ROOT, "csrc", "emu"))
    assert result.returncode == 0, result.stdout
    assert "all layouts agree" in result.stdout


def test_a_transposed_operand_layout_fails_the_check(tmp_path):
    emu = tmp_path / "csrc" / "emu"
    emu.mkdir(parents=True)
    for f in EMU_SOURCES + ("ptx.h", "device.h", "runtime.h"):
        shutil.copy(os.path.join(ROOT, "csrc", "emu", f), emu / f)
    ptx = (emu / "ptx.cpp").read_text()
    a_layout = "A[g + 8 * (i % 2)][2 * t + h + 8 * (i / 2)]"
    assert ptx.count(a_layout) == 1
    (emu / "ptx.cpp").write_text(ptx.replace(a_layout, "A[2 * t + h + 8 * (i / 2)][g + 8 * (i % 2)]"))
    result = build_and_run(tmp_path, str(emu))
    assert result.returncode == 1, result.stdout
    assert "mma (CuTe)" in result.stdout and "mma (PTX ISA)" in result.stdout, result.stdout
