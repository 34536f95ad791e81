"""Ahead-of-time review of the Triton kernels for real GPUs, on the CPU (no GPU needed).

Each row of VARIANTS calls a wrapper's own planning function (the code that picks the constexprs,
num_warps, num_stages and autotune configs a call runs with) for a Target, binds the planned
arguments the way Triton's launcher does (so pointer and stride specialisations match a real
call), compiles every planned configuration with `triton.compile(..., target=GPUTarget(...))`
for sm_80, sm_89 and sm_90, and reads the cubin with cuobjdump:

  * it compiles;
  * shared memory <= the target's per-block limit (TARGETS), and <= the wrappers' own estimate
    where they choose configs by it (prefill.smem_bytes), so a GPU with another limit gets configs
    that fit too;
  * per-thread stack (register spills) <= MAX_STACK_BYTES;
  * tensor-core MMA where the kernel uses tl.dot (HMMA on sm_80/sm_89; HGMMA or HMMA on sm_90);
  * 128-bit global loads (LDG.E.128, cp.async 16 B or TMA) where the layout allows them.

The compiles run in a subprocess (this file run as a script): Triton must see TRITON_INTERPRET=0
before it is imported, and kvkernels turns the interpreter on in a process without a GPU.
Compiled kernels are cached in .ci/cache/triton-aot (gitignored; KVKERNELS_AOT_CACHE moves it).
77 compiles, about 6 CPU-minutes cold (3-4 minutes on 2 idle cores; 14 minutes measured on a
2-core machine at load 7), about 40 s warm. KVKERNELS_AOT_VARIANTS=<regex> compiles only the
matching rows. A new kernel is one more row of VARIANTS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

if __name__ == "__main__":  # the compile subprocess: compiled kernels, not the interpreter
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's kvkernels

import pytest
import torch

from kvkernels.triton import KernelConfig, Launch, Target  # noqa: E402

pytestmark = pytest.mark.build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-block shared memory (opt-in maximum) of each target: sm_89 stands for the 99 KB parts
# (sm_86 and sm_89: RTX 3090/4090, A10, A40, L4, L40S).
TARGETS = {
    "sm_80": Target((8, 0), 166_912),
    "sm_89": Target((8, 9), 101_376),
    "sm_90": Target((9, 0), 232_448),
}
# Per-thread stack a 16-bit kernel may use (spills and stack frame). Most planned configs use none,
# two D = 256 autotune candidates 32 bytes; the configs they replaced spilled 88-280 (4-warp D = 256,
# 128 x 32 at D = 256 on sm_80).
MAX_STACK_BYTES = 32
MMA = {"sm_80": r"\bHMMA\b", "sm_89": r"\bHMMA\b", "sm_90": r"\bHGMMA\b|\bHMMA\b"}
WIDE_LOAD = r"\bLDG\.E(\.\w+)*\.128\b|\bLDGSTS(\.\w+)*\.128\b|\bUTMALDG\b"


@dataclass(frozen=True)
class Variant:
    name: str
    plan: Callable[[Target], list[Launch]]  # the wrapper's planning function on small CPU tensors
    dot: bool                # the kernel uses tl.dot: tensor-core MMA required
    wide_loads: bool         # rows are contiguous and 16-byte aligned: 128-bit loads required
    all_configs: bool = True  # compile every planned config (autotune list), else the first
    supported: Callable[[Target], bool] = lambda t: True  # False: the wrapper must decline it there
    estimate: Callable[[Target, KernelConfig, dict], int] | None = None  # the wrapper's smem estimate


# ------------------------------------------------------------------------------ planning calls


def _prefill(d, sq, *, dtype=torch.float16, varlen=False, causal=True, softcap=0.0, hq=4, hkv=2):
    def plan(target):
        from kvkernels.triton import prefill
        if varlen:
            lens = [sq, 7]
            cu = torch.tensor([0, sq, sq + 7], dtype=torch.int32)
            q = torch.empty(sum(lens), hq, d, dtype=dtype)
            k = torch.empty(sum(lens), hkv, d, dtype=dtype)
            args = (q, k, torch.empty_like(k), cu, cu, sq, sq)
        else:
            q = torch.empty(1, sq, hq, d, dtype=dtype)
            k = torch.empty(1, sq, hkv, d, dtype=dtype)
            args = (q, k, torch.empty_like(k), None, None, sq, sq)
        _, _, launch = prefill.plan(*args, d ** -0.5, -1, 0 if causal else -1, softcap, target)
        return [launch]
    return plan


def _prefill_estimate(target, cfg, constexprs):
    from kvkernels.triton import prefill
    meta = dict(cfg.meta)
    return prefill.smem_bytes(target, meta["BLOCK_M"], meta["BLOCK_N"], constexprs["BLOCK_D"], cfg.num_stages)


def _fp8_dtype(fp8):
    """fp8: False, True (float8_e4m3fn) or an fp8 dtype -> the cache's fp8 dtype, or None."""
    return fp8 if isinstance(fp8, torch.dtype) else torch.float8_e4m3fn if fp8 else None


