"""The emulator's sm_90a synchronisation (csrc/emu/sm90.cpp): mbarrier phases and transaction
counts, the hang report naming the barrier, named barriers, elect.sync and setmaxnreg behave as
the PTX ISA says (tests/emu/sm90_sync_check.cpp, a host program built with g++), and an emulator
with one of those rules broken fails the check."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import emu_variant

ROOT = emu_variant.ROOT
EMU_SOURCES = ("runtime.cpp", "sm90.cpp")
EMU_HEADERS = ("runtime.h", "sm90.h", "racecheck.h")

pytestmark = [pytest.mark.emu, pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")]


def build_and_run(tmp_path, emu_dir: str, name: str = "sm90_sync_check"):
    try:
        cuda = emu_variant.cuda_include()
    except RuntimeError as e:
        pytest.skip(str(e))
    exe = str(tmp_path / name)
    # The patched emu/ (if any) comes first on the include path.
    cmd = ["g++", "-std=c++17", "-O1", "-DKVK_EMULATE", f"-I{tmp_path / 'csrc'}", f"-I{os.path.join(ROOT, 'csrc')}",
           f"-I{cuda}", os.path.join(ROOT, "tests", "emu", "sm90_sync_check.cpp"),
           *[os.path.join(emu_dir, f) for f in EMU_SOURCES], "-o", exe]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    return subprocess.run([exe], capture_output=True, text=True, timeout=120)


def test_sm90_synchronisation_follows_the_ptx_isa(tmp_path):
    result = build_and_run(tmp_path, os.path.join(ROOT, "csrc", "emu"))
    assert result.returncode == 0, result.stdout
    assert "all sm90 synchronisation checks pass" in result.stdout


# Each breaks one rule of emu/sm90.cpp; the check must notice.
MUTATIONS = {
    # try_wait/test_wait on the wrong parity: a fresh barrier's wait on parity 0 would pass.
    "parity_inverted": ("return (m.phase & 1u) != (parity & 1u);", "return (m.phase & 1u) == (parity & 1u);"),
    # A phase completing on its arrivals alone, with transaction bytes still pending.
    "tx_count_ignored": ("if (m.pending != 0 || m.tx != 0) return;", "if (m.pending != 0) return;"),
    # arrive.expect_tx counting 16 bytes too few (the kernel-side bug of the issue, on the emulator side).
    "expect_tx_off_by_16": ("add_tx(m, bytes, what, bar);  // the expect_tx", "add_tx(m, bytes - 16, what, bar);  //"),
    # A named barrier releasing one thread early.
    "named_barrier_early": ("if (++n.arrived < n.count) return false;", "if (++n.arrived < n.count - 1) return false;"),
    # setmaxnreg.inc not waiting for register-file room.
    "setmaxnreg_no_room_check": ("while (inc && total() - 128L * wg.regs + 128L * regs > 65536) {",
                                 "while (false) {"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_broken_rule_fails_the_check(tmp_path, mutation):
    emu = tmp_path / "csrc" / "emu"
    emu.mkdir(parents=True)
    for f in EMU_SOURCES + EMU_HEADERS:
        shutil.copy(os.path.join(ROOT, "csrc", "emu", f), emu / f)
    text, replacement = MUTATIONS[mutation]
    source = (emu / "sm90.cpp").read_text()
    assert source.count(text) == 1, text
    (emu / "sm90.cpp").write_text(source.replace(text, replacement))
    result = build_and_run(tmp_path, str(emu))
    assert result.returncode != 0, f"{mutation}: the broken emulator passed\n{result.stdout}"
    assert "FAIL" in result.stdout, result.stdout
