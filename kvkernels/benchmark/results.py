"""The results schema, merging, Markdown tables and plots.

One results document (JSON) per run:

    {"device": torch.cuda.get_device_name() or "cpu", "date": "YYYY-MM-DD", "commit": "<sha>",
     "versions": {"torch", "triton", "cuda", ...},
     "ceilings": {"copy_gbps": float, "matmul_bf16_tflops": float},
     "sanitizer": {"memcheck": {"errors": int | None, ...}, "racecheck": {"errors": int | None, ...}},
     "records": [{"op": "prefill" | "decode" | "append", "impl": one of IMPLS,
                  "config": {"batch", "context" or "seqlen", "hq", "hkv", "head_dim", "dtype",
                             "paged", "page_size", "causal", ...},
                  "median_us", "bytes", "gbps", "fraction", "flops", "tflops", ...}],
     ...}

Records of different impls on the same point carry identical config dicts. gbps = bytes / time
(1e9 B/s), fraction = gbps / copy_gbps, tflops = flops / time. Extra keys (host_us, graph_us,
max_abs_err, "skipped", "generate", "notes", "checks") are additions that readers may ignore.

    python -m kvkernels.benchmark.results render  RESULTS.json           # rewrite .md and PNGs
    python -m kvkernels.benchmark.results merge   OUT.json A.json B.json
    python -m kvkernels.benchmark.results attach  RESULTS.json --sanitizer S.json --checks C.json
    python -m kvkernels.benchmark.results summary RESULTS.json
    python -m kvkernels.benchmark.results validate RESULTS.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

OPS = ("prefill", "decode", "append", "cache")
IMPLS = ("kvkernels-cuda", "kvkernels-triton", "flashinfer", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient",
         "sdpa-math", "flex", "naive")
RECORD_KEYS = ("op", "impl", "config", "median_us", "bytes", "gbps", "fraction", "flops", "tflops")
CONFIG_KEYS = ("batch", "hq", "hkv", "head_dim", "dtype", "paged", "page_size", "causal")
CPU_NOTE = "Measured on the CPU (PyTorch on CPU, Triton interpreted): these timings are not GPU figures."

# ------------------------------------------------------------------------------------ building


def today() -> str:
    return datetime.date.today().isoformat()


def git_commit(root: str | os.PathLike | None = None) -> str:
    """KVKERNELS_COMMIT if set, else `git rev-parse HEAD` (+ '-dirty'), else 'unknown'."""
    env = os.environ.get("KVKERNELS_COMMIT")
    if env:
        return env
    root = str(root or Path(__file__).resolve().parents[2])
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    import platform

    import torch
    out = {"torch": torch.__version__, "triton": None, "cuda": torch.version.cuda,
           "python": platform.python_version(), "kvkernels": None, "flashinfer": None}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import kvkernels
        out["kvkernels"] = kvkernels.__version__
    except ImportError:
        pass
    from . import peers
    out["flashinfer"] = peers.flashinfer_version()
    return out


def device_name(device) -> str:
    import torch
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def empty_sanitizer() -> dict:
    return {"memcheck": {"errors": None, "ran": False}, "racecheck": {"errors": None, "ran": False}}


def new_document(device, ceilings: dict, *, commit: str | None = None, date: str | None = None) -> dict:
    name = device_name(device)
    doc = {"device": name, "date": date or today(), "commit": commit or git_commit(), "versions": versions(),
           "ceilings": dict(ceilings), "sanitizer": empty_sanitizer(), "records": [], "skipped": [],
           "generate": [], "notes": []}
    if name == "cpu":
        doc["notes"].append(CPU_NOTE)
    return doc


def make_record(op: str, impl: str, config: dict, median_us: float, nbytes: int, flops: int,
                copy_gbps: float, **extra) -> dict:
    """One measured point. gbps = bytes / median time, fraction = gbps / copy ceiling."""
    seconds = median_us * 1e-6
    gbps = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    tflops = flops / seconds / 1e12 if seconds > 0 else 0.0
    record = {"op": op, "impl": impl, "config": dict(config), "median_us": float(median_us), "bytes": int(nbytes),
              "gbps": gbps, "fraction": gbps / copy_gbps if copy_gbps else 0.0, "flops": int(flops),
              "tflops": tflops}
    record.update(extra)
    return record


# ---------------------------------------------------------------------------------- validation


def validate(doc: dict) -> None:
    """Raise ValueError listing every way `doc` departs from the schema."""
    problems = []

    def need(cond, msg):
        if not cond:
            problems.append(msg)

    for key, kind in (("device", str), ("date", str), ("commit", str), ("versions", dict), ("ceilings", dict),
                      ("sanitizer", dict), ("records", list)):
        need(isinstance(doc.get(key), kind), f"{key!r} must be a {kind.__name__}")
    if problems:
        raise ValueError("; ".join(problems))
    need(re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc["date"]) is not None, "date must be YYYY-MM-DD")
    for key in ("torch", "triton", "cuda"):
        need(key in doc["versions"], f"versions.{key} missing")
    for key in ("copy_gbps", "matmul_bf16_tflops"):
        need(isinstance(doc["ceilings"].get(key), (int, float)), f"ceilings.{key} must be a number")
    for tool in ("memcheck", "racecheck"):
        entry = doc["sanitizer"].get(tool)
        need(isinstance(entry, dict) and "errors" in entry, f"sanitizer.{tool} must be a dict with 'errors'")
        if isinstance(entry, dict) and entry.get("errors") is not None:
            need(isinstance(entry["errors"], int), f"sanitizer.{tool}.errors must be an int or null")
    points: dict = {}
    for i, rec in enumerate(doc["records"]):
        where = f"records[{i}]"
        missing = [k for k in RECORD_KEYS if k not in rec]
        if missing:
            problems.append(f"{where} lacks {missing}")
            continue
        need(rec["op"] in OPS, f"{where}.op {rec['op']!r} not in {OPS}")
        need(rec["impl"] in IMPLS, f"{where}.impl {rec['impl']!r} not in {IMPLS}")
        cfg = rec["config"]
        need(isinstance(cfg, dict), f"{where}.config must be a dict")
        if not isinstance(cfg, dict):
            continue
        lacking = [k for k in CONFIG_KEYS if k not in cfg]
        need(not lacking, f"{where}.config lacks {lacking}")
        need("context" in cfg or "seqlen" in cfg, f"{where}.config needs 'context' or 'seqlen'")
        for k in ("median_us", "gbps", "fraction", "tflops"):
            need(isinstance(rec[k], (int, float)) and math.isfinite(rec[k]) and rec[k] >= 0,
                 f"{where}.{k} must be a finite number >= 0")
        for k in ("bytes", "flops"):
            need(isinstance(rec[k], int) and rec[k] >= 0, f"{where}.{k} must be an int >= 0")
        key = (rec["op"], rec["impl"], point_key(cfg))
        need(key not in points, f"{where} duplicates records[{points.get(key)}] (same op, impl, config)")
        points[key] = i
    if problems:
        raise ValueError("; ".join(problems))


def point_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


# --------------------------------------------------------------------------------------- merge


def merge(*docs: dict) -> dict:
    """Merge documents of one device: records are unioned, a later document's record replacing an
    earlier one at the same (op, impl, config); the first document's ceilings and metadata are
    kept (its ceilings are the run's), sanitizer results taken from whichever ran."""
    if not docs:
        raise ValueError("merge needs at least one document")
    devices = {d["device"] for d in docs}
    if len(devices) > 1:
        raise ValueError(f"cannot merge results of different devices: {sorted(devices)}")
    out = json.loads(json.dumps(docs[0]))  # deep copy
    by_key = {(r["op"], r["impl"], point_key(r["config"])): r for r in out["records"]}
    for doc in docs[1:]:
        for rec in doc.get("records", []):
            by_key[(rec["op"], rec["impl"], point_key(rec["config"]))] = json.loads(json.dumps(rec))
        for tool, entry in doc.get("sanitizer", {}).items():
            if entry and entry.get("ran"):
                out.setdefault("sanitizer", empty_sanitizer())[tool] = entry
        for key in ("skipped", "notes"):
            for item in doc.get(key, []):
                if item not in out.setdefault(key, []):
                    out[key].append(item)
        for entry in doc.get("generate", []):  # a rerun of the same generation replaces the old one
            gen = [e for e in out.get("generate", []) if point_key(e["config"]) != point_key(entry["config"])]
            out["generate"] = gen + [entry]
        if doc.get("checks"):
            out.setdefault("checks", {}).update(doc["checks"])
        out["date"] = max(out["date"], doc.get("date", out["date"]))
    out["records"] = list(by_key.values())
    return out


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def save(doc: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ------------------------------------------------------------------------------------ Markdown

_LEN_KEY = {"decode": "context", "append": "context", "prefill": "seqlen", "cache": "context"}


def _fmt_bytes_rate(gbps: float, unit: str | None = None) -> str:
    unit = unit or ("TB/s" if gbps >= 1000 else "GB/s")
    return f"{gbps / 1000:.2f} TB/s" if unit == "TB/s" else f"{gbps:.1f} GB/s"


def _fmt_us(us: float, unit: str | None = None) -> str:
    unit = unit or _time_unit([us])
    if unit == "s":
        return f"{us / 1e6:.2f} s"
    return f"{us / 1000:.2f} ms" if unit == "ms" else f"{us:.1f} us"


def _fmt_flops(tflops: float, unit: str | None = None) -> str:
    unit = unit or _flops_unit([tflops])
    if unit == "GFLOP/s":
        return f"{1000 * tflops:.3g} GFLOP/s"
    return f"{tflops:.1f} TFLOP/s"


# One unit per table column, chosen from its largest value, so a column reads top to bottom.
def _time_unit(us_values) -> str:
    top = max(us_values, default=0.0)
    return "s" if top >= 1e7 else "ms" if top >= 1e4 else "us"


def _rate_unit(gbps_values) -> str:
    return "TB/s" if max(gbps_values, default=0.0) >= 1000 else "GB/s"


def _flops_unit(tflops_values) -> str:
    return "TFLOP/s" if max(tflops_values, default=0.0) >= 1 else "GFLOP/s"


def _point_label(op: str, cfg: dict) -> list[str]:
    layout = f"paged/{cfg['page_size']}" if cfg.get("paged") else "contig"
    kv = cfg.get("kv_dtype", cfg["dtype"])
    dtype = cfg["dtype"] if kv == cfg["dtype"] else f"{cfg['dtype']}/{kv}"
    cols = [str(cfg["batch"]), str(cfg.get(_LEN_KEY[op]))]
    if op == "append":
        cols.append(str(cfg.get("new_tokens")))
    if op == "cache":
        decodes = f" + {cfg['decode_batch']}×1 over {cfg['decode_context']}" if cfg.get("decode_batch") else ""
        cols.append(f"{cfg.get('queries')}{decodes}")
    cols += [f"{cfg['hq']}/{cfg['hkv']}", str(cfg["head_dim"]), dtype]
    cols.append("causal" if cfg.get("causal") else "full") if op == "prefill" else cols.append(layout)
    return cols


def _headers(op: str) -> list[str]:
    cols = ["B", "ctx" if op != "prefill" else "S"]
    if op == "append":
        cols.append("new")
    if op == "cache":
        cols.append("queries")
    return cols + ["Hq/Hkv", "D", "dtype", "mask" if op == "prefill" else "layout"]


def _cell(op: str, rec: dict, units: tuple[str, str]) -> str:
    time_unit, rate_unit = units
    if op == "cache":  # memory- or compute-bound by the point: both rates
        return (f"{_fmt_us(rec['median_us'], time_unit)} · {_fmt_bytes_rate(rec['gbps'], rate_unit)} "
                f"({100 * rec['fraction']:.0f}%) · {_fmt_flops(rec['tflops'])}")
    if op == "prefill":
        return f"{_fmt_us(rec['median_us'], time_unit)} · {_fmt_flops(rec['tflops'], rate_unit)}"
    return (f"{_fmt_us(rec['median_us'], time_unit)} · {_fmt_bytes_rate(rec['gbps'], rate_unit)} "
            f"({100 * rec['fraction']:.0f}%)")


def _column_units(op: str, recs: list[dict]) -> tuple[str, str]:
    rates = [r["tflops"] for r in recs] if op == "prefill" else [r["gbps"] for r in recs]
    return (_time_unit([r["median_us"] for r in recs]),
            _flops_unit(rates) if op == "prefill" else _rate_unit(rates))


def _impl_order(impls) -> list[str]:
    return sorted(impls, key=lambda i: IMPLS.index(i) if i in IMPLS else len(IMPLS))


def op_table(doc: dict, op: str, impls: list[str] | None = None) -> str:
    """One row per point, one column per impl: time · throughput (fraction of the copy ceiling)."""
    recs = [r for r in doc["records"] if r["op"] == op]
    if not recs:
        return ""
    impls = _impl_order(impls or {r["impl"] for r in recs})
    rows: dict[str, dict] = {}
    configs: dict[str, dict] = {}
    for r in recs:
        key = point_key(r["config"])
        rows.setdefault(key, {})[r["impl"]] = r
        configs[key] = r["config"]
    head = _headers(op) + impls
    units = {i: _column_units(op, [r for r in recs if r["impl"] == i]) for i in impls}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, cells in rows.items():
        cols = _point_label(op, configs[key]) + [(_cell(op, cells[i], units[i]) if i in cells else "—")
                                                 for i in impls]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def to_markdown(doc: dict, *, images: dict[str, str] | None = None) -> str:
    c = doc["ceilings"]
    v = doc["versions"]
    out = [f"# kvkernels benchmark: {doc['device']}, {doc['date']}", ""]
    if doc["device"] == "cpu":
        out += [f"> {CPU_NOTE}", ""]
    out += [f"commit `{doc['commit']}` · torch {v.get('torch')} · triton {v.get('triton')} · CUDA {v.get('cuda')}"
            + (f" · flashinfer {v['flashinfer']}" if v.get("flashinfer") else ""), "",
            f"Ceilings measured in the same run: device-to-device copy **{_fmt_bytes_rate(c['copy_gbps'])}** "
            f"(bytes read + written), bf16 matmul **{c['matmul_bf16_tflops']:.3g} TFLOP/s**.", ""]
    san = doc.get("sanitizer", {})
    if any((san.get(t) or {}).get("ran") for t in ("memcheck", "racecheck")):
        parts = []
        for tool in ("memcheck", "racecheck"):
            e = san.get(tool) or {}
            parts.append(f"{tool}: {e.get('errors')} errors" if e.get("ran") else f"{tool}: not run")
        out += ["compute-sanitizer: " + ", ".join(parts), ""]
    for name, entry in (doc.get("checks") or {}).items():
        out.append(f"- {name}: {entry.get('status')}" + (f" ({entry['detail']})" if entry.get("detail") else ""))
    if doc.get("checks"):
        out.append("")
    timing = sorted({r.get("timing", "?") for r in doc["records"]})
    if timing:
        where = ("inputs rotated so the KV cache is read from device memory, not L2"
                 if doc["device"] != "cpu" else "CPU wall clock")
        out += [f"Times are medians ({', '.join(timing)}; {where}). Cells: time · throughput "
                "(fraction of the copy ceiling).", ""]
    titles = {"decode": "Decode (bytes = K/V attended + q + out)",
              "prefill": "Prefill (FLOPs = 4·B·Sq·Sk·Hq·D, halved for causal)",
              "append": "Append (bytes = new K/V read + cache slots written)",
              "cache": "Cache attention (several queries per sequence; bytes = K/V attended + q + out, "
                       "FLOPs = 4·Hq·D·positions seen)"}
    for op in ("decode", "prefill", "append", "cache"):
        table = op_table(doc, op)
        if table:
            out += [f"## {titles[op]}", "", table, ""]
            errs = correctness_summary(doc, op)
            if errs:
                out += ["max |out − fp32 reference| over the points checked: " + errs, ""]
    host = host_overhead_table(doc)
    if host:
        out += ["## Host time per Python call", "",
                "Median over the points of each op of the host time one call takes (validation, dispatch, "
                "launch), measured with launches queued and no synchronisation; CUDA graphs remove it.", "",
                host, ""]
    if doc.get("generate"):
        out += ["## Generation with and without the KV cache", "", generate_table(doc["generate"]), ""]
    if doc.get("skipped"):
        reasons: dict[tuple, int] = {}
        for s in doc["skipped"]:
            key = (s["op"], s["impl"], " ".join(str(s["reason"]).split()))  # whole reason, on one line
            reasons[key] = reasons.get(key, 0) + 1
        out += ["<details><summary>Not measured (impl does not accept the case)</summary>", ""]
        out += [f"- {op} / {impl} ×{n}: {why}" for (op, impl, why), n in sorted(reasons.items())]
        out += ["", "</details>", ""]
    for note in doc.get("notes", []):
        if note != CPU_NOTE:
            out.append(f"- {note}")
    if images:
        out.append("")
        out += [f"![{name}]({path})" for name, path in images.items()]
    return "\n".join(out).rstrip() + "\n"


def host_overhead_table(doc: dict) -> str:
    """impl x op: median host_us (GPU runs only: on the CPU host time is the whole time)."""
    if doc["device"] == "cpu":
        return ""
    cells: dict[tuple[str, str], list[float]] = {}
    for r in doc["records"]:
        if r.get("host_us") is not None:
            cells.setdefault((r["impl"], r["op"]), []).append(r["host_us"])
    if not cells:
        return ""
    ops = [op for op in OPS if any(k[1] == op for k in cells)]
    lines = ["| impl | " + " | ".join(ops) + " |", "|" + "---|" * (len(ops) + 1)]
    for impl in _impl_order({k[0] for k in cells}):
        row = [f"{statistics.median(cells[(impl, op)]):.1f} us" if (impl, op) in cells else "—" for op in ops]
        lines.append(f"| {impl} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def correctness_summary(doc: dict, op: str) -> str:
    worst: dict[str, float] = {}
    for r in doc["records"]:
        if r["op"] != op:
            continue
        if r.get("nonfinite_output"):
            worst[r["impl"]] = math.inf
        elif r.get("max_abs_err") is not None:
            worst[r["impl"]] = max(worst.get(r["impl"], 0.0), r["max_abs_err"])
    return ", ".join(f"{i} {worst[i]:.2e}" if math.isfinite(worst[i]) else f"{i} **NON-FINITE / UNWRITTEN OUTPUT**"
                     for i in _impl_order(worst))


def generate_table(entries: list[dict]) -> str:
    lines = ["| model | tokens | dtype | with cache | without | speedup | score pairs with / without | "
             "peak memory with / without | identical tokens |", "|" + "---|" * 9]
    for e in entries:
        c, w, wo = e["config"], e["with_cache"], e["without_cache"]
        mem = (f"{w['peak_bytes'] / 2**20:.0f} / {wo['peak_bytes'] / 2**20:.0f} MiB"
               if w.get("peak_bytes") is not None and wo.get("peak_bytes") is not None else "n/a")
        same = "yes" if e["tokens_identical"] else f"no (first at {e['first_divergence']})"
        lines.append(f"| {c['layers']}L×{c['heads']}H×{c['head_dim']} | {c['tokens']} | {c['dtype']} | "
                     f"{w['us_per_token']:.0f} us/tok | {wo['us_per_token']:.0f} us/tok | {e['speedup']:.1f}× | "
                     f"{w['score_pairs']:.3g} / {wo['score_pairs']:.3g} | {mem} | {same} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- plots

_STYLE = {"kvkernels-cuda": ("C3", "o", "-"), "kvkernels-triton": ("C1", "s", "-"), "flashinfer": ("C2", "^", "--"),
          "sdpa-flash": ("C0", "v", "--"), "sdpa-cudnn": ("C4", "<", "--"), "sdpa-efficient": ("C5", ">", "--"),
          "sdpa-math": ("C6", "d", ":"), "flex": ("C8", "P", "--"), "naive": ("C7", "x", ":")}


def _groups(recs: list[dict], xkey: str) -> dict[str, list[dict]]:
    """Group records by their config without the x-axis key."""
    groups: dict[str, list[dict]] = {}
    for r in recs:
        cfg = {k: v for k, v in r["config"].items() if k != xkey}
        groups.setdefault(point_key(cfg), []).append(r)
    return groups


def _group_title(op: str, cfg: dict, xkey: str | None = None) -> str:
    """What a panel holds fixed: its group's config, without the key on its x axis."""
    parts = []
    if xkey != "batch" and "batch" in cfg:
        parts.append(f"B={cfg['batch']}")
    for key, label in (("context", "ctx"), ("seqlen", "S")):
        if key in cfg and key != xkey:
            parts.append(f"{label}={cfg[key]}")
    parts += [f"H={cfg['hq']}/{cfg['hkv']}", f"D={cfg['head_dim']}", cfg["dtype"]]
    if cfg.get("kv_dtype") and cfg["kv_dtype"] != cfg["dtype"]:
        parts[-1] += f"/kv {cfg['kv_dtype']}"
    if op == "prefill":
        parts.append("causal" if cfg.get("causal") else "full")
    else:
        parts.append(f"paged/{cfg['page_size']}" if cfg.get("paged") else "contiguous")
    if op == "append" and xkey != "new_tokens":
        parts.append(f"new={cfg.get('new_tokens')}")
    return " ".join(parts)


def _panel_grid(n: int):
    import matplotlib.pyplot as plt
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


# Panels per PNG: a sweep with more groups continues in <stem>-<op>-2.png, -3.png, ... (none is dropped).
MAX_PANELS = 12


def _line_plot(doc, op, xkey, ykey, ylabel, ceiling, ceiling_label, path, title) -> list[str]:
    """One panel per group of records (same config but xkey); -> the PNG paths written."""
    import matplotlib.pyplot as plt
    recs = [r for r in doc["records"] if r["op"] == op]
    groups = list(_groups(recs, xkey).values())
    if not groups:
        return []
    pages = [groups[i:i + MAX_PANELS] for i in range(0, len(groups), MAX_PANELS)]
    written = []
    for n, page in enumerate(pages, 1):
        page_path = str(path) if n == 1 else str(path).replace(".png", f"-{n}.png")
        fig, axes = _panel_grid(len(page))
        for ax, grp in zip(axes, page):
            for impl in _impl_order({r["impl"] for r in grp}):
                pts = sorted((r["config"][xkey], r[ykey]) for r in grp if r["impl"] == impl)
                color, marker, ls = _STYLE.get(impl, ("k", ".", "-"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, linestyle=ls,
                        label=impl)
            if ceiling:
                ax.axhline(ceiling, color="k", linestyle="--", linewidth=1, label=ceiling_label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xkey)
            ax.set_ylabel(ylabel)
            ax.set_title(_group_title(op, grp[0]["config"], xkey), fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.set_ylim(bottom=0)
        axes[0].legend(fontsize=7, loc="best")
        part = f" ({n}/{len(pages)})" if len(pages) > 1 else ""
        fig.suptitle(f"{title}{part} — {doc['device']} ({doc['date']})"
                     + ("  [CPU: not GPU figures]" if doc["device"] == "cpu" else ""))
        fig.tight_layout()
        fig.savefig(page_path, dpi=110)
        plt.close(fig)
        written.append(page_path)
    return written


def plot_roofline(doc, path):
    """Achieved TFLOP/s against arithmetic intensity (FLOP per byte), under the roofline
    min(matmul ceiling, intensity * copy ceiling) of the same run."""
    import matplotlib.pyplot as plt
    recs = [r for r in doc["records"] if r["flops"] > 0 and r["bytes"] > 0]
    if not recs:
        return None
    c = doc["ceilings"]
    bw, peak = c["copy_gbps"] / 1000.0, c["matmul_bf16_tflops"]  # TB/s, TFLOP/s
    ai = [r["flops"] / r["bytes"] for r in recs]
    lo, hi = min(ai + [peak / bw]) / 4, max(ai + [peak / bw]) * 4
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak, x * bw) for x in xs], "k-", linewidth=1.5,
            label=f"roofline: copy {_fmt_bytes_rate(c['copy_gbps'])}, bf16 matmul {peak:.3g} TFLOP/s")
    markers = {"decode": "o", "prefill": "s", "cache": "^"}
    for impl in _impl_order({r["impl"] for r in recs}):
        for op in ("decode", "prefill", "cache"):
            sel = [r for r in recs if r["impl"] == impl and r["op"] == op]
            if sel:
                color = _STYLE.get(impl, ("k",))[0]
                ax.scatter([r["flops"] / r["bytes"] for r in sel], [r["tflops"] for r in sel], s=22, color=color,
                           marker=markers[op], alpha=0.8, label=f"{op} {impl}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of device memory)")
    ax.set_ylabel("TFLOP/s")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"Roofline — {doc['device']} ({doc['date']})" + ("  [CPU: not GPU figures]" if doc["device"] == "cpu" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_all(doc: dict, stem: str | os.PathLike) -> dict[str, str]:
    """Write the PNGs next to `stem` (stem-decode.png, ...); returns {name: path} of those made."""
    import matplotlib
    matplotlib.use("Agg")
    stem = str(stem)
    ceiling = doc["ceilings"]["copy_gbps"]
    made = {}
    for name, pages in (
        ("decode", _line_plot(doc, "decode", "context", "gbps", "GB/s", ceiling, "copy ceiling",
                              f"{stem}-decode.png", "Decode bandwidth vs context")),
        ("prefill", _line_plot(doc, "prefill", "seqlen", "tflops", "TFLOP/s", doc["ceilings"]["matmul_bf16_tflops"],
                               "bf16 matmul ceiling", f"{stem}-prefill.png", "Prefill throughput vs sequence length")),
        ("append", _line_plot(doc, "append", "batch", "gbps", "GB/s", ceiling, "copy ceiling",
                              f"{stem}-append.png", "Append bandwidth vs batch")),
    ):
        for n, page in enumerate(pages, 1):
            made[name if n == 1 else f"{name}-{n}"] = page
    roof = plot_roofline(doc, f"{stem}-roofline.png")
    if roof:
        made["roofline"] = roof
    return made


def write_outputs(doc: dict, json_path, *, plots: bool = True) -> dict[str, str]:
    """Save doc at json_path, its Markdown beside it (.md) and, with plots, the PNGs."""
    json_path = Path(json_path)
    validate(doc)
    save(doc, json_path)
    stem = json_path.with_suffix("")
    images = {}
    if plots:
        images = plot_all(doc, stem)
    md = to_markdown(doc, images={k: Path(v).name for k, v in images.items()})
    md_path = json_path.with_suffix(".md")
    md_path.write_text(md)
    return {"json": str(json_path), "md": str(md_path), **images}


def summary(doc: dict) -> str:
    """A few lines: ceilings, sanitizer, and per op the best fraction reached by each impl."""
    c = doc["ceilings"]
    lines = [f"{doc['device']} {doc['date']} commit {doc['commit'][:12]}: copy {c['copy_gbps']:.0f} GB/s, "
             f"bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s"]
    san = doc.get("sanitizer", {})
    lines.append("sanitizer: " + ", ".join(
        f"{t} {(san.get(t) or {}).get('errors')}" if (san.get(t) or {}).get("ran") else f"{t} not run"
        for t in ("memcheck", "racecheck")))
    for op in OPS:
        recs = [r for r in doc["records"] if r["op"] == op]
        if not recs:
            continue
        best = {}
        for r in recs:
            key = "tflops" if op == "prefill" else "fraction"
            best[r["impl"]] = max(best.get(r["impl"], 0.0), r[key])
        unit = " TFLOP/s" if op == "prefill" else " of copy"
        fmt = (lambda x: f"{x:.3g}") if op == "prefill" else (lambda x: f"{100 * x:.0f}%")
        pts = len({point_key(r["config"]) for r in recs})
        lines.append(f"{op} ({pts} points) best: " + ", ".join(f"{i} {fmt(best[i])}" for i in _impl_order(best)) + unit)
    for e in doc.get("generate", []):
        lines.append(f"generate {e['config']['tokens']} tokens: {e['speedup']:.1f}x faster with the cache, "
                     f"tokens identical: {e['tokens_identical']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvkernels.benchmark.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("render", help="rewrite the .md and PNGs of a results JSON")
    p.add_argument("json")
    p.add_argument("--no-plots", action="store_true")
    p = sub.add_parser("merge", help="merge results JSONs of one device into OUT")
    p.add_argument("out")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--no-plots", action="store_true")
    p = sub.add_parser("attach", help="attach sanitizer / check results to a results JSON")
    p.add_argument("json")
    p.add_argument("--sanitizer", help="JSON {memcheck: {...}, racecheck: {...}}")
    p.add_argument("--checks", help="JSON {phase: {status, detail, seconds}}")
    p.add_argument("--no-plots", action="store_true")
    p = sub.add_parser("summary", help="print a short summary")
    p.add_argument("json")
    p = sub.add_parser("validate", help="check a results JSON against the schema")
    p.add_argument("json")
    args = parser.parse_args(argv)

    if args.cmd == "validate":
        validate(load(args.json))
        print(f"{args.json}: valid")
        return 0
    if args.cmd == "summary":
        print(summary(load(args.json)))
        return 0
    if args.cmd == "merge":
        doc = merge(*(load(p) for p in args.inputs if os.path.exists(p)))
        paths = write_outputs(doc, args.out, plots=not args.no_plots)
    else:
        doc = load(args.json)
        if args.cmd == "attach":
            if args.sanitizer and os.path.exists(args.sanitizer):
                doc["sanitizer"] = {**empty_sanitizer(), **load(args.sanitizer)}
            if args.checks and os.path.exists(args.checks):
                doc.setdefault("checks", {}).update(load(args.checks))
        paths = write_outputs(doc, args.json, plots=not args.no_plots)
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
