"""Hugging Face transformers integration: attn_implementation="kvkernels" and a paged cache.

    import kvkernels.integrations.transformers as kvk_hf
    kvk_hf.register()                                   # once per process
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="kvkernels")
    out = model.generate(ids, max_new_tokens=64)        # the model's usual DynamicCache
    cache = kvk_hf.PagedCache(model.config, max_batch_size=8, max_cache_len=4096)
    out = model.generate(ids, max_new_tokens=64, cache=cache)             # a paged cache

(`cache=` is generate's argument from transformers 5.24; older versions take past_key_values=cache,
which 5.24 still accepts with a deprecation warning until 6.0. Both reach the same PagedCache.)

Models whose attention goes through transformers' AttentionInterface (Llama, Mistral, Qwen2 and
the rest of the Llama family) then run

  prompt (several queries)   kvkernels.prefill_attention, causal (bottom-right aligned), GQA native
  one new token              kvkernels.decode_attention over the cache, with no copy: the
                             DynamicCache's [B, Hkv, S, D] keys are read through a transposed view
  PagedCache                 keys/values appended with kvkernels.append_kv into a
                             kvkernels.cache.PagedKVCache; one new token reads them with
                             decode_attention, a prompt or several new tokens (a prompt chunk,
                             assisted generation's draft tokens) with kvkernels.cache_attention,
                             all through the block table, with no copy

Masks: register() also registers a mask builder that hands the attention a 2-D padding mask only
when a batch has padding (as FlashAttention's integration does). A padded batch is unpadded into a
varlen prefill_attention call; with the DynamicCache that copies the unpadded keys every step (use
unpadded batches for speed). Padding is taken to be on the left, as generate() pads decoder-only
models. Sliding windows (Mistral's `sliding_window`) and `softcap` are passed to the kernels.

Not supported (NotImplementedError naming it): dropout during training, custom 4-D masks,
attention sinks (`s_aux`), `output_attentions`; with PagedCache also padded batches, beam search
(reorder_cache), cropping a sliding-window cache, and layers that mix sliding and full attention.
PagedCache crops (assisted generation's rejected draft tokens go back, pages included).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import api
from ..cache import PagedKVCache

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("kvkernels.integrations.transformers needs transformers: pip install 'kvkernels[transformers]'") from e

NAME = "kvkernels"


# -------------------------------------------------------------------------------------- masks


def _mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
          attention_mask=None, **kwargs):
    """None when every key is real (plain causal), else the 2-D bool padding mask [B, kv_length]."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register(name: str = NAME) -> str:
    """Make attn_implementation=name (default "kvkernels") available to every transformers model.
    Idempotent. -> the name."""
    from transformers import AttentionInterface
    AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers without mask interfaces build 4-D masks
        return name
    AttentionMaskInterface.register(name, _mask)
    return name


# -------------------------------------------------------------------------------- the attention


def _window(sliding_window) -> tuple[int, int]:
    # transformers' sliding_window counts the query itself: it sees sliding_window keys.
    if sliding_window is None:
        return (-1, -1)
    return (int(sliding_window) - 1, int(sliding_window) - 1)


