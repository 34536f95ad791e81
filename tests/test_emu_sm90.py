"""The emulator's sm_90a synchronisation, TMA and warpgroup MMA (csrc/emu/sm90.cpp, tma.cpp,
wgmma.cpp) behave as the PTX ISA and the CUDA driver say: mbarrier phases and transaction counts,
the hang report naming the barrier, named barriers, elect.sync and setmaxnreg
(tests/emu/sm90_sync_check.cpp); the tensor-map encoder's argument rules and the swizzled,
zero-filled, asynchronously completed box of cp.async.bulk.tensor (tests/emu/sm90_tma_check.cpp);
wgmma's descriptor decode, operand and accumulator layouts against CuTe's GMMA traits and
hand-computed PTX ISA cases (tests/emu/sm90_wgmma_check.cpp); the race checker's view of them:
mbarrier and named-barrier release/acquire, the TMA copy as an agent of its own, wgmma operand reads
(tests/emu/sm90_race_check.cpp). All are host programs built with g++; an emulator with one of those
rules broken fails its check."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import emu_variant

ROOT = emu_variant.ROOT
EMU_SOURCES = ("runtime.cpp", "sm90.cpp", "tma.cpp", "wgmma.cpp")
SHADOW = "racecheck/shadow.cpp"  # the race checker's shadow: never instrumented itself
# name: (source in tests/emu, its last line on success, build: plain, cute (the CuTe headers too)
# or race (it and the emulator with the race checker's instrumentation, linked with the shadow)).
PROGRAMS = {"sync": ("sm90_sync_check.cpp", "all sm90 synchronisation checks pass", "plain"),
            "tma": ("sm90_tma_check.cpp", "all TMA checks pass", "plain"),
            "wgmma": ("sm90_wgmma_check.cpp", "all wgmma checks pass", "cute"),
            "race": ("sm90_race_check.cpp", "all race-checker orderings judged right", "race")}

pytestmark = [pytest.mark.emu, pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")]


def _compile(source: str, obj: str, build: str = "plain"):
    cuda = emu_variant.cuda_include()
    flags = ["-O1", "-fno-strict-aliasing", "-DKVK_EMULATE", f"-I{os.path.join(ROOT, 'csrc')}", f"-I{cuda}"]
    if source.endswith(SHADOW):
        flags = ["-O2", f"-I{os.path.join(ROOT, 'csrc')}"]
    elif build == "cute":
        flags += [f"-I{emu_variant.cute_include()}", f"-I{os.path.join(cuda, 'cccl')}", "-Wno-deprecated-declarations"]
    elif build == "race":
        flags += emu_variant.RACECHECK
    build_cmd = subprocess.run(["g++", "-std=c++17", *flags, "-c", source, "-o", obj], capture_output=True, text=True)
    assert build_cmd.returncode == 0, build_cmd.stderr[-3000:]
    return obj


def _emu_sources(build: str) -> list[str]:
    return [*EMU_SOURCES, SHADOW] if build == "race" else list(EMU_SOURCES)


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """The unpatched emulator, in each build, and the check programs, compiled once ({(build, file):
    object}; the wgmma check only where the CuTe headers are installed)."""
    try:
        emu_variant.cuda_include()
    except RuntimeError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("sm90_objects")
    objs = {}
    for build in ("plain", "race"):
        for f in _emu_sources(build):
            objs[build, f] = _compile(os.path.join(ROOT, "csrc", "emu", f), str(out / f"{build}-{os.path.basename(f)}.o"),
                                      build)
    for program, (source, _, build) in PROGRAMS.items():
        if build == "cute" and emu_variant.cute_include() is None:
            continue
        objs[program] = _compile(os.path.join(ROOT, "tests", "emu", source), str(out / (program + ".o")), build)
    return objs


def link_and_run(tmp_path, objs: dict, program: str, patched: dict | None = None):
    """Links `program` with the emulator (`patched`: {file: object} in place of the unpatched ones) and runs it."""
    if program not in objs:
        pytest.skip("the wgmma check needs the CuTe headers (pip install nvidia-cutlass)")
    build = PROGRAMS[program][2]
    emu = [(patched or {}).get(f) or objs["plain" if build == "cute" else build, f] for f in _emu_sources(build)]
    exe = str(tmp_path / program)
    link = subprocess.run(["g++", objs[program], *emu, "-o", exe], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-3000:]
    return subprocess.run([exe], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_emulated_sm90_instructions_follow_the_ptx_isa(tmp_path, objects, program):
    result = link_and_run(tmp_path, objects, program)
    assert result.returncode == 0, result.stdout
    assert PROGRAMS[program][1] in result.stdout


# Each breaks one rule of the emulator (file, text, replacement, the check that must notice).
MUTATIONS = {
    # try_wait/test_wait on the wrong parity: a fresh barrier's wait on parity 0 would pass.
    "parity_inverted": ("sm90.cpp", "return (m.phase & 1u) != (parity & 1u);",
                        "return (m.phase & 1u) == (parity & 1u);", "sync"),
    # A phase completing on its arrivals alone, with transaction bytes still pending.
    "tx_count_ignored": ("sm90.cpp", "if (m.pending != 0 || m.tx != 0) return;", "if (m.pending != 0) return;",
                         "sync"),
    # arrive.expect_tx counting 16 bytes too few.
    "expect_tx_off_by_16": ("sm90.cpp", "add_tx(m, bytes, what, bar);  // the expect_tx",
                            "add_tx(m, bytes - 16, what, bar);  //", "sync"),
    # A named barrier releasing one thread early.
    "named_barrier_early": ("sm90.cpp", "if (++n.arrived < n.count) return false;",
                            "if (++n.arrived < n.count - 1) return false;", "sync"),
    # setmaxnreg.inc not waiting for register-file room.
    "setmaxnreg_no_room_check": ("sm90.cpp", "while (inc && total() - 128L * wg.regs + 128L * regs > 65536) {",
                                 "while (false) {", "sync"),
    # The 128-byte swizzle XORing the wrong row bits.
    "swizzle_128b_wrong_bits": ("tma.cpp", "case 128: return a ^ (((a >> 7) & 7u) << 4);",
                                "case 128: return a ^ (((a >> 8) & 7u) << 4);", "tma"),
    # The 64-byte swizzle XORing the wrong row bits, the 32-byte one not swizzling.
    "swizzle_64b_wrong_bits": ("tma.cpp", "case 64: return a ^ (((a >> 7) & 3u) << 4);",
                               "case 64: return a ^ (((a >> 8) & 3u) << 4);", "tma"),
    "swizzle_32b_dropped": ("tma.cpp", "case 32: return a ^ (((a >> 7) & 1u) << 4);", "case 32: return a;", "tma"),
    # Out-of-range rows read from memory instead of zeros (clamped to the last row).
    "oob_not_zero_filled": ("tma.cpp", "if (x < 0 || static_cast<uint64_t>(x) >= m.dims[d]) inside = false;",
                            "if (x < 0) inside = false;", "tma"),
    # The copy landing at its issue instead of at a later scheduling point.
    "tma_lands_at_issue": ("tma.cpp", "  emu::g_copies.push_back(std::move(c));\n",
                           "  emu::g_copies.push_back(std::move(c));\n  emu::land_async_copies();\n", "tma"),
    # 16 bytes fewer completed than the box holds.
    "complete_tx_short": ("tma.cpp", "mbarrier_complete_tx(c.bar, static_cast<uint32_t>(c.bytes.size()));",
                          "mbarrier_complete_tx(c.bar, static_cast<uint32_t>(c.bytes.size() - 16));", "tma"),
    # The encoder accepting strides that are not multiples of 16 bytes.
    "stride_rule_dropped": ("tma.cpp", "if (s % 16) return reject", "if (false) return reject", "tma"),
    # The 128-byte swizzle of a wgmma descriptor XORing two row bits instead of three.
    "wgmma_swizzle_128b_mask": ("wgmma.cpp", "span == 128 ? 7u", "span == 128 ? 3u", "wgmma"),
    # Layout codes 1 and 2 (128- and 64-byte swizzle) swapped.
    "wgmma_layout_codes_swapped": ("wgmma.cpp", "layout == 1 ? 128 : layout == 2 ? 64",
                                   "layout == 1 ? 64 : layout == 2 ? 128", "wgmma"),
    # Leading and stride byte offsets swapped for swizzled MN-major operands.
    "wgmma_mn_major_lbo_sbo_swapped": ("wgmma.cpp", "(umn / (span / 2)) * lbo + (uk % 8) * span + (uk / 8) * sbo",
                                       "(umn / (span / 2)) * sbo + (uk % 8) * span + (uk / 8) * lbo", "wgmma"),
    # ... and for interleaved K-major ones.
    "wgmma_k_major_lbo_sbo_swapped": ("wgmma.cpp", "(umn / 8) * sbo + (uk % 8) * 2 + (uk / 8) * lbo",
                                      "(umn / 8) * lbo + (uk % 8) * 2 + (uk / 8) * sbo", "wgmma"),
    # imm-trans-b ignored: B always read K-major.
    "wgmma_trans_b_ignored": ("wgmma.cpp", "wgmma_operand_address(op.desc_b, op.trans_b, c, k)",
                              "wgmma_operand_address(op.desc_b, false, c, k)", "wgmma"),
    # The accumulator fragment with its row and column halves swapped.
    "wgmma_accumulator_layout": ("wgmma.cpp",
                                 "const int row = l / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (l % 4) + i % 2;",
                                 "const int row = l / 4 + 8 * (i % 2), col = 8 * (i / 4) + 2 * (l % 4) + (i / 2) % 2;",
                                 "wgmma"),
    # The register A fragment (rs) with its row and k halves swapped.
    "wgmma_register_a_layout": ("wgmma.cpp", "A[g + 8 * (i % 2)][2 * tq + h + 8 * (i / 2)]",
                                "A[g + 8 * (i / 2)][2 * tq + h + 8 * (i % 2)]", "wgmma"),
    # The race checker: a release that does not advance its thread's clock (later writes look released).
    "race_release_keeps_clock": (SHADOW, "  ++s.own[thread];  // its later accesses are not covered by this release\n",
                                 "\n", "race"),
    # ... an mbarrier wait that acquires nothing.
    "race_wait_acquires_nothing": ("sm90.cpp", "  emu::race::acquire(m.completed);\n", "\n", "race"),
    # ... bar.sync waiters that acquire nothing.
    "race_named_barrier_acquires_nothing": ("sm90.cpp", "    emu::race::acquire_for(t, n.arrivals);\n", "\n", "race"),
    # ... a TMA completion that releases nothing.
    "race_tma_completion_releases_nothing": ("sm90.cpp", "  emu::race::release(m.arrivals);  // the copy's writes",
                                             "  //", "race"),
    # ... wgmma operands not read.
    "race_wgmma_reads_unseen": ("wgmma.cpp", "  emu::race::access_as(reader, p, 2, false);\n", "\n", "race"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_broken_rule_fails_the_check(tmp_path, objects, mutation):
    path, text, replacement, program = MUTATIONS[mutation]
    source = open(os.path.join(ROOT, "csrc", "emu", path)).read()
    assert source.count(text) == 1, text
    patched = tmp_path / path
    patched.parent.mkdir(parents=True, exist_ok=True)
    patched.write_text(source.replace(text, replacement))
    # Only the patched file is recompiled (its headers are the unpatched ones).
    obj = _compile(str(patched), str(tmp_path / (os.path.basename(path) + ".o")), PROGRAMS[program][2])
    result = link_and_run(tmp_path, objects, program, {path: obj})
    assert result.returncode != 0, f"{mutation}: the broken emulator passed\n{result.stdout}"
    assert "FAIL" in result.stdout, result.stdout
