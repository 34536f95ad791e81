"""The sweep loop shared by decode, prefill and append.

For each point: build the input sets once (enough of them to defeat L2), measure every impl on
them back to back in this process, check each impl's output against the fp32 oracle on set 0,
and turn the timings into records. A time budget stops the sweep between points (the points
not reached are reported), never in the middle of one.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field

import torch

from . import peers, timing
from .results import make_record


@dataclass
class SweepOptions:
    device: torch.device
    impls: list[str]
    method: str = "events"
    cuda_graph: bool = False
    warmup_ms: float = 10.0
    rep_ms: float = 50.0
    min_reps: int = 5
    budget_s: float | None = None
    check: bool = True
    seed: int = 0
    progress: bool = True
    copy_gbps: float = 0.0
    max_sets: int | None = None


@dataclass
class SweepResult:
    records: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    points_done: int = 0
    points_total: int = 0
    notes: list = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.points_done < self.points_total


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the progress bar is a convenience; the sweep runs without it
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="pt", leave=False, dynamic_ncols=True)


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_point(op_module, config: dict, opts: SweepOptions, result: SweepResult) -> None:
    device = opts.device
    n_sets, flush = timing.rotation_for(op_module.set_bytes(config), device)
    if opts.max_sets:
        n_sets = min(n_sets, opts.max_sets)
    case = op_module.build(config, device, n_sets, seed=opts.seed)
    expected = op_module.reference(case) if opts.check else None
    for impl in opts.impls:
        try:
            fn = peers.prepare(impl, case)
        except peers.Unsupported as e:
            result.skipped.append({"op": case.op, "impl": impl, "config": config, "reason": str(e)})
            continue
        except torch.cuda.OutOfMemoryError:
            result.skipped.append({"op": case.op, "impl": impl, "config": config, "reason": "out of memory"})
            _release(device)
            continue
        except Exception as e:  # a peer whose set-up breaks (a changed API, say) is reported, not fatal
            result.skipped.append({"op": case.op, "impl": impl, "config": config,
                                   "reason": f"set-up failed: {type(e).__name__}: {str(e)[:200]}"})
            continue
        try:
            err = None
            if expected is not None:
                op_module.poison(case)
                out = fn(0)
                timing.sync(device)
                err = op_module.error(case, expected, out)
                del out
            t = timing.measure(fn, case.n_sets, device, method=opts.method, cuda_graph=opts.cuda_graph,
                               warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms, min_reps=opts.min_reps, flush=flush)
        except Exception as e:  # a failing impl is reported, the sweep goes on
            if isinstance(e, torch.cuda.OutOfMemoryError):
                _release(device)
            else:
                timing.sync(device)
            result.skipped.append({"op": case.op, "impl": impl, "config": config,
                                   "reason": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
            continue
        finally:
            del fn
        extra = {"timing": t.method, "eager_us": t.eager_us, "graph_us": t.graph_us, "host_us": t.host_us,
                 "reps": t.reps, "input_sets": case.n_sets, "l2_flush": flush, "max_abs_err": err}
        if err is not None and not math.isfinite(err):  # NaN/inf output, or slots left unwritten
            extra["max_abs_err"], extra["nonfinite_output"] = None, True
        if t.notes:
            extra["notes"] = t.notes
        result.records.append(make_record(case.op, impl, config, t.median_us, case.nbytes, case.flops,
                                          opts.copy_gbps, **extra))
    del case, expected
    _release(device)


def run_sweep(op_module, configs: list[dict], opts: SweepOptions, on_point=None) -> SweepResult:
    """Run every point (until the budget is spent); on_point(result) after each one."""
    result = SweepResult(points_total=len(configs))
    t0 = time.monotonic()
    for config in _progress(configs, len(configs), f"bench {op_module.OP}", opts.progress):
        if opts.budget_s is not None and time.monotonic() - t0 > opts.budget_s:
            result.notes.append(f"{op_module.OP}: time budget of {opts.budget_s:.0f} s reached after "
                                f"{result.points_done} of {result.points_total} points")
            break
        try:
            run_point(op_module, config, opts, result)
        except torch.cuda.OutOfMemoryError:
            _release(opts.device)
            result.skipped.append({"op": op_module.OP, "impl": "*", "config": config,
                                   "reason": "out of memory building the inputs"})
        result.points_done += 1
        if on_point is not None:
            on_point(result)
    return result
