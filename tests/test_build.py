"""Static review of the compiled CUDA extension (no GPU needed): cuobjdump reads the SASS of every
kernel in kvkernels/_C*.so and checks what a memory-bound or tensor-core kernel must look like.

  * no kernel spills or uses local memory (cuobjdump -res-usage STACK/LOCAL, SASS LDL/STL);
  * each kernel family meets its rules in FAMILY_RULES (a rule applies only to the kernels of its
    family present in the binary for its architecture, minus kernels compiled out for that
    architecture; append kernels must be present).

Skips, with the reason, when the extension is not built or no cuobjdump is found (the Triton
wheel ships one; otherwise PATH).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache

import pytest

from kvkernels.info import find_cuobjdump

pytestmark = pytest.mark.build


@dataclass(frozen=True)
class FamilyRule:
    family: str        # kernel name prefix (CUDA kernels are named kvk_<op>_...)
    arch: str | None   # only this architecture's SASS (None: every architecture in the binary)
    needs: str         # regex one of the kernel's SASS instructions must match
    why: str
    exempt: str | None = None  # kernels of the family that need not match (regex on the name)


FAMILY_RULES = (
    FamilyRule("kvk_append", None, r"\bSTG\.E(\.\w+)*\.128\b", "128-bit stores (one 16-byte vector per thread)"),
    FamilyRule("kvk_decode", None, r"\bLDG\.E(\.\w+)*\.128\b|\bLDGSTS(\.\w+)*\.128\b|\bUTMALDG\b",
               "128-bit global loads of the KV cache (LDG.E.128, cp.async 16 B, or TMA)",
               exempt=r"combine|merge|reduce"),
    FamilyRule("kvk_prefill", "sm_80", r"\bHMMA\b", "tensor-core MMA (mma.sync) on sm_80"),
    # Hopper: the wgmma kernels must use wgmma; an mma.sync kernel also built for sm_90a (a
    # fallback) must at least use tensor cores.
    FamilyRule("kvk_prefill_sm90", "sm_90a", r"\bHGMMA\b", "warpgroup MMA (wgmma) on sm_90a"),
    FamilyRule("kvk_prefill", "sm_90a", r"\bHGMMA\b|\bHMMA\b", "tensor-core MMA on sm_90a"),
)
REQUIRED_FAMILIES = ("kvk_append",)


def _extension_path() -> str | None:
    spec = importlib.util.find_spec("kvkernels._C")
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


@lru_cache(maxsize=None)
def _dump(flag: str) -> str:
    so, tool = _extension_path(), find_cuobjdump()
    if so is None:
        pytest.skip("kvkernels._C is not built (python setup.py build_ext --inplace)")
    if tool is None:
        pytest.skip("no cuobjdump (neither in the Triton wheel nor on PATH)")
    return subprocess.run([tool, flag, so], capture_output=True, text=True, check=True).stdout


def _resources() -> dict[tuple[str, str], dict[str, int]]:
    """(arch, kernel) -> {"REG": .., "STACK": .., "LOCAL": .., ...} from cuobjdump -res-usage."""
    out, arch, name = {}, "?", None
    for line in _dump("-res-usage").splitlines():
        line = line.strip()
        if m := re.match(r"arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"Function (\S+):$", line):
            name = m.group(1)
        elif name is not None and line.startswith("REG:"):
            out[(arch, name)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return out


def _sass() -> dict[tuple[str, str], str]:
    """(arch, kernel) -> its SASS text, from cuobjdump -sass."""
    out, arch, name, lines = {}, "?", None, []

    def flush():
        if name is not None:
            out[(arch, name)] = "\n".join(lines)

    for line in _dump("-sass").splitlines():
        if m := re.match(r"\s*arch = (\S+)", line):
            flush()
            arch, name, lines = m.group(1), None, []
        elif m := re.match(r"\s*Function : (\S+)", line):
            flush()
            name, lines = m.group(1), []
        elif name is not None:
            lines.append(line)
    flush()
    return out


def _compiled_out(sass: str) -> bool:
    """A kernel whose body is compiled out for this architecture (e.g. a Hopper-only kernel's sm_80
    build, reduced to a trap): it touches no global memory."""
    return not re.search(r"\b(LDG|STG|LDGSTS|UTMALDG|UTMASTG|UBLKCP|ATOMG|RED)\b", sass)


def test_no_kernel_spills_or_uses_local_memory():
    resources = _resources()
    assert resources, "cuobjdump -res-usage listed no kernel"
    bad = [f"{arch} {name}: STACK={r.get('STACK')} LOCAL={r.get('LOCAL')}"
           for (arch, name), r in resources.items() if r.get("STACK", 0) > 0 or r.get("LOCAL", 0) > 0]
    bad += [f"{arch} {name}: local loads/stores (LDL/STL) in SASS"
            for (arch, name), sass in _sass().items() if re.search(r"\b(LDL|STL)\b", sass)]
    assert not bad, "kernels using local memory (spills or stack arrays):\n" + "\n".join(bad)


@pytest.mark.parametrize("family", REQUIRED_FAMILIES)
def test_required_kernel_families_are_built(family):
    assert any(family in name for _, name in _sass()), f"no {family} kernel in the extension"


@pytest.mark.parametrize("rule", FAMILY_RULES, ids=lambda r: f"{r.family}-{r.arch or 'all'}")
def test_kernel_family_rule(rule):
    kernels = {(arch, name): sass for (arch, name), sass in _sass().items()
               if rule.family in name and (rule.arch is None or arch == rule.arch) and not _compiled_out(sass)}
    if not kernels:
        pytest.skip(f"no {rule.family} kernels for {rule.arch or 'any arch'} in this build")
    failing = [f"{arch} {name}" for (arch, name), sass in kernels.items()
               if not re.search(rule.needs, sass) and not (rule.exempt and re.search(rule.exempt, name))]
    assert not failing, f"{rule.family} kernels without {rule.why}:\n" + "\n".join(failing)
