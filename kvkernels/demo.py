"""`kvkernels demo`: greedy generation with and without a KV cache, through kvkernels' ops.

A small Llama-style decoder (GQA, RoPE, SwiGLU; random weights from a fixed seed, see
kvkernels.models.gpt) generates the same continuation twice:

  with the cache     the prompt once through prefill_attention, its keys/values stored with
                     append_kv into a paged cache; then each new token appends its own key/value
                     and attends to the cache with decode_attention: work per step grows linearly
  without a cache    every step recomputes the whole sequence (prefill_attention over all of it):
                     work per step grows with the square of the length

and shows that the tokens are identical, the attention work each way, time per token and the
memory the cache holds. On a GPU the ops run the CUDA/Triton kernels; on a CPU they run the PyTorch
reference, and the timings say so.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import api
from .cache import PagedKVCache
from .memory import format_bytes, kv_cache_bytes
from .models.gpt import Decoder, DecoderConfig, generate

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model and cache precision (default: fp16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences generated together (default 8 GPU / 4 CPU)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512 GPU / 64 CPU)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 128 GPU / 32 CPU)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--cache", choices=["paged", "contiguous"], default="paged", help="KV cache layout (default paged)")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per page of the paged cache (default 16)")
    parser.add_argument("--backend", choices=["cuda", "triton", "reference"], default=None,
                        help="force a backend (default: automatic)")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_generate(model, prompt, new_tokens, cache):
    """-> (tokens [B, new_tokens], seconds per step list)."""
    device = prompt.device
    stamps = []
    _sync(device)
    start = time.perf_counter()

    def on_step(i):
        _sync(device)
        stamps.append(time.perf_counter())

    tokens = generate(model, prompt, new_tokens, cache=cache, on_step=on_step)
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return tokens, steps


def backends_used(model: Decoder, cache) -> dict:
    """Which backend the automatic dispatch picks for each op of this model and cache."""
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


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_gpu else torch.float32)
    B = _default(args.batch, 8 if on_gpu else 4)
    P = _default(args.prompt_len, 512 if on_gpu else 64)
    T = _default(args.new_tokens, 128 if on_gpu else 32)
    for name, value in (("--batch", B), ("--prompt-len", P), ("--new-tokens", T), ("--layers", args.layers),
                        ("--page-size", args.page_size)):
        if value < 1:
            print(f"kvkernels demo: {name} must be >= 1")
            return 2

    config = DecoderConfig(num_layers=args.layers, max_seq_len=max(4096, P + T))
    model = Decoder(config, seed=args.seed, dtype=dtype, device=device, backend=args.backend)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, config.vocab_size, (B, P), generator=gen).to(device)
    cache = model.new_cache(B, P + T, kind=args.cache, page_size=args.page_size)
    used = backends_used(model, cache)

    print(summary_line(device, used))
    c = config
    print(f"model: Llama-style decoder, {c.num_layers} layers, {c.num_heads} query / {c.num_kv_heads} KV heads "
          f"of {c.head_dim} (GQA), dim {c.dim}, vocab {c.vocab_size}, {c.num_params() / 1e6:.1f}M random parameters "
          f"(seed {args.seed}), {str(dtype).replace('torch.', '')} on {device.type}")
    print(f"task:  greedy, batch {B}, prompt {P} tokens, {T} new tokens; {args.cache} KV cache"
          + (f" (pages of {args.page_size})" if args.cache == "paged" else ""))
    # Warm-up: compiles (GPU) or initialises every op once, so the timings below are steady state.
    generate(model, prompt[:, : min(P, 32)], 2, cache=cache)
    generate(model, prompt[:, : min(P, 32)], 2)
    print()

    cached, t_cached = _timed_generate(model, prompt, T, cache)
    full, t_full = _timed_generate(model, prompt, T, None)

    same = torch.equal(cached, full)
    print(f"with cache:    {cached[0, :12].tolist()} ...")
    print(f"without cache: {full[0, :12].tolist()} ...")
    if same:
        print(f"tokens identical: yes (all {B} x {T})")
    else:
        diff = (cached != full).any(0).nonzero()
        step = int(diff[0]) if diff.numel() else -1
        print(f"tokens identical: NO, first difference at step {step}")
    print()

    # Attention work, as query-key pairs (each pair: one q.k dot and one p.v accumulate per head).
    # Step 0 reads the prompt; step t >= 1 feeds the token at position P + t - 1, which sees P + t keys.
    cache_steps = [B * _pairs_full(P)] + [B * (P + t) for t in range(1, T)]
    full_steps = [B * _pairs_full(P + t) for t in range(T)]
    shown = sorted({0, min(1, T - 1), T - 1})
    print("attention work (query-key pairs per head and layer, whole batch):")
    print(f"  {'':<15}" + "".join(f"{'step ' + str(t):>14}" for t in shown) + f"{'total':>16}")
    print(f"  {'with cache':<15}" + "".join(f"{cache_steps[t]:>14,}" for t in shown) + f"{sum(cache_steps):>16,}"
          "   linear per step after the prompt")
    print(f"  {'without cache':<15}" + "".join(f"{full_steps[t]:>14,}" for t in shown) + f"{sum(full_steps):>16,}"
          f"   quadratic per step: {sum(full_steps) / sum(cache_steps):.1f}x the total")
    tokens_cached = B * (P + T - 1)
    tokens_full = B * sum(P + t for t in range(T))
    print(f"  tokens through the projections/MLP: {tokens_cached:,} with cache, {tokens_full:,} without")
    print()

    decode_ms = [1e3 * s for s in t_cached[1:]] or [float("nan")]
    full_ms = [1e3 * s for s in t_full]
    interpreted = "triton" in used.values()
    what = "GPU" if on_gpu else ("CPU, Triton interpreter" if interpreted else "CPU reference")
    print(f"time per generated token ({what} timings, whole batch of {B} per step):")
    print(f"  with cache:    prefill {1e3 * t_cached[0]:.1f} ms, then {sum(decode_ms) / len(decode_ms):.2f} ms per token "
          f"(first {decode_ms[0]:.2f}, last {decode_ms[-1]:.2f})")
    print(f"  without cache: {sum(full_ms) / len(full_ms):.2f} ms per token (first {full_ms[0]:.2f}, last {full_ms[-1]:.2f})")
    total_c, total_f = sum(t_cached), sum(t_full)
    print(f"  total: {total_c:.2f} s with cache, {total_f:.2f} s without ({total_f / total_c:.1f}x)")
    if not on_gpu:
        path = "the Triton interpreter" if interpreted else "the PyTorch reference path"
        print(f"  note: these are CPU timings of {path} (no GPU here), not kernel timings;"
              " run on a GPU for the CUDA/Triton kernels")
    print()

    used_bytes = kv_cache_bytes(c.num_layers, c.num_kv_heads, c.head_dim, P + T, B, dtype)
    print(f"KV cache: {format_bytes(used_bytes)} to hold {B} x {P + T} tokens "
          f"(2 x {c.num_layers} layers x {c.num_kv_heads} KV heads x {c.head_dim} x "
          f"{torch.empty((), dtype=dtype).element_size()} B per token); {format_bytes(cache.memory_bytes())} allocated; "
          f"without GQA it would be {format_bytes(used_bytes * c.num_heads // c.num_kv_heads)}")
    return 0 if same else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvkernels demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
