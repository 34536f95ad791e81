"""`kvkernels bench {decode,prefill,append,generate}`: sweeps against the copy/matmul ceilings and peers.

Examples:
    kvkernels bench decode --preset llama-3-8b,llama-3-70b --batch 1,16,64 --context 1k,4k,16k,64k \\
        --page-size 0,16 --fp8 both --cuda-graph --out bench/results/decode.json
    kvkernels bench prefill --seqlen 512,2k,8k --causal both --out prefill.json --merge
    kvkernels bench append --batch 1,64 --new-tokens 1,512 --out r.json --merge
    kvkernels bench generate --tokens 256,1024 --out r.json --merge

Lists are comma-separated; sizes take k/m suffixes (4k = 4096). --out writes the JSON, a Markdown
table beside it (.md) and PNG plots (unless --no-plots); --merge folds the new records into an
existing --out file. Without a GPU the defaults are tiny and the results say device "cpu": those
timings are not GPU figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ..cliargs import parse_size, parse_sizes, size, sizes  # noqa: F401  (parse_size: used by scripts)

OPS = ("decode", "prefill", "append", "cache", "generate")

# Defaults: full sweeps on a GPU, tiny ones on the CPU (seconds, Triton interpreted).
DEFAULTS = {
    "gpu": {
        "decode": {"preset": "llama-3-8b", "batch": "1,16,64", "context": "512,2k,8k,32k", "page_size": "0,16",
                   "fp8": "off", "dtype": "bf16"},
        "prefill": {"preset": "llama-3-8b", "batch": "1", "seqlen": "512,1k,2k,4k,8k,16k", "causal": "on",
                    "dtype": "bf16"},
        "append": {"preset": "llama-3-8b", "batch": "1,32,128", "context": "4k", "new_tokens": "1,512",
                   "page_size": "0,16", "fp8": "both", "dtype": "bf16"},
        "cache": {"preset": "llama-3-8b", "scenario": "speculative,chunked-prefill,mixed", "dtype": "bf16"},
        "generate": {"tokens": "256,1024", "prompt": 16, "dtype": "bf16"},
    },
    "cpu": {
        "decode": {"heads": "4/2", "head_dim": "64", "batch": "1,2", "context": "16,48", "page_size": "0,16",
                   "fp8": "off", "dtype": "fp16"},
        "prefill": {"heads": "4/2", "head_dim": "64", "batch": "1", "seqlen": "16,32", "causal": "on",
                    "dtype": "fp16"},
        "append": {"heads": "4/2", "head_dim": "64", "batch": "2", "context": "16", "new_tokens": "1,4",
                   "page_size": "0,16", "fp8": "off", "dtype": "fp16"},
        "cache": {"heads": "4/2", "head_dim": "32", "scenario": "speculative,mixed", "dtype": "fp16", "scale": 64},
        "generate": {"tokens": "8", "prompt": 4, "dtype": "fp32"},
    },
}


# ------------------------------------------------------------------------------------- parsing


def parse_list(text) -> list[str]:
    if isinstance(text, (list, tuple)):
        return list(text)
    return [x.strip() for x in str(text).split(",") if x.strip()]


def parse_heads(text) -> list[tuple[int, int]]:
    """'32/8,8' -> [(32, 8), (8, 8)]; a parsed list passes through."""
    if isinstance(text, list):
        return text
    out = []
    for item in parse_list(text):
        hq_text, _, hkv_text = item.partition("/")
        try:
            hq, hkv = int(hq_text), int(hkv_text or hq_text)
        except ValueError:
            raise ValueError(f"{item!r} is not Hq/Hkv: expected e.g. 32/8, or 8 for 8/8") from None
        if hq < 1 or hkv < 1 or hq % hkv:
            raise ValueError(f"{item!r}: heads must be >= 1 and Hq a multiple of Hkv")
        out.append((hq, hkv))
    if not out:
        raise ValueError("expected at least one Hq/Hkv pair")
    return out


def _heads_arg(text):
    try:
        return parse_heads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _number(minimum: float, strict: bool = False):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > minimum if strict else value >= minimum) or value != value:
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if strict else '>='} {minimum:g}")
        return value
    parse.__name__ = "number"
    return parse


def _preset_names() -> list[str]:
    from .presets import PRESETS
    return list(PRESETS)


def _switch(value: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[value]


# ----------------------------------------------------------------------------------- arguments


def _common(p: argparse.ArgumentParser, op: str) -> None:
    g = p.add_argument_group("what to measure")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    if op != "generate":
        g.add_argument("--preset", default=None,
                       help="model shapes, comma-separated, named as in `kvkernels memory`: "
                            f"{', '.join(_preset_names())} (sets Hq/Hkv/D; overrides --heads/--head-dim)")
        g.add_argument("--heads", type=_heads_arg, default=None, help="Hq/Hkv pairs, e.g. 32/8,8/8")
        g.add_argument("--head-dim", type=sizes(1), default=None, help="head dims, e.g. 64,128")
        g.add_argument("--batch", type=sizes(1), default=None, help="batch sizes, e.g. 1,16,64")
        g.add_argument("--dtype", default=None, help="bf16, fp16 (comma-separated)")
        g.add_argument("--impls", default=None, help="comma-separated subset of implementations "
                       "(kvkernels-cuda, kvkernels-triton, flashinfer, sdpa-flash, sdpa-cudnn, "
                       "sdpa-efficient, sdpa-math, flex, naive); default all")
        g.add_argument("--exclude", default=None, help="implementations to leave out")
        g.add_argument("--no-check", action="store_true", help="skip comparing outputs with the fp32 oracle")
        t = p.add_argument_group("timing")
        t.add_argument("--timer", choices=("events", "do_bench"), default="events",
                       help="CUDA events per call (default) or triton.testing.do_bench")
        t.add_argument("--cuda-graph", action="store_true",
                       help="also time each impl replayed from a CUDA graph (no launch overhead); the "
                            "graph time becomes the headline median")
        t.add_argument("--warmup-ms", type=_number(0), default=None)
        t.add_argument("--rep-ms", type=_number(0, strict=True), default=None, help="time spent measuring each impl")
        t.add_argument("--max-sets", type=size(1), default=None, help="cap on rotated input sets")
    p.add_argument("--budget-s", type=_number(0, strict=True), default=None,
                   help="stop starting new points after this many seconds (the points done are kept)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="write results JSON here (+ .md and PNGs beside it)")
    o.add_argument("--merge", action="store_true", help="merge into --out if it exists (reusing its ceilings)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--sanitizer", default=None, help="JSON with compute-sanitizer results to attach")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_op", required=True, metavar="{decode,prefill,append,cache,generate}")
    helps = {"decode": "decode attention over contiguous / paged / fp8 caches (GB/s vs the copy ceiling)",
             "prefill": "prefill attention (TFLOP/s vs the matmul ceiling)",
             "append": "KV cache append (GB/s vs the copy ceiling)",
             "cache": "cache attention: several queries per sequence against a paged cache (speculative decoding, "
                      "chunked prefill, mixed batches)",
             "generate": "GPT-2-small-shaped generation with and without the KV cache"}
    for op in OPS:
        p = sub.add_parser(op, help=helps[op], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p, op)
        s = p.add_argument_group(f"{op} sweep")
        if op in ("decode", "append"):
            s.add_argument("--context", type=sizes(1), default=None,
                           help="tokens already in each sequence's cache, e.g. 1k,4k")
            s.add_argument("--page-size", type=sizes(0), default=None, help="page sizes; 0 = contiguous cache, e.g. 0,16")
            s.add_argument("--fp8", choices=("off", "on", "both"), default=None,
                           help="fp8 KV cache (format: --fp8-format)")
            s.add_argument("--fp8-format", choices=("e4m3", "e5m2"), default="e4m3",
                           help="the fp8 cache's format with --fp8 on/both: float8_e4m3fn (default) or float8_e5m2")
        if op == "append":
            s.add_argument("--new-tokens", type=sizes(1), default=None, help="tokens appended per sequence, e.g. 1,512")
        if op == "prefill":
            s.add_argument("--seqlen", type=sizes(1), default=None, help="prompt lengths (Sq = Sk), e.g. 512,2k,8k")
            s.add_argument("--causal", choices=("off", "on", "both"), default=None)
        if op == "cache":
            s.add_argument("--scenario", default=None,
                           help="speculative (B=32, 4 queries, 8K), chunked-prefill (2048 queries over 32K), "
                                "mixed (a 1024-query chunk over 4K beside 32 decodes over 8K); comma-separated")
            s.add_argument("--scale", type=size(1), default=None,
                           help="divide every scenario's token counts by this (CPU runs use 64)")
        if op == "generate":
            s.add_argument("--tokens", type=sizes(1), default=None, help="tokens to generate, e.g. 256,1024,4096")
            s.add_argument("--prompt", type=size(1), default=None, help="prompt length")
            s.add_argument("--batch", type=size(1), default=1)
            s.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="bf16, fp16 or fp32")
            s.add_argument("--layers", type=size(1), default=None)
            s.add_argument("--heads", type=size(1), default=None)
            s.add_argument("--head-dim", type=size(1), default=None)
            s.add_argument("--vocab", type=size(1), default=None)
            s.add_argument("--backend", choices=("auto", "cuda", "triton", "reference"), default="auto")
            s.add_argument("--cache", choices=("paged", "contiguous"), default="paged")
            s.add_argument("--page-size", type=size(1), default=16)


# ------------------------------------------------------------------------------------- configs


def _value(args, name, defaults):
    v = getattr(args, name, None)
    return defaults.get(name) if v is None else v


def _shapes(args, defaults) -> list[tuple[int, int, int, str | None]]:
    from .presets import resolve
    preset = args.preset if args.preset is not None else (None if (args.heads or args.head_dim) else defaults.get("preset"))
    if preset:
        return [(m.hq, m.hkv, m.head_dim, m.name) for m in resolve(preset)]
    heads = parse_heads(_value(args, "heads", defaults) or "32/8")
    dims = parse_sizes(_value(args, "head_dim", defaults) or "128", 1)
    return [(hq, hkv, d, None) for (hq, hkv) in heads for d in dims]


def build_configs(op: str, args, device) -> list[dict]:
    """The sweep's points, most important first (contiguous before paged, fp8 last), so a time
    budget cuts the least important ones."""
    from . import append, decode, prefill
    d = DEFAULTS["gpu" if device.type == "cuda" else "cpu"][op]
    shapes = _shapes(args, d)
    batch = _value(args, "batch", d)
    batches = parse_sizes(batch, 1) if batch is not None else [None]  # cache: None = the scenario's own
    dtypes = parse_list(_value(args, "dtype", d))
    configs = []
    fp8_format = getattr(args, "fp8_format", None) or "e4m3"
    if op == "decode":
        for fp8 in _switch(_value(args, "fp8", d)):
            fp8 = fp8 and fp8_format
            for ps in parse_sizes(_value(args, "page_size", d)):
                for (hq, hkv, hd, preset) in shapes:
                    for dt in dtypes:
                        for b in batches:
                            for ctx in parse_sizes(_value(args, "context", d)):
                                configs.append(decode.make_config(b, ctx, hq, hkv, hd, dt, ps, fp8, preset))
    elif op == "prefill":
        for causal in reversed(_switch(_value(args, "causal", d))):
            for (hq, hkv, hd, preset) in shapes:
                for dt in dtypes:
                    for b in batches:
                        for s in parse_sizes(_value(args, "seqlen", d)):
                            configs.append(prefill.make_config(b, s, hq, hkv, hd, dt, causal, preset))
    elif op == "append":
        for fp8 in _switch(_value(args, "fp8", d)):
            fp8 = fp8 and fp8_format
            for ps in parse_sizes(_value(args, "page_size", d)):
                for (hq, hkv, hd, preset) in shapes:
                    for dt in dtypes:
                        for new in parse_sizes(_value(args, "new_tokens", d)):
                            for b in batches:
                                for ctx in parse_sizes(_value(args, "context", d)):
                                    configs.append(append.make_config(b, ctx, new, hq, hkv, hd, dt, ps, fp8, preset))
    elif op == "cache":
        from . import cache_attention
        shrink = max(1, int(_value(args, "scale", d) or 1))
        wanted = parse_list(_value(args, "scenario", d))
        known = {sc["scenario"] for sc in cache_attention.scenarios()}
        if set(wanted) - known:
            raise ValueError(f"--scenario: unknown {sorted(set(wanted) - known)}; choose from {sorted(known)}")
        for (hq, hkv, hd, preset) in shapes:
            for dt in dtypes:
                for sc in cache_attention.scenarios(dt, hq, hkv, hd):
                    if sc["scenario"] not in wanted:
                        continue
                    sc = cache_attention.shrink(sc, shrink) | {"preset": preset}
                    # --batch (default: the scenario's own) sets the number of multi-query sequences.
                    for b in batches:
                        configs.append(sc | {"batch": b} if b else sc)
    return configs


def select_impls(op: str, args) -> list[str]:
    from . import peers
    offered = peers.impls_for(op)
    chosen = parse_list(args.impls) if args.impls else offered
    unknown = [i for i in chosen if i not in peers._PREPARE]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; known: {', '.join(peers._PREPARE)}")
    excluded = set(parse_list(args.exclude)) if args.exclude else set()
    return [i for i in offered if i in chosen and i not in excluded]


# ------------------------------------------------------------------------------------------ run


def _device(args) -> torch.device:
    if args.device:
        dev = torch.device(args.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _document(args, device):
    from . import results, timing
    if args.out and args.merge and os.path.exists(args.out):
        old = results.load(args.out)
        if old.get("device") != results.device_name(device):
            raise ValueError(f"--merge: {args.out} holds results of {old.get('device')!r}, not of this "
                             f"{results.device_name(device)!r}; write to another file")
        if old.get("ceilings"):
            return old, True
    ceilings = timing.measure_ceilings(device)
    return results.new_document(device, ceilings), False


def run(args) -> int:
    from . import results
    try:
        device = _device(args)
    except ValueError as e:
        print(f"kvkernels bench: {e}", file=sys.stderr)
        return 2
    op = args.bench_op
    t0 = time.monotonic()
    try:
        if op != "generate":
            configs = build_configs(op, args, device)
            impls = select_impls(op, args)
        doc, reused = _document(args, device)
    except ValueError as e:
        print(f"kvkernels bench {op}: {e}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        print(f"kvkernels bench {op}: {results.CPU_NOTE}", file=sys.stderr)

    def assemble(records, skipped, generate, notes):
        new = dict(doc, records=records, skipped=skipped, generate=generate, notes=notes)
        out = results.merge(doc, new) if reused else new
        if args.sanitizer and os.path.exists(args.sanitizer):
            out["sanitizer"] = {**results.empty_sanitizer(), **results.load(args.sanitizer)}
        if device.type == "cpu" and results.CPU_NOTE not in out["notes"]:
            out["notes"].insert(0, results.CPU_NOTE)
        return out

    if op == "generate":
        doc = assemble([], [], _run_generate(args, device), [])
    else:
        def checkpoint(sweep):  # after every point: a killed run keeps what it measured
            if args.out:
                results.save(assemble(sweep.records, sweep.skipped, [], sweep.notes), args.out)

        sweep = _run_sweep(op, configs, impls, args, device, doc["ceilings"]["copy_gbps"], checkpoint)
        doc = assemble(sweep.records, sweep.skipped, [], sweep.notes)
    results.validate(doc)

    if args.out:
        paths = results.write_outputs(doc, args.out, plots=not args.no_plots)
        print(results.to_markdown(_only(doc, op)))
        print("\n".join(f"wrote {p}" for p in paths.values()))
    else:
        print(results.to_markdown(_only(doc, op)))
    print(f"[{op}: {time.monotonic() - t0:.1f} s]", file=sys.stderr)
    return 0


def _only(doc: dict, op: str) -> dict:
    """The document restricted to this op (what was just measured), for the terminal."""
    return dict(doc, records=[r for r in doc["records"] if r["op"] == op],
                skipped=[s for s in doc.get("skipped", []) if s["op"] == op],
                generate=doc.get("generate", []) if op == "generate" else [])


def _run_sweep(op, configs, impls, args, device, copy_gbps, on_point=None):
    from . import append, cache_attention, decode, prefill, runner
    module = {"decode": decode, "prefill": prefill, "append": append, "cache": cache_attention}[op]
    gpu = device.type == "cuda"
    opts = runner.SweepOptions(
        device=device, impls=impls, method=args.timer, cuda_graph=args.cuda_graph and gpu,
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else (10.0 if gpu else 0.0),
        rep_ms=args.rep_ms if args.rep_ms is not None else (50.0 if gpu else 10.0),
        min_reps=5 if gpu else 2, budget_s=args.budget_s, check=not args.no_check, seed=args.seed,
        progress=not args.no_progress, copy_gbps=copy_gbps, max_sets=args.max_sets)
    if args.cuda_graph and not gpu:
        print("kvkernels bench: --cuda-graph needs a GPU; timing eagerly", file=sys.stderr)
    return runner.run_sweep(module, configs, opts, on_point=on_point)


def _run_generate(args, device) -> list[dict]:
    from . import generate as g
    from .runner import _progress
    gpu = device.type == "cuda"
    d = DEFAULTS["gpu" if gpu else "cpu"]["generate"]
    shape = g.GPT2_SMALL if gpu else g.TINY
    entries = []
    tokens = parse_sizes(args.tokens or d["tokens"])
    t0 = time.monotonic()
    for n in _progress(tokens, len(tokens), "bench generate", not args.no_progress):
        if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
            break
        cfg = g.GenerateConfig(layers=args.layers or shape["layers"], heads=args.heads or shape["heads"],
                               head_dim=args.head_dim or shape["head_dim"], vocab=args.vocab or shape["vocab"],
                               prompt=args.prompt or d["prompt"], tokens=n, batch=args.batch,
                               dtype=args.dtype or d["dtype"],
                               backend=None if args.backend == "auto" else args.backend, cache=args.cache,
                               page_size=args.page_size, seed=args.seed)
        entries.append(g.run_generate(cfg, device))
    return entries


def main(argv=None) -> int:
    """`python -m kvkernels.benchmark.cli decode ...` (same as `kvkernels bench decode ...`)."""
    parser = argparse.ArgumentParser(prog="kvkernels bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
