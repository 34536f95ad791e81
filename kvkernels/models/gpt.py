"""A small Llama-style decoder whose attention runs through kvkernels: the model behind
`kvkernels demo`, and an end-to-end workload for benchmarks.

Architecture (Llama 2/3): token embedding, then per layer
    h += Wo . attention(RoPE(Wq . rms(h)), RoPE(Wk . rms(h)), Wv . rms(h))     grouped-query (GQA)
    h += Wdown . (silu(Wgate . rms(h)) * (Wup . rms(h)))                      SwiGLU
and logits = rms(h) . W_out^T. Weights are random (a fixed seed): the model
knows no language, but every tensor has a real model's shape and the attention pattern depends on
the whole context, so a cache that dropped or misplaced a token would change the tokens it picks.

Three ways to run attention, same weights:
    forward_full(tokens)              no cache: kvkernels.prefill_attention over the whole sequence
                                      (causal); generation recomputes every position each step
    prefill(tokens, cache, ids)       prompt: prefill_attention on the prompt, keys/values appended
                                      to the cache (kvkernels.append_kv)
    decode(tokens, cache, ids)        one token per sequence: append_kv + kvkernels.decode_attention
`generate` strings them together greedily. The residual stream and norms are kept in fp32 and the
logits computed in fp32, so low-precision runs round only at the matmuls and the attention ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import api
from ..cache import ContiguousKVCache, KVCache, PagedKVCache


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 1024
    dim: int = 512
    num_layers: int = 4
    num_heads: int = 8        # query heads
    num_kv_heads: int = 2     # key/value heads (GQA group of 4)
    ffn_dim: int = 1024       # SwiGLU hidden size
    max_seq_len: int = 4096   # RoPE table length
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} must be a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE rotates pairs)")

    def num_params(self) -> int:
        d, hd = self.dim, self.head_dim
        per_layer = d * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * d \
            + 3 * d * self.ffn_dim + 2 * d
        return self.vocab_size * d + self.num_layers * per_layer + d


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 in, fp32 out."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class Decoder(torch.nn.Module):
    """Llama-style decoder with random weights drawn from `seed` (reproducible on any device).

    Weights live in `dtype` (the matmul and attention precision); norms, residuals and logits are fp32.
    backend: passed to every kvkernels op (None = automatic choice).
    """

    def __init__(self, config: DecoderConfig = DecoderConfig(), *, seed: int = 0, dtype=torch.float32, device=None,
                 backend: Optional[str] = None):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.backend = backend
        c = config
        gen = torch.Generator().manual_seed(seed)

        def w(*shape, std):
            return torch.nn.Parameter((torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype),
                                      requires_grad=False)

        self.embed = w(c.vocab_size, c.dim, std=1.0)
        self.layers = torch.nn.ModuleList()
        hd = c.head_dim
        for _ in range(c.num_layers):
            layer = torch.nn.Module()
            # q/k weights a little larger than 1/sqrt(dim) so attention is peaked, not uniform: what a
            # token attends to then matters.
            layer.wqkv = w(c.dim, (c.num_heads + 2 * c.num_kv_heads) * hd, std=2.0 / math.sqrt(c.dim))
            layer.wo = w(c.num_heads * hd, c.dim, std=1.0 / math.sqrt(c.num_heads * hd))
            layer.w_gate_up = w(c.dim, 2 * c.ffn_dim, std=1.0 / math.sqrt(c.dim))
            layer.w_down = w(c.ffn_dim, c.dim, std=1.0 / math.sqrt(c.ffn_dim))
            layer.attn_norm = torch.nn.Parameter(torch.ones(c.dim, device=device), requires_grad=False)
            layer.mlp_norm = torch.nn.Parameter(torch.ones(c.dim, device=device), requires_grad=False)
            self.layers.append(layer)
        self.final_norm = torch.nn.Parameter(torch.ones(c.dim, device=device), requires_grad=False)
        # Untied (a tied head with random weights just repeats the current token); fp32 for the argmax.
        self.lm_head = torch.nn.Parameter(torch.randn(c.vocab_size, c.dim, generator=gen).to(device) * (4.0 / math.sqrt(c.dim)),
                                          requires_grad=False)
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(c.max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("rope_cos", angles.cos().float().to(device), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float().to(device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    # --------------------------------------------------------------------------------- pieces

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D], positions int64 [B, S] -> rotated (rotate-half convention), x's dtype."""
        cos = self.rope_cos[positions].unsqueeze(2)  # [B, S, 1, D/2]
        sin = self.rope_sin[positions].unsqueeze(2)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                 attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 last_only: bool) -> torch.Tensor:
        """tokens [B, S], positions [B, S]; attend(layer, q [B,S,Hq,D], k, v [B,S,Hkv,D]) -> [B,S,Hq,D].
        -> logits fp32 [B, S, vocab] (or [B, vocab] when last_only)."""
        c = self.config
        B, S = tokens.shape
        hd = c.head_dim
        h = self.embed[tokens].float()  # residual stream, fp32
        for i, layer in enumerate(self.layers):
            a = _rms_norm(h, layer.attn_norm, c.norm_eps).to(self.dtype)
            qkv = (a @ layer.wqkv).view(B, S, c.num_heads + 2 * c.num_kv_heads, hd)
            q, k, v = qkv.split([c.num_heads, c.num_kv_heads, c.num_kv_heads], dim=2)
            q = self._rope(q, positions)
            k = self._rope(k, positions)
            o = attend(i, q, k, v.contiguous())
            h = h + (o.reshape(B, S, c.num_heads * hd) @ layer.wo).float()
            m = _rms_norm(h, layer.mlp_norm, c.norm_eps).to(self.dtype)
            gate, up = (m @ layer.w_gate_up).chunk(2, dim=-1)
            h = h + ((F.silu(gate.float()) * up.float()).to(self.dtype) @ layer.w_down).float()
        if last_only:
            h = h[:, -1]
        return _rms_norm(h, self.final_norm, c.norm_eps) @ self.lm_head.t()

    # ------------------------------------------------------------------------------- entry points

    @torch.no_grad()
    def forward_full(self, tokens: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """No cache: causal prefill_attention over all of tokens [B, S] -> logits [B, vocab] (or [B, S, vocab])."""
        B, S = tokens.shape
        positions = torch.arange(S, device=tokens.device).expand(B, S)

        def attend(layer, q, k, v):
            return api.prefill_attention(q, k, v, causal=True, backend=self.backend)

        return self._forward(tokens, positions, attend, last_only)

    def _positions(self, cache: KVCache, ids: Sequence[int], n: int) -> torch.Tensor:
        # Absolute positions of the n new tokens; the host knows every length, so no device read.
        starts = [cache.seq_len(i) - n for i in ids]
        if len(set(starts)) == 1:
            return torch.arange(starts[0], starts[0] + n, device=self.device).expand(len(ids), n)
        base = torch.tensor(starts, dtype=torch.int64).to(self.device, non_blocking=True)
        return base.unsqueeze(1) + torch.arange(n, device=self.device)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: KVCache, ids=None) -> torch.Tensor:
        """Run tokens [B, S] through the model, appending their keys/values to the cache (sequence ids
        `ids`, allocated in it, or a SeqBatch; None = 0..B-1).
        -> logits of the last position [B, vocab]. For a fresh sequence attention runs on the prompt
        itself (prefill_attention); with earlier context it attends through the cache."""
        B, S = tokens.shape
        b = cache.batch(range(B) if ids is None else ids)
        fresh = all(cache.seq_len(i) == 0 for i in b.ids)
        cache.extend(b, S)
        positions = self._positions(cache, b.ids, S)

        def attend(layer, q, k, v):
            cache.append(layer, b, k, v)
            if fresh and cache.window_left < 0:
                return api.prefill_attention(q, k, v, causal=True, backend=self.backend)
            return cache.attend(layer, b, q)

        return self._forward(tokens, positions, attend, last_only=True)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: KVCache, ids=None) -> torch.Tensor:
        """One new token per sequence, tokens [B] -> logits [B, vocab] (append_kv + decode_attention)."""
        B = tokens.shape[0]
        b = cache.batch(range(B) if ids is None else ids)
        cache.extend(b, 1)
        positions = self._positions(cache, b.ids, 1)

        def attend(layer, q, k, v):
            cache.append(layer, b, k, v)
            return cache.attend(layer, b, q[:, 0]).unsqueeze(1)

        return self._forward(tokens.view(B, 1), positions, attend, last_only=True)

    def new_cache(self, batch: int, max_seq_len: int, *, kind: str = "paged", page_size: int = 16,
                  dtype=None, **kw) -> KVCache:
        """A cache sized for `batch` sequences of up to max_seq_len tokens, in the model's dtype."""
        c = self.config
        dtype = dtype or self.dtype
        if kind == "paged":
            pages_per_seq = -(-max_seq_len // page_size)
            return PagedKVCache(c.num_layers, batch * pages_per_seq, page_size, c.num_kv_heads, c.head_dim,
                                max_seqs=batch, max_pages_per_seq=pages_per_seq, dtype=dtype, device=self.device,
                                backend=self.backend, **kw)
        if kind == "contiguous":
            return ContiguousKVCache(c.num_layers, batch, max_seq_len, c.num_kv_heads, c.head_dim, dtype=dtype,
                                     device=self.device, backend=self.backend, **kw)
        raise ValueError(f"kind must be 'paged' or 'contiguous', got {kind!r}")


@torch.no_grad()
def generate(model: Decoder, prompt: torch.Tensor, max_new_tokens: int, *, cache: Optional[KVCache] = None,
             on_step: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Greedy generation. prompt [B, S] -> tokens [B, max_new_tokens].

    With a cache (fresh sequences 0..B-1 are allocated in it and freed at the end): one prefill,
    then one decode step per token. Without: every step recomputes the whole sequence
    (forward_full). on_step(i) is called after token i is chosen (for timing).
    """
    B, S = prompt.shape
    out = torch.empty(B, max_new_tokens, dtype=torch.int64, device=prompt.device)
    if max_new_tokens == 0:
        return out
    if cache is None:
        seq = prompt
        for i in range(max_new_tokens):
            nxt = model.forward_full(seq).argmax(-1)
            out[:, i] = nxt
            if on_step:
                on_step(i)
            seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        return out
    ids = cache.batch([cache.allocate() for _ in range(B)])
    try:
        nxt = model.prefill(prompt, cache, ids).argmax(-1)
        out[:, 0] = nxt
        if on_step:
            on_step(0)
        for i in range(1, max_new_tokens):
            nxt = model.decode(nxt, cache, ids).argmax(-1)
            out[:, i] = nxt
            if on_step:
                on_step(i)
    finally:
        cache.free(ids)
    return out


__all__ = ["DecoderConfig", "Decoder", "generate"]