def _full_cache(b, s_max, hkv, d, page_size, fp8, dtype):
    """(k cache, block table or None, fp8 scale or None, seqlens) of b full sequences of s_max tokens;
    fp8: False, True (e4m3) or the fp8 dtype."""
    cache_dtype = _fp8_dtype(fp8) or dtype
    if page_size is None:
        kc = torch.empty(b, s_max, hkv, d, dtype=cache_dtype)
        table = None
    else:
        kc = torch.empty(b * s_max // page_size, page_size, hkv, d, dtype=cache_dtype)
        table = torch.zeros(b, s_max // page_size, dtype=torch.int32)
    scale = torch.ones(hkv) if fp8 else None
    return kc, table, scale, torch.full((b,), s_max, dtype=torch.int32)


def _decode(d, hq, hkv, *, page_size=None, fp8=False, splits=1, softcap=0.0, dtype=torch.float16):
    def plan(target):
        from kvkernels.triton import decode
        b, s_max = 2, 256
        q = torch.empty(b, hq, d, dtype=dtype)
        kc, table, scale, seqlens = _full_cache(b, s_max, hkv, d, page_size, fp8, dtype)
        _, _, launches = decode.plan(q, kc, torch.empty_like(kc), seqlens, table, d ** -0.5, -1, softcap,
                                     scale, scale, splits, False, target)
        assert len(launches) == (2 if splits > 1 else 1)
        return launches
    return plan


def _append(d, hkv, *, mode="contiguous", src=torch.float16, fp8=False, rotary=None):
    """rotary: None, or (rotary_dim, interleaved, table dtype) for the fused rotary embedding; fp8: False,
    True (e4m3) or the fp8 dtype."""
    def plan(target):
        from kvkernels.triton import append
        cache_dtype = _fp8_dtype(fp8) or src
        scale = torch.ones(hkv) if fp8 else None
        rot = None
        if rotary is not None:
            rd, interleaved, table_dtype = rotary
            cos = torch.empty(64, rd // 2, dtype=table_dtype)
            rot = (cos, torch.empty_like(cos), interleaved, torch.arange(5, dtype=torch.int32) if mode == "slots" else None)
        if mode == "slots":
            k = torch.empty(5, 1, hkv, d, dtype=src)
            kc = torch.empty(8, 16, hkv, d, dtype=cache_dtype)
            return [append.plan(k, torch.empty_like(k), kc, torch.empty_like(kc), append._SLOTS, None, None,
                                torch.arange(5, dtype=torch.int64), scale, scale, None, rot)]
        k = torch.empty(2, 3, hkv, d, dtype=src)
        seqlens = torch.zeros(2, dtype=torch.int32)
        if mode == "paged":
            kc = torch.empty(8, 16, hkv, d, dtype=cache_dtype)
            table = torch.zeros(2, 4, dtype=torch.int32)
            return [append.plan(k, torch.empty_like(k), kc, torch.empty_like(kc), append._PAGED, seqlens, table,
                                None, scale, scale, None, rot)]
        kc = torch.empty(2, 64, hkv, d, dtype=cache_dtype)
        return [append.plan(k, torch.empty_like(k), kc, torch.empty_like(kc), append._CONTIGUOUS, seqlens, None,
                            None, scale, scale, None, rot)]
    return plan


def _cache(d, hq, hkv, queries, *, page_size=16, fp8=False, splits=1, causal=True, ragged=False,
           dtype=torch.float16):
    def plan(target):
        from kvkernels.triton import cache_attn
        b, s_max = 2, 1024
        kc, table, scale, seqlens = _full_cache(b, s_max, hkv, d, page_size, fp8, dtype)
        if ragged:
            q = torch.empty(queries + 1, hq, d, dtype=dtype)   # one sequence of `queries`, one decode
            cu = torch.tensor([0, queries, queries + 1], dtype=torch.int32)
        else:
            q, cu = torch.empty(b, queries, hq, d, dtype=dtype), None
        _, _, launches, _ = cache_attn.plan(q, kc, torch.empty_like(kc), seqlens, cu, queries, table, causal,
                                            d ** -0.5, -1, 0.0, scale, scale, splits, False, target)
        assert len(launches) == (2 if splits > 1 else 1)
        return launches
    return plan


def _fp8_ok(target):
    from kvkernels.triton import decode
    return decode.fp8_supported(target)


# One row per kernel variant. Prefill: every head-dim bucket in the short (<= 512 queries, one fixed
# config) and long (autotune list) buckets, varlen, bf16, softcap and an odd head dim; decode: the
# split kernel contiguous / paged (page-aligned and gathered), MHA and GQA, softcap, fp8, and the
# merge; append: contiguous, paged, slots, fp8 quantisation. e5m2 decodes and appends use no fp8 type
# (bytes, shifts and integer rounding), so they are compiled, and claimed, for every target.
VARIANTS = (
    Variant("prefill-d64-short", _prefill(64, 64), dot=True, wide_loads=True, estimate=_prefill_estimate),
    Variant("prefill-d128-short-varlen", _prefill(128, 100, varlen=True), dot=True, wide_loads=True,
            estimate=_prefill_estimate),
    Variant("prefill-d256-short-softcap", _prefill(256, 64, softcap=30.0), dot=True, wide_loads=True,
            estimate=_prefill_estimate),
    Variant("prefill-d96-short-bf16", _prefill(96, 64, dtype=torch.bfloat16, causal=False), dot=True,
            wide_loads=True, estimate=_prefill_estimate),
    Variant("prefill-d64-long", _prefill(64, 600), dot=True, wide_loads=True, estimate=_prefill_estimate),
    Variant("prefill-d128-long", _prefill(128, 600), dot=True, wide_loads=True, estimate=_prefill_estimate),
    Variant("prefill-d256-long", _prefill(256, 600), dot=True, wide_loads=True, estimate=_prefill_estimate),
    Variant("prefill-d128-long-bf16-softcap", _prefill(128, 600, dtype=torch.bfloat16, softcap=30.0), dot=True,
            wide_loads=True, all_configs=False, estimate=_prefill_estimate),
    Variant("prefill-d256-long-softcap", _prefill(256, 600, softcap=30.0), dot=True, wide_loads=True,
            all_configs=False, estimate=_prefill_estimate),
    Variant("decode-d128-gqa-contiguous", _decode(128, 8, 2), dot=True, wide_loads=True),
    Variant("decode-d128-gqa-paged16-splits", _decode(128, 8, 2, page_size=16, splits=4), dot=True, wide_loads=True),
    Variant("decode-d64-mha-contiguous", _decode(64, 4, 4), dot=False, wide_loads=True),
    Variant("decode-d256-gqa-paged64-softcap-bf16", _decode(256, 16, 2, page_size=64, softcap=30.0,
                                                            dtype=torch.bfloat16), dot=True, wide_loads=True),
    Variant("decode-d128-gqa-paged64-fp8-splits", _decode(128, 8, 2, page_size=64, fp8=True, splits=3), dot=True,
            wide_loads=True, supported=_fp8_ok),
    Variant("decode-d128-gqa-paged16-e5m2-bf16", _decode(128, 8, 2, page_size=16, fp8=torch.float8_e5m2,
                                                         dtype=torch.bfloat16), dot=True, wide_loads=True),
    Variant("cache-d128-gqa4-speculative4-paged16", _cache(128, 8, 2, 4), dot=True, wide_loads=True),
    Variant("cache-d128-gqa4-chunk512-ragged-paged16", _cache(128, 8, 2, 512, ragged=True), dot=True,
            wide_loads=True),
    Variant("cache-d256-gqa2-chunk256-contiguous-bf16", _cache(256, 4, 2, 256, page_size=None,
                                                              dtype=torch.bfloat16), dot=True, wide_loads=True),
    Variant("cache-d64-mha-chunk128-full-paged64", _cache(64, 4, 4, 128, page_size=64, causal=False), dot=True,
            wide_loads=True),
    Variant("cache-d128-gqa8-speculative2-paged64-fp8-splits", _cache(128, 16, 2, 2, page_size=64, fp8=True,
                                                                      splits=3), dot=True, wide_loads=True,
            supported=_fp8_ok),
    Variant("append-d128-contiguous", _append(128, 2), dot=False, wide_loads=True),
    Variant("append-d64-paged-fp8-from-bf16", _append(64, 4, mode="paged", src=torch.bfloat16, fp8=True),
            dot=False, wide_loads=True),
    Variant("append-d128-slots", _append(128, 2, mode="slots"), dot=False, wide_loads=True),
    Variant("append-d128-paged-e5m2-from-fp16", _append(128, 2, mode="paged", fp8=torch.float8_e5m2), dot=False,
            wide_loads=True),
    # fused rotary: libdevice mul_rn/add_rn/sub_rn must compile (the interpreter never runs them)
    Variant("append-d128-paged-rotary-neox-bf16", _append(128, 8, mode="paged", src=torch.bfloat16,
                                                          rotary=(128, False, torch.float32)),
            dot=False, wide_loads=True),
    Variant("append-d64-slots-rotary-gptj-partial-fp8-from-fp16", _append(64, 4, mode="slots", fp8=True,
                                                                          rotary=(32, True, torch.float16)),
            dot=False, wide_loads=True),
)


# ----------------------------------------------------------------------------- compile subprocess


def _jobs():
    """(variant, target, launch index, config index) of every compile."""
    jobs = []
    only = os.environ.get("KVKERNELS_AOT_VARIANTS")  # a regex, to work on a few rows
    for v in VARIANTS:
        if only and not re.search(only, v.name):
            continue
        for tname, target in TARGETS.items():
            if not v.supported(target):
                continue
            for li, launch in enumerate(v.plan(target)):
                n = len(launch.configs) if v.all_configs else 1
                jobs += [(v.name, tname, li, ci) for ci in range(n)]
    return jobs


def _compile(job):
    """Compile one planned launch for its target as Triton's launcher would; -> a result dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from kvkernels.info import find_cuobjdump

    vname, tname, li, ci = job
    variant = next(v for v in VARIANTS if v.name == vname)
    target = TARGETS[tname]
    launch = variant.plan(target)[li]
    cfg = launch.configs[ci]
    fn = launch.kernel
    gpu = GPUTarget("cuda", target.arch, 32)
    backend = make_backend(gpu)
    kwargs = {**launch.constexprs, **cfg.kwargs()}
    result = {"job": list(job), "kernel": launch.name, "config": cfg.kwargs(),
              "estimate": variant.estimate(target, cfg, launch.constexprs) if variant.estimate else None}
    start = time.time()
    try:
        # The launcher's own binder: argument types and the divisibility-by-16 specialisations of
        # pointers and integers come from the planned arguments, as in a real call.
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)
    except Exception as e:  # reported per job by the test
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        return result
    result["seconds"] = round(time.time() - start, 1)
    result["shared"] = compiled.metadata.shared
    tool = find_cuobjdump()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", res))
    result.update(regs=int(usage["REG"]), stack=int(usage["STACK"]), local=int(usage.get("LOCAL", 0)),
                  mma=bool(re.search(MMA[tname], sass)), hgmma=bool(re.search(r"\bHGMMA\b", sass)),
                  wide_loads=bool(re.search(WIDE_LOAD, sass)))
    return result


def _main(out_path: str) -> None:
    from concurrent.futures import ProcessPoolExecutor

    jobs = _jobs()
    workers = int(os.environ.get("KVKERNELS_AOT_JOBS", min(2, os.cpu_count() or 1)))
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_compile, jobs))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


# ---------------------------------------------------------------------------------------- tests


def _cache_dir() -> str:
    return os.environ.get("KVKERNELS_AOT_CACHE", os.path.join(ROOT, ".ci", "cache", "triton-aot"))


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend (ptxas) is not installed")
    from kvkernels.info import find_cuobjdump
    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump (neither in the Triton wheel nor on PATH)")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": _cache_dir(),
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.pop("KVKERNELS_TRITON_AUTOTUNE", None)  # the autotune lists are what is checked
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), out], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=3600)
        assert proc.returncode == 0, f"compile subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        with open(out) as f:
            return json.load(f)


def _where(r) -> str:
    vname, tname, li, _ = r["job"]
    return f"{vname} {tname} {r['kernel']} {r['config']}"


def test_every_planned_launch_fits_its_target(compiled):
    """One test for all compiles (they run once, in one subprocess); every failing check is listed."""
    variants = {v.name: v for v in VARIANTS}
    assert {tuple(r["job"]) for r in compiled} == set(_jobs())
    bad = []
    for r in compiled:
        v, target = variants[r["job"][0]], TARGETS[r["job"][1]]
        where = _where(r)
        if "error" in r:
            bad.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["shared"] > target.max_shared_mem:
            bad.append(f"{where}: {r['shared']} bytes of shared memory > {target.max_shared_mem}")
        if r["estimate"] is not None and r["shared"] > r["estimate"]:
            bad.append(f"{where}: {r['shared']} bytes of shared memory > the wrapper's estimate {r['estimate']}")
        if r["stack"] > MAX_STACK_BYTES or r["local"] > MAX_STACK_BYTES:
            bad.append(f"{where}: stack {r['stack']} / local {r['local']} bytes per thread > {MAX_STACK_BYTES}")
        # The merge kernel is elementwise (no tl.dot) whatever its variant's split kernel does.
        if v.dot and r["kernel"] != "decode_merge" and not r["mma"]:
            bad.append(f"{where}: tl.dot without tensor-core MMA ({MMA[r['job'][1]]})")
        if v.wide_loads and not r["wide_loads"]:
            bad.append(f"{where}: no 128-bit global loads")
    assert not bad, "\n".join(bad)


def test_hopper_prefill_uses_wgmma(compiled):
    """128-row prefill blocks on sm_90 run warpgroup MMA (wgmma), not the mma.sync fallback."""
    rows = [r for r in compiled if r["job"][1] == "sm_90" and r["kernel"] == "prefill" and "error" not in r
            and r["config"]["BLOCK_M"] == 128]
    assert rows
    assert all(r["hgmma"] for r in rows), [_where(r) for r in rows if not r["hgmma"]]


@pytest.mark.parametrize("tname", TARGETS)
def test_prefill_has_configs_for_every_bucket(tname):
    """Every head-dim bucket has a short-prompt config and an autotune list on every target, each
    within the target's shared memory by the wrapper's estimate."""
    from kvkernels.triton import prefill
    target = TARGETS[tname]
    for block_d in (64, 128, 256):
        for seqlen in (1, prefill.AUTOTUNE_MIN_SEQLEN + 1):
            configs = prefill.launch_configs(target, block_d, seqlen)
            assert configs, (tname, block_d, seqlen)
            for c in configs:
                m = dict(c.meta)
                assert prefill.smem_bytes(target, m["BLOCK_M"], m["BLOCK_N"], block_d, c.num_stages) \
                    <= target.max_shared_mem


def test_prefill_configs_follow_the_shared_memory_limit():
    """The same architecture with less shared memory gets fewer (smaller) configs, and a GPU where
    nothing fits gets none: configs come from the limit, not from a table per name."""
    from kvkernels.triton import prefill
    long_ = prefill.AUTOTUNE_MIN_SEQLEN + 1
    big = prefill.launch_configs(TARGETS["sm_80"], 256, long_)
    small = prefill.launch_configs(Target((8, 0), 101_376), 256, long_)
    assert set(small) < set(big)
    assert prefill.launch_configs(Target((8, 0), 32 * 1024), 256, long_) == ()
    assert prefill.launch_configs(Target((8, 0), 32 * 1024), 256, 1) == ()


def test_fp8_decode_is_declined_below_sm89(monkeypatch):
    """Triton has no e4m3 below sm_89: the wrapper declines e4m3 caches there with that reason (auto
    choice then takes the next backend), and takes them from sm_89 on. e5m2 caches (read as bytes,
    widened by a shift: VARIANTS compiles them for sm_80 too) are taken everywhere."""
    from kvkernels.triton import cache_attn, decode
    q = torch.empty(2, 8, 128, dtype=torch.float16)
    cache = torch.empty(2, 64, 2, 128, dtype=torch.float8_e4m3fn)
    e5m2 = torch.empty(2, 64, 2, 128, dtype=torch.float8_e5m2)
    for target, declined in ((TARGETS["sm_80"], True), (Target((8, 6), 101_376), True),
                             (TARGETS["sm_89"], False), (TARGETS["sm_90"], False)):
        monkeypatch.setattr(decode, "device_target", lambda _device, t=target: t)
        reason = decode.unsupported("decode", q=q, k_cache=cache)
        assert (reason is not None) == declined, (target, reason)
        if declined:
            assert "8.9" in reason and f"sm_{target.arch}" in reason
        assert cache_attn.unsupported("cache_attention", q=q[:, None], k_cache=cache) == reason
        assert decode.unsupported("decode", q=q, k_cache=e5m2) is None
        assert cache_attn.unsupported("cache_attention", q=q[:, None], k_cache=e5m2) is None


if __name__ == "__main__":
    _main(sys.argv[1])
