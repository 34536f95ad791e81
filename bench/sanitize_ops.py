"""A small workload for compute-sanitizer: every op on every kernel backend at tiny, awkward shapes.

    compute-sanitizer --tool memcheck  python3 bench/sanitize_ops.py
    compute-sanitizer --tool racecheck python3 bench/sanitize_ops.py
    python3 bench/sanitize_ops.py --parse LOG --tool memcheck      # -> JSON entry for the results

Prefill (dense, causal and not), decode (contiguous, shuffled paged, fp8 e4m3 and e5m2 paged) and append
(contiguous, paged, fp8 e4m3 and e5m2; paged with fused rotary, full and partial) on backends "cuda" and "triton", fp16 and bf16, head dims 64 and 128,
lengths 1, 17 and 113 (page-boundary crossings included). A configuration a backend rejects is
skipped; any other error counts as a failure (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def workload(quick: bool) -> int:
    import torch

    import kvkernels
    if not torch.cuda.is_available():
        print("sanitize_ops: no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    ran = skipped = failed = 0

    def randn(*shape, dtype):
        return torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    def call(name, fn):
        nonlocal ran, skipped, failed
        try:
            fn()
            torch.cuda.synchronize()
            ran += 1
        except ValueError as e:  # the backend does not take this configuration
            skipped += 1
            print(f"  skip {name}: {str(e).splitlines()[0][:120]}")
        except Exception as e:
            failed += 1
            print(f"  FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")

    lengths = [1, 17, 113]
    B = len(lengths)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    s_max, ps = 128, 16
    pages = s_max // ps
    table = torch.randperm(B * pages, generator=torch.Generator().manual_seed(1)).view(B, pages).int().to(dev)
    scale = torch.tensor(0.5, device=dev)
    dtypes = [torch.float16] if quick else [torch.float16, torch.bfloat16]
    dims = [128] if quick else [64, 128]
    for backend in ("cuda", "triton"):
        for dtype in dtypes:
            for d in dims:
                tag = f"{backend} {str(dtype)[6:]} D={d}"
                hq, hkv = 4, 2
                for causal in (False, True):
                    q, k, v = randn(2, 37, hq, d, dtype=dtype), randn(2, 37, hkv, d, dtype=dtype), randn(2, 37, hkv, d, dtype=dtype)
                    call(f"prefill causal={causal} {tag}",
                         lambda: kvkernels.prefill_attention(q, k, v, causal=causal, backend=backend))
                q = randn(B, hq, d, dtype=dtype)
                kc, vc = randn(B, s_max, hkv, d, dtype=dtype), randn(B, s_max, hkv, d, dtype=dtype)
                call(f"decode contiguous {tag}",
                     lambda: kvkernels.decode_attention(q, kc, vc, seqlens, backend=backend))
                kp, vp = randn(B * pages, ps, hkv, d, dtype=dtype), randn(B * pages, ps, hkv, d, dtype=dtype)
                call(f"decode paged {tag}",
                     lambda: kvkernels.decode_attention(q, kp, vp, seqlens, block_table=table, backend=backend))
                k8, v8 = kp.to(torch.float8_e4m3fn), vp.to(torch.float8_e4m3fn)
                call(f"decode paged fp8 {tag}",
                     lambda: kvkernels.decode_attention(q, k8, v8, seqlens, block_table=table, k_scale=scale,
                                                        v_scale=scale, backend=backend))
                k5, v5 = kp.to(torch.float8_e5m2), vp.to(torch.float8_e5m2)
                call(f"decode paged e5m2 {tag}",
                     lambda: kvkernels.decode_attention(q, k5, v5, seqlens, block_table=table, k_scale=scale,
                                                        v_scale=scale, backend=backend))
                for new in (1, 5):
                    kn, vn = randn(B, new, hkv, d, dtype=dtype), randn(B, new, hkv, d, dtype=dtype)
                    call(f"append contiguous new={new} {tag}",
                         lambda: kvkernels.append_kv(kn, vn, kc, vc, seqlens, backend=backend))
                    call(f"append paged new={new} {tag}",
                         lambda: kvkernels.append_kv(kn, vn, kp, vp, seqlens, block_table=table, backend=backend))
                    call(f"append paged fp8 new={new} {tag}",
                         lambda: kvkernels.append_kv(kn, vn, k8, v8, seqlens, block_table=table, k_scale=scale,
                                                     v_scale=scale, backend=backend))
                    call(f"append paged e5m2 new={new} {tag}",
                         lambda: kvkernels.append_kv(kn, vn, k5, v5, seqlens, block_table=table, k_scale=scale,
                                                     v_scale=scale, backend=backend))
                    # fused rotary (a partial rotary dim that is not a whole number of vectors too)
                    for rd in (d, 40):
                        ang = torch.arange(s_max + new, device=kn.device)[:, None] * torch.rand(rd // 2, device=kn.device)
                        cos, sin = ang.cos(), ang.sin()
                        call(f"append paged rotary rd={rd} new={new} {tag}",
                             lambda: kvkernels.append_kv(kn, vn, kp, vp, seqlens, block_table=table, rotary_cos=cos,
                                                         rotary_sin=sin, backend=backend))
                        call(f"append paged fp8 rotary interleaved rd={rd} new={new} {tag}",
                             lambda: kvkernels.append_kv(kn, vn, k8, v8, seqlens, block_table=table, k_scale=scale,
                                                         v_scale=scale, rotary_cos=cos, rotary_sin=sin,
                                                         rotary_interleaved=True, backend=backend))
    print(f"sanitize_ops: {ran} calls ran, {skipped} skipped (unsupported), {failed} failed")
    return 1 if failed else 0


def parse(log_path: str, tool: str, status: str, seconds: float | None) -> dict:
    """The results entry for one compute-sanitizer run: its error count and where the errors were."""
    text = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
    summary = re.findall(r"ERROR SUMMARY:\s*(\d+) error", text)
    kernels = sorted(set(re.findall(r"=========\s+(?:at|in)\s+(?:0x[0-9a-f]+\s+in\s+)?([A-Za-z_][\w:<>, ]*?)(?:\(|\+0x)", text)))
    ran = re.search(r"sanitize_ops: (\d+) calls ran, (\d+) skipped \(unsupported\), (\d+) failed", text)
    entry = {"errors": int(summary[-1]) if summary else None, "ran": bool(summary), "status": status,
             "kernels_with_errors": kernels[:20]}
    if ran:
        entry.update(calls=int(ran.group(1)), skipped=int(ran.group(2)), failed_calls=int(ran.group(3)))
    if seconds is not None:
        entry["seconds"] = round(seconds, 1)
    if tool == "racecheck":
        hazards = re.findall(r"RACECHECK SUMMARY:\s*(\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
        if hazards:
            entry["hazards"], entry["warnings"] = int(hazards[-1][0]), int(hazards[-1][2])
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fp16 and head dim 128 only")
    p.add_argument("--parse", metavar="LOG", help="parse a compute-sanitizer log instead of running")
    p.add_argument("--tool", default="memcheck")
    p.add_argument("--status", default="ok")
    p.add_argument("--seconds", type=float, default=None)
    args = p.parse_args(argv)
    if args.parse:
        print(json.dumps(parse(args.parse, args.tool, args.status, args.seconds)))
        return 0
    t0 = time.time()
    rc = workload(args.quick)
    print(f"sanitize_ops: {time.time() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