def _unpadded_attention(q, k, v, mask, *, causal, scale, window, softcap):
    """Varlen attention over the real tokens of a left-padded batch.
    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], mask bool [B, Sk] (True = real) -> [B, Sq, Hq, D] (0 at padding)."""
    B, sq, hq, d = q.shape
    sk = k.shape[1]
    mask_k = mask.to(torch.bool)
    mask_q = mask_k[:, -sq:]
    idx_k = mask_k.reshape(-1).nonzero().squeeze(1)
    idx_q = mask_q.reshape(-1).nonzero().squeeze(1)
    cu_k = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu_q = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = mask_k.sum(1).cumsum(0)
    cu_q[1:] = mask_q.sum(1).cumsum(0)
    kf = k.reshape(B * sk, *k.shape[2:]).index_select(0, idx_k)
    vf = v.reshape(B * sk, *v.shape[2:]).index_select(0, idx_k)
    qf = q.reshape(B * sq, hq, d).index_select(0, idx_q)
    out = api.prefill_attention(qf, kf, vf, causal=causal, softmax_scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                window_size=window, softcap=softcap)
    full = q.new_zeros(B * sq, hq, d)
    full.index_copy_(0, idx_q, out)
    return full.view(B, sq, hq, d)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                      sliding_window=None, softcap=None, **kwargs):
    """transformers' attention interface. query [B, Hq, Sq, D]; key/value [B, Hkv, Sk, D] (the whole
    cache after its update), or a PagedCache's storage -> (out [B, Sq, Hq, D], None)."""
    if dropout and getattr(module, "training", False):
        raise NotImplementedError("attn_implementation='kvkernels' is inference-only: dropout is not supported")
    for unsupported in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"attn_implementation='kvkernels' does not support {unsupported!r}")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("attn_implementation='kvkernels' does not return attention weights "
                                  "(output_attentions); use attn_implementation='eager'")
    if kwargs.get("cache") is not None:
        raise NotImplementedError("transformers' continuous-batching cache is not supported; use "
                                  "kvkernels.integrations.transformers.PagedCache")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
        raise NotImplementedError("custom 4-D attention masks are not supported by attn_implementation='kvkernels'")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    softcap = float(softcap or 0.0)
    window = _window(sliding_window)
    q = query.transpose(1, 2)  # [B, Sq, Hq, D]: a view, last dim contiguous
    sq = q.shape[1]

    layer = getattr(key, "_kvkernels_layer", None)
    if layer is not None:
        return layer.attend(q, attention_mask, causal=causal, scale=scaling, window=window, softcap=softcap), None

    k = key.transpose(1, 2)  # [B, Sk, Hkv, D] views of the cache, no copy
    v = value.transpose(1, 2)
    if attention_mask is not None:
        return _unpadded_attention(q, k, v, attention_mask, causal=causal, scale=scaling, window=window,
                                   softcap=softcap), None
    if sq == 1:
        B, sk = k.shape[0], k.shape[1]
        seqlens = torch.full((B,), sk, dtype=torch.int32, device=q.device)
        out = api.decode_attention(q[:, 0], k, v, seqlens, softmax_scale=scaling, window_left=window[0],
                                   softcap=softcap)
        return out.unsqueeze(1), None
    out = api.prefill_attention(q, k, v, causal=causal, softmax_scale=scaling, window_size=window, softcap=softcap)
    return out, None


# ----------------------------------------------------------------------------------- paged cache


class _PagedLayer(CacheLayerMixin):
    """One layer of a PagedCache: appends to the shared pool, returns the pool's storage tagged so
    the attention knows to read it through the block table."""

    is_compileable = False
    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, owner: "PagedCache", layer_idx: int):
        super().__init__()
        self.keys = self.values = None
        self.is_initialized = False
        self.owner = owner
        self.layer_idx = layer_idx
        self.length = 0        # tokens this layer holds (absolute)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.owner._build(key_states)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states/value_states [B, Hkv, S, D] -> the pool's (k, v) storage of this layer."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pool, batch = self.owner._step(self, key_states.shape[0], key_states.shape[2])
        k = key_states.transpose(1, 2)
        v = value_states.transpose(1, 2)
        pool.append(self.layer_idx, batch, k, v)
        self.length += k.shape[1]
        return self.owner._views[self.layer_idx]

    def attend(self, q, attention_mask, *, causal, scale, window, softcap):
        pool, batch = self.owner.pool, self.owner.batch
        if attention_mask is not None:
            raise NotImplementedError("PagedCache does not support padded batches; pass sequences of equal length "
                                      "or use the default cache")
        if not causal:
            raise NotImplementedError("PagedCache serves causal decoders only")
        if window[0] != pool.window_left:
            raise NotImplementedError(f"this layer's sliding window ({window[0] + 1 if window[0] >= 0 else None}) "
                                      f"differs from the PagedCache's ({pool.window_left + 1 if pool.window_left >= 0 else None})")
        if q.shape[1] == 1:
            out = pool.attend(self.layer_idx, batch, q[:, 0], softmax_scale=scale, softcap=softcap)
            return out.unsqueeze(1)
        # A prompt, a prompt chunk or draft tokens to verify: cache_attention on the pages in place.
        return pool.attend(self.layer_idx, batch, q, softmax_scale=scale, softcap=softcap)

    def get_mask_sizes(self, query_length, *args):
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.length + int(query_length), 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.owner.max_cache_len

    get_max_cache_shape = get_max_length  # the name before transformers 5

    def reset(self) -> None:
        self.length = 0

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("PagedCache does not support beam search (reorder_cache)")

    def crop(self, tokens_to_remove):
        """Drop the last -tokens_to_remove tokens (or keep the first tokens_to_remove >= 0, the older
        form): assisted generation rejecting draft tokens. The first layer cropped shortens the pool."""
        if tokens_to_remove == 0:
            return
        keep = self.length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, self.length)
        remove = self.length - max(keep, 0)
        if remove <= 0:
            return
        self.owner._crop(self, remove)
        self.length -= remove

    def batch_repeat_interleave(self, repeats):
        raise NotImplementedError("PagedCache does not support expanding the batch (num_return_sequences > 1)")

    def batch_select_indices(self, indices):
        raise NotImplementedError("PagedCache does not support selecting batch rows")


