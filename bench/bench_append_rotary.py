"""Benchmark the rotary embedding fused into append_kv against rotating first and appending after.

    python bench/bench_append_rotary.py --list                 # the scenarios (any machine)
    python bench/bench_append_rotary.py --out bench/results/append_rotary.json   # time them (GPU)

Two ways to store rotated keys, per backend ("cuda", "triton"):
  fused     append_kv(k, v, ..., rotary_cos=cos, rotary_sin=sin): one launch reads k and v once,
            rotates k in registers and writes both caches.
  unfused   k_rot = apply_rotary(k, cos, sin, positions) (PyTorch elementwise ops: their own
            launches, k read and k_rot written once more), then append_kv(k_rot, v, ...).
Both store the same bits in a cache of k's dtype (tests/test_rotary.py checks it); the script
checks it again on its first set before timing. Bytes are those of a plain append (new K/V read,
slots written), so GB/s compares directly with `kvkernels bench append`; the fused/unfused ratio
is the headline. Timing (kvkernels.benchmark.timing, CUDA events or graphs, input sets rotated past
L2) only means something on a GPU: without one, --list prints the scenarios and a run is refused
unless --cpu-smoke asks for a correctness-only pass on tiny shapes (its wall clock is not a GPU figure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

import kvkernels  # noqa: E402
from kvkernels.benchmark import timing  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def scenarios(args) -> list[dict]:
    out = []
    for batch in args.batch:
        for new in args.new_tokens:
            out.append({"batch": batch, "new_tokens": new, "context": args.context, "hkv": args.hkv,
                        "head_dim": args.head_dim, "rotary_dim": args.rotary_dim or args.head_dim,
                        "interleaved": args.interleaved, "dtype": args.dtype, "page_size": args.page_size})
    return out


def rope_table(max_position: int, rotary_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 10000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


def build(sc: dict, device, n_sets: int):
    """n_sets appends of sc's shape into one cache pair (set i at context + i * new, disjoint slots)."""
    B, new, ctx, hkv, d = (sc[k] for k in ("batch", "new_tokens", "context", "hkv", "head_dim"))
    dtype = DTYPES[sc["dtype"]]
    capacity = ctx + n_sets * new
    if sc["page_size"]:
        ps = sc["page_size"]
        max_pages = -(-capacity // ps)
        table = torch.randperm(B * max_pages).reshape(B, max_pages).to(torch.int32).to(device)
        shape = (B * max_pages, ps, hkv, d)
    else:
        table, shape = None, (B, capacity, hkv, d)
    kc = torch.zeros(shape, dtype=dtype, device=device)
    vc = torch.zeros(shape, dtype=dtype, device=device)
    cos, sin = rope_table(capacity, sc["rotary_dim"], device)
    sets = []
    for i in range(n_sets):
        start = ctx + i * new
        sets.append({"k": torch.randn(B, new, hkv, d, device=device).to(dtype),
                     "v": torch.randn(B, new, hkv, d, device=device).to(dtype),
                     "seqlens": torch.full((B,), start, dtype=torch.int32, device=device),
                     "positions": (start + torch.arange(new, device=device)).expand(B, new).contiguous()})
    return kc, vc, table, cos, sin, sets


def plain_bytes(sc: dict) -> int:
    elem = torch.empty((), dtype=DTYPES[sc["dtype"]]).element_size()
    return 2 * sc["batch"] * sc["new_tokens"] * sc["hkv"] * sc["head_dim"] * 2 * elem


def run(sc: dict, backend: str, device, args) -> dict:
    on_gpu = timing.on_gpu(device)
    n_sets = timing.rotation_for(plain_bytes(sc), device)[0] if on_gpu else 2
    kc, vc, table, cos, sin, sets = build(sc, device, n_sets)
    il = sc["interleaved"]

    def fused(i):
        s = sets[i]
        kvkernels.append_kv(s["k"], s["v"], kc, vc, s["seqlens"], block_table=table, rotary_cos=cos,
                            rotary_sin=sin, rotary_interleaved=il, backend=backend)

    def unfused(i):
        s = sets[i]
        k_rot = kvkernels.apply_rotary(s["k"], cos, sin, s["positions"], interleaved=il)
        kvkernels.append_kv(k_rot, s["v"], kc, vc, s["seqlens"], block_table=table, backend=backend)

    # the two must store the same bits before either is worth timing
    fused(0)
    after_fused = kc.clone()
    unfused(0)
    same = bool(torch.equal(after_fused.view(torch.uint8), kc.view(torch.uint8)))
    row = dict(sc, backend=backend, device=str(device), same_bits=same)
    for name, fn in (("fused", fused), ("unfused", unfused)):
        t = timing.measure(fn, n_sets, device, cuda_graph=args.cuda_graph and on_gpu)
        row[f"{name}_us"] = t.median_us
        row[f"{name}_method"] = t.method
        row[f"{name}_gbps"] = plain_bytes(sc) / (t.median_us * 1e3) if t.median_us else None
    row["speedup"] = row["unfused_us"] / row["fused_us"] if row["fused_us"] else None
    return row


def sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=sizes, default=[1, 32, 128])
    p.add_argument("--new-tokens", type=sizes, default=[1, 512])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rotary-dim", type=int, default=0, help="0: the head dim (full rotary)")
    p.add_argument("--interleaved", action="store_true", help="GPT-J pairs (default GPT-NeoX halves)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--page-size", type=int, default=16, help="0: a contiguous cache")
    p.add_argument("--backend", type=lambda s: s.split(","), default=["cuda", "triton"])
    p.add_argument("--cuda-graph", action="store_true", help="also replay the calls in a CUDA graph")
    p.add_argument("--list", action="store_true", help="print the scenarios and exit (no GPU needed)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="without a GPU: run tiny shapes on CPU tensors (correctness only, not a timing)")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        args.batch, args.new_tokens, args.context, args.hkv, args.head_dim = [2], [1, 3], 8, 2, 64
    todo = scenarios(args)
    if args.list:
        for sc in todo:
            for backend in args.backend:
                print(f"{backend:7s} " + " ".join(f"{k}={v}" for k, v in sc.items()) + "  fused vs unfused")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.cpu_smoke:
        print("no GPU: timings would be CPU wall clock; use --list, or --cpu-smoke for a correctness pass")
        return 2
    rows = []
    for sc in todo:
        for backend in args.backend:
            try:
                row = run(sc, backend, device, args)
            except (ValueError, RuntimeError) as e:
                print(f"{backend}: skipped ({str(e).splitlines()[0]})")
                continue
            rows.append(row)
            print(f"{backend:7s} B={sc['batch']:<4d} new={sc['new_tokens']:<4d} fused {row['fused_us']:9.1f} us  "
                  f"unfused {row['unfused_us']:9.1f} us  x{row['speedup']:.2f}  same bits: {row['same_bits']}"
                  + ("  (CPU wall clock, not a GPU figure)" if device.type != "cuda" else ""))
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0 if all(r["same_bits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
