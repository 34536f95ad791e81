"""End-to-end generation with and without the KV cache.

A decoder shaped like GPT-2 small (12 layers, 12 heads of 64, vocab 50257; kvkernels.models'
Llama-style blocks with random weights) generates N tokens greedily twice from one prompt:

  with the cache     one prefill of the prompt, then per token append_kv + decode_attention
  without the cache  every token recomputes the whole sequence with causal prefill_attention

Both must pick identical tokens. Attention-score work (query-key pairs, over all heads and
layers) grows quadratically in N with the cache and cubically without it:

  with     B * H * L * ( P(P+1)/2 + sum_{i=1}^{N-1} (P + i) )
  without  B * H * L * sum_{i=0}^{N-1} (P + i)(P + i + 1)/2

Attention FLOPs are 4 * D per pair. Reported: time per token each way, those totals, and peak
device memory (GPU only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .timing import on_gpu, sync

GPT2_SMALL = {"layers": 12, "heads": 12, "head_dim": 64, "vocab": 50257}
TINY = {"layers": 2, "heads": 4, "head_dim": 16, "vocab": 128}


def score_pairs_with_cache(prompt: int, tokens: int, *, batch: int = 1, heads: int = 1, layers: int = 1) -> int:
    """Query-key pairs for a prefill of `prompt` tokens then tokens - 1 decode steps."""
    if tokens == 0:
        return 0
    pairs = prompt * (prompt + 1) // 2 + sum(prompt + i for i in range(1, tokens))
    return batch * heads * layers * pairs


def score_pairs_without_cache(prompt: int, tokens: int, *, batch: int = 1, heads: int = 1, layers: int = 1) -> int:
    """Query-key pairs when every one of the `tokens` steps recomputes causal attention over the
    whole sequence so far (prompt + i tokens at step i)."""
    pairs = sum((prompt + i) * (prompt + i + 1) // 2 for i in range(tokens))
    return batch * heads * layers * pairs


@dataclass
class GenerateConfig:
    layers: int
    heads: int
    head_dim: int
    vocab: int
    prompt: int
    tokens: int
    batch: int = 1
    dtype: str = "bf16"
    backend: str | None = None
    cache: str = "paged"
    page_size: int = 16
    seed: int = 0

    def as_dict(self) -> dict:
        return {"model": "gpt2-small-shaped" if (self.layers, self.heads, self.head_dim, self.vocab)
                == tuple(GPT2_SMALL.values()) else "custom", "layers": self.layers, "heads": self.heads,
                "head_dim": self.head_dim, "vocab": self.vocab, "batch": self.batch, "prompt": self.prompt,
                "tokens": self.tokens, "dtype": self.dtype, "backend": self.backend or "auto", "cache": self.cache,
                "page_size": self.page_size if self.cache == "paged" else None}


def build_model(cfg: GenerateConfig, device):
    from kvkernels.models import Decoder, DecoderConfig

    from .peers import dtype_of
    dim = cfg.heads * cfg.head_dim
    mc = DecoderConfig(vocab_size=cfg.vocab, dim=dim, num_layers=cfg.layers, num_heads=cfg.heads,
                       num_kv_heads=cfg.heads, ffn_dim=4 * dim, max_seq_len=cfg.prompt + cfg.tokens)
    return Decoder(mc, seed=cfg.seed, dtype=dtype_of(cfg.dtype), device=device, backend=cfg.backend)


def _timed(fn, device):
    if on_gpu(device):
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if on_gpu(device) else None
    return out, seconds, peak


def run_generate(cfg: GenerateConfig, device, *, warmup: bool = True) -> dict:
    """Generate cfg.tokens tokens with and without the cache; returns the `generate` entry."""
    from kvkernels.models import generate
    device = torch.device(device)
    model = build_model(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    prompt = torch.randint(0, cfg.vocab, (cfg.batch, cfg.prompt), generator=gen).to(device)
    max_len = cfg.prompt + cfg.tokens

    def new_cache():
        kw = {"page_size": cfg.page_size} if cfg.cache == "paged" else {}
        return model.new_cache(cfg.batch, max_len, kind=cfg.cache, **kw)

    if warmup:  # compile / autotune every kernel shape once, outside the timed runs
        generate(model, prompt, min(4, cfg.tokens), cache=new_cache())
        generate(model, prompt, min(2, cfg.tokens))
        sync(device)
    def with_cache():  # the cache lives only inside: the run without it does not carry its memory
        return generate(model, prompt, cfg.tokens, cache=new_cache())

    with_tokens, t_with, peak_with = _timed(with_cache, device)
    without_tokens, t_without, peak_without = _timed(lambda: generate(model, prompt, cfg.tokens), device)
    same = torch.equal(with_tokens, without_tokens)
    first = None
    if not same:
        differs = (with_tokens != without_tokens).any(0).nonzero()
        first = int(differs[0]) if differs.numel() else None
    shape = {"batch": cfg.batch, "heads": cfg.heads, "layers": cfg.layers}
    pairs_with = score_pairs_with_cache(cfg.prompt, cfg.tokens, **shape)
    pairs_without = score_pairs_without_cache(cfg.prompt, cfg.tokens, **shape)
    n = max(cfg.tokens, 1)
    entry = {
        "config": cfg.as_dict(),
        "device": torch.cuda.get_device_name(device) if on_gpu(device) else "cpu",
        "with_cache": {"total_s": t_with, "us_per_token": t_with / n * 1e6, "score_pairs": pairs_with,
                       "attention_flops": 4 * cfg.head_dim * pairs_with, "peak_bytes": peak_with},
        "without_cache": {"total_s": t_without, "us_per_token": t_without / n * 1e6, "score_pairs": pairs_without,
                          "attention_flops": 4 * cfg.head_dim * pairs_without, "peak_bytes": peak_without},
        "tokens_identical": bool(same),
        "first_divergence": first,
        "speedup": t_without / t_with if t_with > 0 else 0.0,
    }
    return entry
