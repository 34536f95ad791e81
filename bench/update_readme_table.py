"""The latest GPU results as a compact Markdown table, for the top-level README.

    python bench/update_readme_table.py                      # print the table
    python bench/update_readme_table.py --readme README.md   # replace the block between the markers

The README holds the block between these two lines (the script rewrites what is inside):

    <!-- bench-table:begin -->
    <!-- bench-table:end -->

The latest results file is the newest bench/results/*.json (by date in the file, then name) whose
device is a GPU; CPU runs (device "cpu") are never shown: their timings are not GPU figures.
Per point: our kernels' throughput and fraction of the copy ceiling (decode, append) or TFLOP/s
(prefill), the best peer measured on the same inputs, and our speed-up over it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvkernels.benchmark import results  # noqa: E402

BEGIN = "<!-- bench-table:begin -->"
END = "<!-- bench-table:end -->"
OURS = ("kvkernels-cuda", "kvkernels-triton")


def latest_gpu_results(results_dir: str) -> tuple[str, dict] | None:
    found = []
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        try:
            doc = results.load(path)
            results.validate(doc)
        except (OSError, ValueError, json.JSONDecodeError):
            continue
        if doc["device"] != "cpu" and doc["records"]:
            found.append((doc["date"], os.path.basename(path), path, doc))
    if not found:
        return None
    found.sort()
    return found[-1][2], found[-1][3]


def _metric(op: str, rec: dict) -> float:
    return rec["tflops"] if op == "prefill" else rec["gbps"]


def _fmt(op: str, rec: dict | None) -> str:
    if rec is None:
        return "—"
    if op == "prefill":
        return f"{rec['tflops']:.0f} TFLOP/s"
    rate = rec["gbps"]
    rate_s = f"{rate / 1000:.2f} TB/s" if rate >= 1000 else f"{rate:.0f} GB/s"
    return f"{rate_s} ({100 * rec['fraction']:.0f}%)"


# The README shows one row per series: the largest context (decode) or batch (append) of each;
# prefill keeps every sequence length. The full grid is in the results' own .md.
SERIES_AXIS = {"decode": "context", "append": "batch", "prefill": None}


def representative(records: list[dict], op: str) -> list[dict]:
    axis = SERIES_AXIS[op]
    recs = [r for r in records if r["op"] == op]
    if axis is None:
        return recs
    largest: dict[str, int] = {}
    for r in recs:
        key = results.point_key({k: v for k, v in r["config"].items() if k != axis})
        largest[key] = max(largest.get(key, 0), r["config"][axis])
    return [r for r in recs
            if r["config"][axis] == largest[results.point_key({k: v for k, v in r["config"].items() if k != axis})]]


def op_rows(doc: dict, op: str) -> list[str]:
    points: dict[str, dict] = {}
    for r in representative(doc["records"], op):
        points.setdefault(results.point_key(r["config"]), {})[r["impl"]] = r
    rows = []
    for key, recs in points.items():
        ours = [recs[i] for i in OURS if i in recs]
        if not ours:
            continue
        peers = [r for i, r in recs.items() if i not in OURS]
        best_peer = max(peers, key=lambda r: _metric(op, r)) if peers else None
        best_ours = max(ours, key=lambda r: _metric(op, r))
        speedup = (f"{_metric(op, best_ours) / _metric(op, best_peer):.2f}×"
                   if best_peer and _metric(op, best_peer) > 0 else "—")
        cfg = best_ours["config"]
        label = results._point_label(op, cfg)
        cells = label + [_fmt(op, recs.get(i)) for i in OURS]
        cells += [f"{_fmt(op, best_peer)} {best_peer['impl']}" if best_peer else "—", speedup]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def table(path: str, doc: dict) -> str:
    c = doc["ceilings"]
    v = doc["versions"]
    out = [f"Latest GPU results: **{doc['device']}**, {doc['date']}, commit `{doc['commit'][:12]}` "
           f"(torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}). Ceilings measured in the "
           f"same run: copy {c['copy_gbps'] / 1000:.2f} TB/s, bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s. "
           f"Full table and plots: [{os.path.basename(path)[:-5]}.md](bench/results/{os.path.basename(path)[:-5]}.md).", ""]
    names = {"decode": "Decode at the longest context measured (GB/s, % of copy ceiling)",
             "prefill": "Prefill (TFLOP/s)",
             "append": "Append at the largest batch measured (GB/s, % of copy ceiling)"}
    for op in ("decode", "prefill", "append"):
        rows = op_rows(doc, op)
        if not rows:
            continue
        head = results._headers(op) + ["kvkernels cuda", "kvkernels triton", "best peer", "speed-up"]
        out += [f"**{names[op]}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows + [""]
    for e in doc.get("generate", []):
        out.append(f"Generation ({e['config']['layers']} layers × {e['config']['heads']} heads × "
                   f"{e['config']['head_dim']}, {e['config']['tokens']} tokens): "
                   f"{e['with_cache']['us_per_token']:.0f} µs/token with the KV cache, "
                   f"{e['without_cache']['us_per_token']:.0f} without ({e['speedup']:.1f}×), "
                   f"tokens identical: {'yes' if e['tokens_identical'] else 'no'}.")
    return "\n".join(out).rstrip() + "\n"


def replace_block(text: str, block: str) -> str:
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the README needs the two marker lines {BEGIN} and {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--readme", help="README to update in place (between the markers)")
    args = p.parse_args(argv)
    found = latest_gpu_results(args.results_dir)
    if found is None:
        print(f"no GPU results in {args.results_dir}", file=sys.stderr)
        return 1
    block = table(*found)
    if args.readme:
        with open(args.readme) as f:
            text = f.read()
        try:
            new = replace_block(text, block)
        except ValueError as e:
            print(f"{args.readme}: {e}", file=sys.stderr)
            return 2
        with open(args.readme, "w") as f:
            f.write(new)
        print(f"updated {args.readme} from {found[0]}")
    else:
        sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
