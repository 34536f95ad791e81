"""`kvkernels demo`: greedy generation with and without a KV cache, through kvkernels' ops.

A small Llama-style decoder (GQA, RoPE, SwiGLU; random weights from a fixed seed, see
kvkernels.models.gpt) generates the same continuation twice:

  with the cache     the prompt once through prefill_attention, its keys/values stored with
                     append_kv into a paged cache; then each new token appends its own key/value
                     and attends to the cache with decode_attention: work per step grows linearly
  without a cache    every step recomputes the whole sequence (prefill_attention over all of it):
                     work per step grows with the square of the length

and shows that the tokens are identical, the attention work and the time of each step both ways,
and the memory the cache holds; a PNG (kvkernels-demo.png, --plot) draws them against the sequence
length. On a GPU the ops run kvkernels' CUDA (or Triton) kernels; on a CPU the PyTorch reference,
and the timings say so.

Timing: the two ways run step by step in alternation (so a busy machine slows both alike), the
whole generation is repeated (--repeats, default 3) and each step's time is the median over the
repeats, after a warm-up; on a CPU torch uses one thread (--threads), which keeps the small decode
steps from waiting on threads a loaded machine has descheduled.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from . import api
from .cache import PagedKVCache
from .cliargs import plural, size
from .memory import format_bytes, kv_cache_bytes
from .models.gpt import Decoder, DecoderConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_PLOT = "kvkernels-demo.png"
BACKEND_WORDS = {"cuda": "kvkernels CUDA kernels", "triton": "kvkernels Triton kernels",
                 "reference": "PyTorch reference"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model and cache precision (default: fp16 on a GPU or with --backend triton, "
                             "else fp32)")
    parser.add_argument("--batch", type=size(1), default=None, help="sequences generated together (default 8 GPU / 4 CPU)")
    parser.add_argument("--prompt-len", type=size(1), default=None, help="prompt tokens (default 512 GPU / 8 CPU)")
    parser.add_argument("--new-tokens", type=size(1), default=None, help="tokens to generate (default 128 GPU / 64 CPU)")
    parser.add_argument("--layers", type=size(1), default=4, help="decoder layers (default 4)")
    parser.add_argument("--cache", choices=["paged", "contiguous"], default="paged", help="KV cache layout (default paged)")
    parser.add_argument("--page-size", type=size(1), default=16, help="tokens per page of the paged cache (default 16)")
    parser.add_argument("--backend", choices=["cuda", "triton", "reference"], default=None,
                        help="force a backend (default: automatic)")
    parser.add_argument("--repeats", type=size(1), default=None,
                        help="timed generations; each step's time is their median (default 3)")
    parser.add_argument("--threads", type=size(1), default=None,
                        help="CPU threads torch may use (default 1 on a CPU run: steadier timings)")
    parser.add_argument("--plot", default=DEFAULT_PLOT, help=f"PNG to write (default ./{DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backends_used(model: Decoder, cache) -> dict:
    """Which backend the dispatch picks for each op of this model and cache (ValueError when a
    forced backend cannot run them)."""
    c = model.config
    dev = model.device
    q = torch.empty(1, 1, c.num_heads, c.head_dim, dtype=model.dtype, device=dev)
    kv = torch.empty(1, 1, c.num_kv_heads, c.head_dim, dtype=model.dtype, device=dev)
    kc, _ = cache.layer_cache(0)
    paged = isinstance(cache, PagedKVCache)
    return {
        "prefill": api.resolve_backend("prefill", model.backend, dev, q=q, k=kv, v=kv, varlen=False,
                                       window_left=-1, window_right=0, softcap=0.0),
        "append": api.resolve_backend("append", model.backend, dev, k=kv, k_cache=kc, paged=paged),
        "decode": api.resolve_backend("decode", model.backend, dev, q=q[:, 0], k_cache=kc, paged=paged,
                                      window_left=-1, softcap=0.0),
    }


def summary_line(device: torch.device, used: dict) -> str:
    """One line in the manner of `kvkernels info`: versions, device, the backend each op ran on."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "absent"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ops = ", ".join(f"{op}={name}" for op, name in used.items())
    return f"kvkernels {__import__('kvkernels').__version__} | torch {torch.__version__} | triton {tv} | {where} | {ops}"


