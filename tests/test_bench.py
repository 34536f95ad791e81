"""The benchmark tool (kvkernels.benchmark, `kvkernels bench`): byte and FLOP accounting, the
results schema, merging, the CLI's tiny CPU sweeps, plots, the README table, and the
generation benchmark's work counts. Timings are never asserted: on the CPU they mean nothing."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from kvkernels import cli
from kvkernels.benchmark import append, decode, generate, peers, prefill, results, timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------- accounting


def test_decode_bytes_are_the_attended_kv_plus_q_and_out():
    # sequences of 3, 0 and 7 tokens: 10 tokens * Hkv 2 * D 8 * (K and V) * 2 bytes, plus q and out
    # (3 sequences * Hq 4 * D 8 * 2 bytes each)
    assert decode.decode_bytes([3, 0, 7], hq=4, hkv=2, head_dim=8, q_elem=2, kv_elem=2) == 10 * 2 * 8 * 2 * 2 + 2 * 3 * 4 * 8 * 2


@pytest.mark.parametrize("fp8, kv_elem", [(False, 2), (True, 1), ("e5m2", 1)])
def test_decode_accounting_of_a_config_counts_the_cache_element_size(fp8, kv_elem):
    cfg = decode.make_config(batch=2, context=100, hq=8, hkv=2, head_dim=64, dtype="bf16", page_size=16, fp8=fp8)
    assert cfg["kv_dtype"] == {False: "bf16", True: "fp8_e4m3", "e5m2": "fp8_e5m2"}[fp8]
    nbytes, flops = decode.accounting(cfg)
    assert nbytes == 2 * 100 * 2 * 64 * 2 * kv_elem + 2 * 2 * 8 * 64 * 2
    assert flops == 4 * 2 * 100 * 8 * 64


@pytest.mark.parametrize("causal, factor", [(False, 1.0), (True, 0.5)])
def test_prefill_flops_are_4_b_sq_sk_hq_d_halved_for_causal(causal, factor):
    assert prefill.prefill_flops(2, 128, 256, 8, 64, causal) == int(4 * 2 * 128 * 256 * 8 * 64 * factor)
    cfg = prefill.make_config(batch=3, seqlen=100, hq=8, hkv=2, head_dim=64, dtype="fp16", causal=causal)
    nbytes, flops = prefill.accounting(cfg)
    assert flops == int(4 * 3 * 100 * 100 * 8 * 64 * factor)
    assert nbytes == (2 * 3 * 100 * 8 + 2 * 3 * 100 * 2) * 64 * 2  # q + out, k + v, once each


@pytest.mark.parametrize("fp8, cache_elem", [(False, 2), (True, 1)])
def test_append_bytes_are_sources_read_plus_slots_written(fp8, cache_elem):
    cfg = append.make_config(batch=4, context=50, new_tokens=3, hq=8, hkv=2, head_dim=64, dtype="fp16", fp8=fp8)
    assert append.accounting(cfg) == (2 * 4 * 3 * 2 * 64 * (2 + cache_elem), 0)


@pytest.mark.parametrize("fp8", [False, True, "e5m2"])
def test_append_check_catches_slots_left_unwritten(fp8):
    cfg = append.make_config(batch=2, context=5, new_tokens=3, hq=4, hkv=2, head_dim=64, dtype="fp16",
                             page_size=4, fp8=fp8)
    case = append.build(cfg, "cpu", n_sets=2)
    expected = append.reference(case)
    append.poison(case)
    assert append.error(case, expected, None) == append.NOT_WRITTEN
    peers.prepare("naive", case)(0)
    assert append.error(case, expected, None) == 0.0


def test_record_rates_follow_from_bytes_flops_and_time():
    rec = results.make_record("decode", "naive", {"batch": 1}, median_us=2.0, nbytes=6000, flops=8_000_000,
                              copy_gbps=1000.0)
    assert rec["gbps"] == pytest.approx(3.0)          # 6000 B / 2 us
    assert rec["fraction"] == pytest.approx(0.003)    # of the 1000 GB/s copy ceiling
    assert rec["tflops"] == pytest.approx(4.0)        # 8e6 FLOP / 2 us


def test_rotation_spans_several_l2_sizes_within_memory():
    l2 = 50 * 2**20
    n = timing.rotation_count(10 * 2**20, l2=l2)
    assert (n - 1) * 10 * 2**20 >= timing.ROTATION_FACTOR * l2
    assert timing.rotation_count(400 * 2**20, l2=l2) == 1                      # one set already evicts L2
    assert timing.rotation_count(2**20, l2=l2) == 64                          # capped
    assert timing.rotation_count(10 * 2**20, l2=l2, free_bytes=50 * 2**20) == 2  # 40% of free memory


def test_cpu_timing_is_labelled_and_has_no_graph_time():
    calls = []
    t = timing.measure(lambda i: calls.append(i), 3, torch.device("cpu"), rep_ms=1.0, min_reps=2)
    assert t.method == "cpu-wall" and t.graph_us is None and t.median_us > 0
    assert set(calls) <= {0, 1, 2} and len(calls) >= 3


# -------------------------------------------------------------------------------------- schema


def _doc(records, device="NVIDIA H100 80GB HBM3", date="2026-01-02", copy=3000.0):
    return {"device": device, "date": date, "commit": "abc", "versions": {"torch": "2.11", "triton": "3.6", "cuda": "13.0"},
            "ceilings": {"copy_gbps": copy, "matmul_bf16_tflops": 800.0}, "sanitizer": results.empty_sanitizer(),
            "records": records}


def _rec(impl, context, us, op="decode", **cfg_extra):
    cfg = decode.make_config(batch=8, context=context, hq=32, hkv=8, head_dim=128, dtype="bf16")
    cfg.update(cfg_extra)
    nbytes, flops = decode.accounting(cfg)
    return results.make_record(op, impl, cfg, us, nbytes, flops, 3000.0)


def test_validate_accepts_a_well_formed_document():
    results.validate(_doc([_rec("naive", 1024, 10.0), _rec("kvkernels-cuda", 1024, 5.0)]))


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d["records"][0].update(impl="mystery"), "impl"),
    (lambda d: d["records"][0].update(op="train"), "op"),
    (lambda d: d["records"][0]["config"].pop("hkv"), "lacks"),
    (lambda d: d["records"].append(dict(d["records"][0])), "duplicates"),
    (lambda d: d["ceilings"].pop("copy_gbps"), "copy_gbps"),
    (lambda d: d.update(date="02/01/2026"), "YYYY-MM-DD"),
    (lambda d: d["sanitizer"]["memcheck"].update(errors="none"), "memcheck"),
])
def test_validate_names_what_is_wrong(breakage, message):
    doc = _doc([_rec("naive", 1024, 10.0)])
    breakage(doc)
    with pytest.raises(ValueError, match=message):
        results.validate(doc)


def test_merge_unions_records_and_a_later_measurement_replaces_an_earlier_one():
    a = _doc([_rec("naive", 1024, 10.0), _rec("naive", 2048, 20.0)])
    b = _doc([_rec("naive", 1024, 7.0), _rec("sdpa-math", 1024, 30.0)], date="2026-01-03", copy=1.0)
    b["sanitizer"]["memcheck"] = {"errors": 0, "ran": True}
    merged = results.merge(a, b)
    results.validate(merged)
    got = {(r["impl"], r["config"]["context"]): r["median_us"] for r in merged["records"]}
    assert got == {("naive", 1024): 7.0, ("naive", 2048): 20.0, ("sdpa-math", 1024): 30.0}
    assert merged["ceilings"]["copy_gbps"] == 3000.0       # the first document's (the run's) ceilings
    assert merged["sanitizer"]["memcheck"] == {"errors": 0, "ran": True}
    assert merged["date"] == "2026-01-03"
    assert a["records"][0]["median_us"] == 10.0             # inputs untouched


def test_merge_refuses_documents_of_different_devices():
    with pytest.raises(ValueError, match="different devices"):
        results.merge(_doc([]), _doc([], device="cpu"))


# ---------------------------------------------------------------------------------------- CLI


def _bench(tmp_path, *argv, device="cpu"):
    out = tmp_path / "results.json"
    rc = cli.main(["bench", *argv, "--device", device, "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = results.load(out)
    results.validate(doc)
    return doc, out


def _points(doc, op):
    points = {}
    for r in doc["records"]:
        if r["op"] == op:
            points.setdefault(results.point_key(r["config"]), set()).add(r["impl"])
    return points


def test_cli_decode_sweep_on_cpu_writes_a_valid_schema(tmp_path, capsys):
    doc, out = _bench(tmp_path, "decode", "--batch", "2", "--context", "20", "--page-size", "0,16",
                      "--impls", "naive,sdpa-math,kvkernels-triton", "--cuda-graph", "--no-plots")
    assert doc["device"] == "cpu" and results.CPU_NOTE in doc["notes"]
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_bf16_tflops"] > 0
    points = _points(doc, "decode")
    assert len(points) == 2                                       # contiguous and paged
    assert all("naive" in impls for impls in points.values())
    assert any({"naive", "sdpa-math"} <= impls for impls in points.values())  # side by side, one config dict
    assert any(s["impl"] == "sdpa-math" and "paged" in s["reason"] for s in doc["skipped"])
    for r in doc["records"]:
        assert r["timing"] == "cpu-wall" and r["bytes"] == decode.accounting(r["config"])[0]
        assert r["fraction"] == pytest.approx(r["gbps"] / doc["ceilings"]["copy_gbps"])
        assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-2   # checked against the oracle
    md = out.with_suffix(".md").read_text()
    assert "not GPU figures" in md and "| kvkernels-triton | sdpa-math | naive |" in md
    assert "not GPU figures" in capsys.readouterr().err


def test_cli_merge_folds_prefill_and_append_into_one_document(tmp_path):
    _bench(tmp_path, "prefill", "--seqlen", "24", "--impls", "naive,sdpa-math", "--no-plots")
    first = results.load(tmp_path / "results.json")
    doc, _ = _bench(tmp_path, "append", "--new-tokens", "3", "--page-size", "0,16", "--impls",
                    "naive,kvkernels-triton", "--merge", "--no-plots")
    assert doc["ceilings"] == first["ceilings"]                   # reused, not re-measured
    assert {r["op"] for r in doc["records"]} == {"prefill", "append"}
    prefill_recs = [r for r in doc["records"] if r["op"] == "prefill"]
    assert all(r["flops"] == prefill.accounting(r["config"])[1] and r["tflops"] > 0 for r in prefill_recs)
    appends = [r for r in doc["records"] if r["op"] == "append"]
    assert {r["config"]["paged"] for r in appends} == {False, True}
    assert all(r["max_abs_err"] == 0.0 for r in appends)          # appends are bit-exact


def test_an_impl_returning_nan_is_flagged_not_hidden(tmp_path, monkeypatch):
    def broken(case):
        return lambda i: torch.full_like(case.sets[i]["q"], float("nan"))

    monkeypatch.setitem(peers._PREPARE, "naive", broken)
    doc, out = _bench(tmp_path, "decode", "--batch", "1", "--context", "16", "--page-size", "0",
                      "--impls", "naive,sdpa-math", "--no-plots")
    by_impl = {r["impl"]: r for r in doc["records"]}
    assert by_impl["naive"]["nonfinite_output"] and by_impl["naive"]["max_abs_err"] is None
    assert "nonfinite_output" not in by_impl["sdpa-math"]
    assert "naive **NON-FINITE / UNWRITTEN OUTPUT**" in out.with_suffix(".md").read_text()


@pytest.mark.gpu
def test_gpu_sweep_times_eagerly_and_from_cuda_graphs_on_rotated_inputs(tmp_path):
    doc, _ = _bench(tmp_path, "decode", "--preset", "llama3-8b", "--batch", "1", "--context", "256",
                    "--page-size", "0", "--impls", "kvkernels-cuda,kvkernels-triton,sdpa-flash,naive",
                    "--cuda-graph", "--rep-ms", "5", "--no-plots", device="cuda")
    assert doc["device"] == torch.cuda.get_device_name() and doc["ceilings"]["copy_gbps"] > 100
    by_impl = {r["impl"]: r for r in doc["records"]}
    assert "naive" in by_impl and by_impl["naive"]["max_abs_err"] < 1e-2
    for r in by_impl.values():
        assert r["timing"] == "graph" and r["graph_us"] > 0 and r["eager_us"] > 0 and r["host_us"] > 0
        assert r["input_sets"] > 1  # 1 MiB of cache per set: rotated to keep it out of L2


def test_cli_merge_refuses_a_file_of_another_device(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    results.save(_doc([_rec("naive", 1024, 10.0)]), out)
    assert cli.main(["bench", "decode", "--device", "cpu", "--out", str(out), "--merge"]) == 2
    assert "NVIDIA H100" in capsys.readouterr().err
    assert len(results.load(out)["records"]) == 1                  # untouched


def test_cli_rejects_unknown_implementations(tmp_path, capsys):
    assert cli.main(["bench", "decode", "--device", "cpu", "--impls", "warp-drive", "--out", str(tmp_path / "r.json")]) == 2
    assert "warp-drive" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_bench_script_runs_from_a_checkout(tmp_path):
    out = tmp_path / "a.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_append.py"), "--device", "cpu",
                           "--impls", "naive",
                           "--page-size", "0", "--new-tokens", "1", "--no-plots", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results.validate(results.load(out))


# -------------------------------------------------------------------------------------- plots


def test_plots_and_markdown_are_produced(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [_rec(impl, ctx, us) for impl, us in (("kvkernels-cuda", 5.0), ("naive", 20.0)) for ctx in (1024, 4096)]
    for impl, us in (("kvkernels-triton", 900.0), ("sdpa-flash", 1000.0)):
        for s in (1024, 4096):
            cfg = prefill.make_config(1, s, 32, 8, 128, "bf16", causal=True)
            recs.append(results.make_record("prefill", impl, cfg, us * s / 1024, *prefill.accounting(cfg), 3000.0))
    for b in (1, 64):
        cfg = append.make_config(b, 4096, 1, 32, 8, 128, "bf16")
        recs.append(results.make_record("append", "naive", cfg, 8.0, *append.accounting(cfg), 3000.0))
    paths = results.write_outputs(_doc(recs), tmp_path / "r.json")
    for name in ("decode", "prefill", "append", "roofline"):
        with open(paths[name], "rb") as f:
            assert f.read(8) == PNG_MAGIC, name
    md = (tmp_path / "r.md").read_text()
    assert "![roofline](r-roofline.png)" in md
    assert "| B | ctx | Hq/Hkv | D | dtype | layout | kvkernels-cuda | naive |" in md


# ------------------------------------------------------------------------------- README table


def test_readme_table_takes_the_latest_gpu_results_and_replaces_only_the_block(tmp_path):
    upd = _load_script("update_readme_table")
    gpu = _doc([_rec("kvkernels-cuda", 4096, 5.0), _rec("sdpa-flash", 4096, 10.0)], date="2026-01-02")
    results.save(gpu, tmp_path / "2026-01-02-nvidia-h100.json")
    results.save(_doc([_rec("naive", 16, 1.0)], device="cpu", date="2026-02-01"), tmp_path / "2026-02-01-cpu.json")
    path, doc = upd.latest_gpu_results(str(tmp_path))
    assert doc["device"].startswith("NVIDIA")
    block = upd.table(path, doc)
    assert "2.00×" in block and "sdpa-flash" in block            # our speed-up over the best peer
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{upd.BEGIN}\nold table\n{upd.END}\noutro\n")
    assert upd.main(["--results-dir", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text and block in text
    with pytest.raises(ValueError, match="marker"):
        upd.replace_block("no markers here", block)


def test_sanitizer_log_parsing_counts_errors_and_names_kernels(tmp_path):
    san = _load_script("sanitize_ops")
    log = tmp_path / "memcheck.log"
    log.write_text("========= COMPUTE-SANITIZER\n"
                   "========= Invalid __global__ read of size 2 bytes\n"
                   "=========     at kvk_decode_split<__half, 128>(const __half *, int)+0x1a0 in decode.cuh:120\n"
                   "sanitize_ops: 40 calls ran, 4 skipped (unsupported), 0 failed\n"
                   "========= ERROR SUMMARY: 1 error\n")
    entry = san.parse(str(log), "memcheck", "ok", 12.0)
    assert entry["errors"] == 1 and entry["ran"] and entry["calls"] == 40
    assert entry["kernels_with_errors"] == ["kvk_decode_split<__half, 128>"]
    assert san.parse(str(tmp_path / "missing.log"), "racecheck", "timeout", None)["errors"] is None


# ---------------------------------------------------------------------------------- generation


def test_score_pair_totals_are_quadratic_with_the_cache_and_cubic_without():
    # prompt 3, 4 tokens: prefill 3*4/2 = 6 pairs, then decode over 4, 5, 6 keys
    assert generate.score_pairs_with_cache(3, 4) == 6 + 4 + 5 + 6
    # recompute over 3, 4, 5, 6 tokens: 6 + 10 + 15 + 21
    assert generate.score_pairs_without_cache(3, 4) == 52
    assert generate.score_pairs_with_cache(3, 4, batch=2, heads=3, layers=5) == 21 * 30
    ratio_with = generate.score_pairs_with_cache(0, 2048) / generate.score_pairs_with_cache(0, 1024)
    ratio_without = generate.score_pairs_without_cache(0, 2048) / generate.score_pairs_without_cache(0, 1024)
    assert ratio_with == pytest.approx(4, rel=0.01) and ratio_without == pytest.approx(8, rel=0.01)


def test_generation_with_and_without_cache_picks_identical_tokens_and_counts_its_work(monkeypatch):
    import kvkernels.api as api
    counted = [0]
    real_prefill, real_decode = api.prefill_attention, api.decode_attention

    def prefill_counting(q, k, v, *, causal=False, **kw):
        sq, sk = q.shape[1], k.shape[1]
        visible = sum(min(sk, max(0, i + sk - sq + 1)) for i in range(sq)) if causal else sq * sk
        counted[0] += q.shape[0] * q.shape[2] * visible
        return real_prefill(q, k, v, causal=causal, **kw)

    def decode_counting(q, k_cache, v_cache, cache_seqlens, **kw):
        counted[0] += q.shape[1] * int(cache_seqlens.sum())
        return real_decode(q, k_cache, v_cache, cache_seqlens, **kw)

    monkeypatch.setattr(api, "prefill_attention", prefill_counting)
    monkeypatch.setattr(api, "decode_attention", decode_counting)
    cfg = generate.GenerateConfig(layers=2, heads=2, head_dim=16, vocab=64, prompt=3, tokens=5, dtype="fp32")
    entry = generate.run_generate(cfg, "cpu", warmup=False)
    assert entry["tokens_identical"] and entry["first_divergence"] is None
    assert entry["with_cache"]["score_pairs"] == generate.score_pairs_with_cache(3, 5, heads=2, layers=2)
    assert entry["without_cache"]["score_pairs"] == generate.score_pairs_without_cache(3, 5, heads=2, layers=2)
    assert counted[0] == entry["with_cache"]["score_pairs"] + entry["without_cache"]["score_pairs"]
    assert entry["with_cache"]["attention_flops"] == 4 * 16 * entry["with_cache"]["score_pairs"]
    assert math.isfinite(entry["speedup"]) and entry["with_cache"]["peak_bytes"] is None  # no device memory on CPU


def test_cli_generate_records_its_entry(tmp_path):
    doc, out = _bench(tmp_path, "generate", "--tokens", "3", "--prompt", "2", "--no-plots")
    (entry,) = doc["generate"]
    assert entry["config"]["tokens"] == 3 and entry["tokens_identical"]
    assert "Generation with and without the KV cache" in out.with_suffix(".md").read_text()


def test_cache_attention_accounting_counts_what_each_query_sees():
    from kvkernels.benchmark import cache_attention as ca
    cfg = ca.make_config(2, 10, 3, 4, 2, 8, "fp16", page_size=16, decode_batch=1, decode_context=5)
    nbytes, flops = ca.accounting(cfg)
    # two sequences of 10 tokens (queries at 7, 8, 9 see 8 + 9 + 10 positions), one decode over 5
    assert flops == 4 * 4 * 8 * (2 * (8 + 9 + 10) + 5)
    assert nbytes == (2 * 10 + 5) * 2 * 8 * 2 * 2 + 2 * (2 * 3 + 1) * 4 * 8 * 2
    spec, chunk, mixed = ca.scenarios()
    assert (spec["batch"], spec["queries"], spec["context"], spec["page_size"]) == (32, 4, 8192, 16)
    assert (chunk["queries"], chunk["context"]) == (2048, 32768)
    assert mixed["decode_batch"] == 32 and mixed["queries"] == 1024


def test_cli_cache_attention_scenarios_on_cpu(tmp_path):
    from kvkernels.benchmark import cache_attention as ca
    doc, out = _bench(tmp_path, "cache", "--scenario", "speculative,mixed", "--impls",
                      "kvkernels-triton,sdpa-math,naive", "--no-plots")
    recs = [r for r in doc["records"] if r["op"] == "cache"]
    assert {r["config"]["scenario"] for r in recs} == {"speculative", "mixed"}
    assert {r["impl"] for r in recs} == {"kvkernels-triton", "sdpa-math", "naive"}
    for r in recs:
        assert (r["bytes"], r["flops"]) == ca.accounting(r["config"])
        assert r["max_abs_err"] is not None and r["max_abs_err"] < 1e-2   # every peer checked against the oracle
    assert "Cache attention" in out.with_suffix(".md").read_text()


# ------------------------------------------------------------------------- readable tables and plots


def _table_rows(md: str, op_title: str) -> list[list[str]]:
    block = md.split(f"## {op_title}")[1].split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_one_unit_per_table_column():
    """7014.7 us beside 30.48 ms in one column: each impl's column now takes the unit of its largest time."""
    recs = [_rec("naive", ctx, us) for ctx, us in ((1024, 7014.7), (4096, 30480.0))]
    recs += [_rec("kvkernels-cuda", ctx, us) for ctx, us in ((1024, 5.0), (4096, 12.5))]
    md = results.to_markdown(_doc(recs))
    rows = _table_rows(md, "Decode")
    naive = [r[-1] for r in rows]
    ours = [r[-2] for r in rows]
    assert naive[0].startswith("7.01 ms") and naive[1].startswith("30.48 ms")
    assert ours[0].startswith("5.0 us") and ours[1].startswith("12.5 us")
    assert all(len({c.split(" · ")[1].split()[1] for c in col}) == 1 for col in (naive, ours))  # one rate unit