def _layer_window(config) -> int:
    """window_left for the pool: -1 (full attention) or sliding_window - 1 when every layer slides."""
    types = getattr(config, "layer_types", None)
    sw = getattr(config, "sliding_window", None)
    if types is not None:
        kinds = set(types)
        if kinds == {"full_attention"}:
            return -1
        if kinds == {"sliding_attention"} and sw:
            return int(sw) - 1
        raise NotImplementedError(f"PagedCache: layers of types {sorted(kinds)} are not supported "
                                  "(all full attention, or all sliding)")
    if sw and getattr(config, "use_sliding_window", True):
        return int(sw) - 1
    return -1


class PagedCache(Cache):
    """A transformers Cache backed by kvkernels.cache.PagedKVCache (all layers in one page pool).

    config: the model's config (layers, KV heads, head dim, sliding window).
    max_batch_size, max_cache_len: the largest batch and sequence length to serve; the pool holds
    max_batch_size * ceil(max_cache_len / page_size) pages unless num_pages says otherwise.
    dtype/device: of the storage (default: those of the first keys seen).
    Sequences are allocated on the first forward and freed by reset() (or when the cache is dropped).
    """

    def __init__(self, config, max_batch_size: int, max_cache_len: int, *, page_size: int = 16,
                 num_pages: Optional[int] = None, dtype=None, device=None, backend: Optional[str] = None):
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self._max_batch_size = max_batch_size
        self._max_cache_len = max_cache_len
        self.page_size = page_size
        self.num_pages = num_pages or max_batch_size * -(-max_cache_len // page_size)
        self.window_left = _layer_window(config)
        self.dtype, self.device, self.backend = dtype, device, backend
        self.pool: Optional[PagedKVCache] = None
        self.batch = None
        self.length = 0  # tokens every sequence has been extended by
        self._views: list = []
        super().__init__(layers=[_PagedLayer(self, i) for i in range(self.num_layers)])

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    def _build(self, key_states) -> None:
        if self.pool is not None:
            return
        dtype = self.dtype or key_states.dtype
        device = self.device or key_states.device
        self.pool = PagedKVCache(self.num_layers, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim,
                                 max_seqs=self.max_batch_size, max_pages_per_seq=-(-self.max_cache_len // self.page_size),
                                 dtype=dtype, device=device, window_left=self.window_left, backend=self.backend)
        self._views = []
        for i in range(self.num_layers):
            k, v = self.pool.layer_cache(i)
            # Views of the pool, tagged: attention_forward recognises them and reads through the block table.
            k, v = k.view(k.shape), v.view(v.shape)
            k._kvkernels_layer = v._kvkernels_layer = self.layers[i]
            self._views.append((k, v))

    def _step(self, layer: _PagedLayer, batch_size: int, n: int):
        """Called by each layer's update: the first layer of a step extends every sequence by n."""
        if self.batch is None:
            if batch_size > self.max_batch_size:
                raise ValueError(f"batch {batch_size} exceeds this PagedCache's max_batch_size={self.max_batch_size}")
            ids = [self.pool.allocate() for _ in range(batch_size)]
            self.batch = self.pool.batch(ids)
        elif batch_size != len(self.batch):
            raise ValueError(f"batch size changed from {len(self.batch)} to {batch_size}; call reset() between batches")
        if layer.length == self.length:
            self.pool.extend(self.batch, n)
            self.length += n
        elif layer.length + n != self.length:
            raise RuntimeError(f"layer {layer.layer_idx} holds {layer.length} tokens, the cache {self.length}: "
                               "layers must be updated once per step with the same tokens")
        return self.pool, self.batch

    def _crop(self, layer: _PagedLayer, remove: int) -> None:
        """Called by each layer's crop: the first layer of a crop shortens every sequence by `remove`."""
        if layer.length == self.length:
            if self.pool.window_left >= 0:
                raise NotImplementedError("PagedCache cannot crop a sliding-window cache (released pages "
                                          "cannot be restored)")
            self.pool.truncate(self.batch, remove)
            self.length -= remove
        elif layer.length - remove != self.length:
            raise RuntimeError(f"layer {layer.layer_idx} holds {layer.length} tokens, the cache {self.length}: "
                               "layers must be cropped by the same number of tokens")

    def reset(self):
        if self.pool is not None and self.batch is not None:
            self.pool.free(self.batch.ids)
        self.batch = None
        self.length = 0
        for layer in self.layers:
            layer.reset()

    def memory_bytes(self) -> int:
        return self.pool.memory_bytes() if self.pool is not None else 0


__all__ = ["register", "attention_forward", "PagedCache", "NAME"]