def _pairs_full(n: int) -> int:
    """Query-key pairs of causal attention over n tokens."""
    return n * (n + 1) // 2


def _default(value, default):
    return default if value is None else value


def _cuda_reason() -> str | None:
    from .cuda import available, unavailable_reason
    return None if available() else unavailable_reason()


def _choose_device(args) -> torch.device:
    """The device, or ValueError with the message and the fix."""
    if args.device is None:
        if args.backend == "cuda" and not torch.cuda.is_available():
            raise ValueError("--backend cuda runs the CUDA kernels, which need an NVIDIA GPU, and torch sees none "
                             "here; leave --backend out (CPU: the PyTorch reference) or use --backend triton "
                             "(the Triton kernels, interpreted on the CPU)")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device: use cuda or cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {args.device}: kvkernels runs on NVIDIA GPUs (--device cuda) or the CPU "
                         "(--device cpu)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device on this machine; run without --device "
                         "(the CPU) or on a machine with an NVIDIA GPU")
    if device.type == "cpu" and args.backend == "cuda":
        raise ValueError("--backend cuda needs --device cuda (the CUDA kernels run on a GPU only); on the CPU use "
                         "--backend triton or reference")
    return device


def _timed_runs(model, prompt, new_tokens, cache, repeats):
    """Both generations, step by step in alternation, `repeats` times.
    -> (tokens with cache, tokens without, per-step seconds [repeat][step] for each)."""
    device = prompt.device
    B = prompt.shape[0]
    t_cache, t_full = [], []
    for _ in range(repeats):
        ids = cache.batch([cache.allocate() for _ in range(B)])
        out_c = torch.empty(B, new_tokens, dtype=torch.int64, device=device)
        out_f = torch.empty_like(out_c)
        seq = prompt
        row_c, row_f = [], []
        try:
            for i in range(new_tokens):
                _sync(device)
                start = time.perf_counter()
                logits = model.prefill(prompt, cache, ids) if i == 0 else model.decode(out_c[:, i - 1], cache, ids)
                out_c[:, i] = logits.argmax(-1)
                _sync(device)
                row_c.append(time.perf_counter() - start)
                start = time.perf_counter()
                out_f[:, i] = model.forward_full(seq).argmax(-1)
                _sync(device)
                row_f.append(time.perf_counter() - start)
                seq = torch.cat([seq, out_f[:, i:i + 1]], dim=1)
        finally:
            cache.free(ids)
        t_cache.append(row_c)
        t_full.append(row_f)
    return out_c, out_f, t_cache, t_full


def _medians(runs):
    return [statistics.median(col) for col in zip(*runs)]