def test_cpu_prefill_rates_are_not_printed_as_zero():
    cfg = prefill.make_config(1, 32, 4, 2, 64, "fp16", causal=True)
    rec = results.make_record("prefill", "naive", cfg, 900.0, *prefill.accounting(cfg), 10.0)
    assert rec["tflops"] < 0.05
    cell = _table_rows(results.to_markdown(_doc([rec], device="cpu")), "Prefill")[0][-1]
    rate = cell.split(" · ")[1]
    assert rate.endswith("GFLOP/s") and float(rate.split()[0]) > 0, cell


def test_skip_reasons_are_kept_whole():
    reason = ("sdpa-math does not accept a paged cache: the block table would have to be gathered first, " * 3).strip()
    doc = dict(_doc([_rec("naive", 1024, 10.0)]), skipped=[{"op": "decode", "impl": "sdpa-math", "reason": reason}])
    assert reason in results.to_markdown(doc)


def test_plot_titles_hold_what_the_panel_fixes_and_no_panel_is_dropped(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    titles = []
    import matplotlib.axes
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **k: (titles.append(t), real(ax, t, *a, **k))[1])
    recs = []
    for b in (1, 64):   # append: batch on the x axis
        cfg = append.make_config(b, 4096, 1, 32, 8, 128, "bf16")
        recs.append(results.make_record("append", "naive", cfg, 8.0, *append.accounting(cfg), 3000.0))
    for group in range(16):   # 16 decode panels: more than one PNG holds
        for ctx in (1024, 4096):
            recs.append(_rec("naive", ctx, 10.0 + group, batch=group + 1))
    paths = results.plot_all(_doc(recs), tmp_path / "r")
    assert "B=" not in next(t for t in titles if "new=" in t)          # the append panel: batch is its x axis
    decode_titles = [t for t in titles if t.startswith("B=") and "ctx=" not in t]
    assert sorted(int(t.split()[0][2:]) for t in decode_titles) == list(range(1, 17))   # every group drawn
    assert {"decode", "decode-2"} <= set(paths) and os.path.exists(paths["decode-2"])