def _cache_bytes_per_length(cache, B, P, T, config, dtype):
    """Bytes the cache holds for the whole batch at each length P .. P+T-1: tokens written and, for
    a paged cache, whole pages allocated."""
    per_token = kv_cache_bytes(config.num_layers, config.num_kv_heads, config.head_dim, 1, 1, dtype)
    lengths = list(range(P, P + T))
    used = [B * n * per_token for n in lengths]
    if isinstance(cache, PagedKVCache):
        ps = cache.page_size
        held = [B * -(-n // ps) * ps * per_token for n in lengths]
    else:
        held = [cache.memory_bytes()] * len(lengths)
    return lengths, used, held


def write_plot(path, *, lengths, work_cache, work_full, ms_cache, ms_full, ms_cache_band, ms_full_band,
               mem_used, mem_held, cache_kind, title) -> str:
    """Three panels against the sequence length: attention work per step, time per step (median,
    band = fastest..slowest repeat), the memory the cache holds. -> the absolute path written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    ax.plot(lengths, work_full, color="C3", marker=".", label="without cache (whole sequence again)")
    ax.plot(lengths, work_cache, color="C0", marker=".", label="with cache (new token only)")
    ax.set_title("attention work per step")
    ax.set_ylabel("query-key pairs per head and layer")
    ax = axes[1]
    for ms, band, color, label in ((ms_full, ms_full_band, "C3", "without cache"),
                                   (ms_cache, ms_cache_band, "C0", "with cache")):
        ax.plot(lengths, ms, color=color, marker=".", label=f"{label} (median)")
        ax.fill_between(lengths, band[0], band[1], color=color, alpha=0.2, linewidth=0)
    ax.set_title("time per step")
    ax.set_ylabel("ms (whole batch)")
    ax = axes[2]
    ax.plot(lengths, [b / 2 ** 20 for b in mem_used], color="C2", marker=".", label="K/V of the tokens so far")
    ax.plot(lengths, [b / 2 ** 20 for b in mem_held], color="C2", linestyle="--", drawstyle="steps-post",
            label="allocated (whole pages)" if cache_kind == "paged" else "allocated (contiguous, up front)")
    ax.set_title("memory the cache holds (without a cache: none)")
    ax.set_ylabel("MiB")
    for ax in axes:
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = os.path.abspath(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args) -> int:
    try:
        device = _choose_device(args)
    except ValueError as e:
        print(f"kvkernels demo: {e}", file=sys.stderr)
        return 2
    on_gpu = device.type == "cuda"
    if args.backend == "cuda":
        reason = _cuda_reason()
        if reason:
            print(f"kvkernels demo: --backend cuda: the CUDA extension is unusable ({reason}); build it with "
                  "`make build`, or use --backend triton", file=sys.stderr)
            return 2
    if args.dtype:
        dtype = DTYPES[args.dtype]
    else:  # the Triton decode kernel takes fp16/bf16 only
        dtype = torch.float16 if (on_gpu or args.backend == "triton") else torch.float32
    B = _default(args.batch, 8 if on_gpu else 4)
    P = _default(args.prompt_len, 512 if on_gpu else 8)
    T = _default(args.new_tokens, 128 if on_gpu else 64)
    R = _default(args.repeats, 3)
    threads = _default(args.threads, None if on_gpu else 1)
    if threads:
        torch.set_num_threads(threads)

    config = DecoderConfig(num_layers=args.layers, max_seq_len=max(4096, P + T))
    model = Decoder(config, seed=args.seed, dtype=dtype, device=device, backend=args.backend)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, config.vocab_size, (B, P), generator=gen).to(device)
    cache = model.new_cache(B, P + T, kind=args.cache, page_size=args.page_size)
    try:
        used = backends_used(model, cache)
    except ValueError as e:
        name = str(dtype).replace("torch.", "")
        print(f"kvkernels demo: --backend {args.backend} cannot run this model in {name}: {e}. Try --dtype fp16 "
              "or leave --backend out", file=sys.stderr)
        return 2

    c = config
    interpreted = "triton" in used.values() and not on_gpu
    print(summary_line(device, used))
    kinds = sorted(set(used.values()), key=list(BACKEND_WORDS).index)
    print("ops ran on: " + "; ".join(
        f"{BACKEND_WORDS[k]}{' (interpreted on the CPU)' if k == 'triton' and interpreted else ''} "
        f"({', '.join(op for op, v in used.items() if v == k)})" for k in kinds))
    print(f"model: Llama-style decoder, {plural(c.num_layers, 'layer')}, {c.num_heads} query / {c.num_kv_heads} KV "
          f"heads of {c.head_dim} (GQA), dim {c.dim}, {c.num_params() / 1e6:.1f}M random parameters (seed "
          f"{args.seed}), {str(dtype).replace('torch.', '')} on {device.type}")
    print(f"task:  greedy, batch {B}, prompt {plural(P, 'token')}, {plural(T, 'new token')}; {args.cache} KV cache"
          + (f" (pages of {args.page_size})" if args.cache == "paged" else ""))
    where = "GPU" if on_gpu else ("CPU, Triton interpreter" if interpreted else "CPU, PyTorch reference")
    print(f"timing: {where}; median of {plural(R, 'run')}, the two ways alternating step by step, after a warm-up"
          + (f"; {plural(torch.get_num_threads(), 'CPU thread')} (--threads)" if not on_gpu else ""), flush=True)

    # Warm-up: compiles (GPU) or initialises every op and path once, so the timings are steady state.
    _timed_runs(model, prompt[:, : min(P, 8)], 2, cache, 1)
    t0 = time.perf_counter()
    cached, full, t_cache, t_full = _timed_runs(model, prompt, T, cache, R)
    wall = time.perf_counter() - t0
    print()

    same = torch.equal(cached, full)
    if same:
        print(f"tokens identical with and without the cache: yes (all {B} x {T}); sequence 0 begins "
              f"{cached[0, :8].tolist()}")
    else:
        diff = (cached != full).any(0).nonzero()
        print(f"tokens identical with and without the cache: NO, first difference at step {int(diff[0])}")

    # Attention work, as query-key pairs (each: one q.k dot and one p.v accumulate per head and layer).
    # Step 0 reads the prompt; step t >= 1 feeds the token at position P + t - 1, which sees P + t keys.
    work_cache = [B * _pairs_full(P)] + [B * (P + t) for t in range(1, T)]
    work_full = [B * _pairs_full(P + t) for t in range(T)]
    ms_cache = [1e3 * s for s in _medians(t_cache)]
    ms_full = [1e3 * s for s in _medians(t_full)]
    total_c, total_f = sum(ms_cache) / 1e3, sum(ms_full) / 1e3
    decode_ms = ms_cache[1:] or [float("nan")]
    last = T - 1
    w = 16
    print()
    print(f"  {'':<34}{'with cache':>{w}}{'without cache':>{w}}")
    print(f"  {'attention work, step 1':<34}{work_cache[min(1, last)]:>{w},}{work_full[min(1, last)]:>{w},}")
    print(f"  {f'attention work, step {last}':<34}{work_cache[last]:>{w},}{work_full[last]:>{w},}"
          "   linear vs quadratic in the length")
    print(f"  {'attention work, all steps':<34}{sum(work_cache):>{w},}{sum(work_full):>{w},}"
          f"   {sum(work_full) / sum(work_cache):.1f}x less with the cache")
    print(f"  {'tokens through projections + MLP':<34}{B * (P + T - 1):>{w},}{B * sum(P + t for t in range(T)):>{w},}")
    print(f"  {'time, step 1 / last step (ms)':<34}{f'{decode_ms[0]:.1f} / {decode_ms[-1]:.1f}':>{w}}"
          f"{f'{ms_full[min(1, last)]:.1f} / {ms_full[last]:.1f}':>{w}}")
    print(f"  {'time, all steps (s)':<34}{total_c:>{w}.2f}{total_f:>{w}.2f}"
          f"   {total_f / total_c:.1f}x faster with the cache")
    used_bytes = kv_cache_bytes(c.num_layers, c.num_kv_heads, c.head_dim, P + T, B, dtype)
    print(f"  {'KV cache memory':<34}{format_bytes(cache.memory_bytes()):>{w}}{'none':>{w}}"
          f"   {format_bytes(used_bytes)} of K/V for {B} x {P + T} tokens; {format_bytes(used_bytes * c.num_heads // c.num_kv_heads)} "
          "without GQA")
    if not on_gpu:
        path = "the Triton interpreter" if interpreted else "the PyTorch reference"
        print(f"  (CPU timings of {path}, not kernel timings: on a GPU the demo runs the CUDA/Triton kernels)")

    if not args.no_plot:
        lengths, mem_used, mem_held = _cache_bytes_per_length(cache, B, P, T, c, dtype)
        band = lambda runs: ([1e3 * min(col) for col in zip(*runs)], [1e3 * max(col) for col in zip(*runs)])  # noqa: E731
        try:
            path = write_plot(args.plot, lengths=lengths, work_cache=work_cache, work_full=work_full,
                              ms_cache=ms_cache, ms_full=ms_full, ms_cache_band=band(t_cache),
                              ms_full_band=band(t_full), mem_used=mem_used, mem_held=mem_held,
                              cache_kind=args.cache,
                              title=f"kvkernels demo: batch {B}, prompt {P}, {T} new tokens, {c.num_layers}-layer "
                                    f"decoder, {str(dtype).replace('torch.', '')} on {where} "
                                    f"({', '.join(f'{k}={v}' for k, v in used.items())})")
        except ImportError:
            print("\nplot: not written (matplotlib is missing: pip install matplotlib, or `make demo`)")
        except OSError as e:
            print(f"\nplot: cannot write {args.plot}: {e.strerror}", file=sys.stderr)
            return 2
        else:
            print(f"\nplot: {path}")
    print(f"[{wall:.1f} s of timed generation]")
    return 0 if same else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvkernels demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
