"""kvkernels: CUDA and Triton attention kernels for LLM inference.

Public API (shapes: B batch, S sequence, Hq query heads, Hkv key/value heads, D head dim):

    prefill_attention(q, k, v, *, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                      max_seqlen_k, window_size, softcap, return_lse, backend)
    decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table, softmax_scale, window_left,
                     softcap, k_scale, v_scale, num_splits, return_lse, backend)
    cache_attention(q, k_cache, v_cache, cache_seqlens, *, cu_seqlens_q, max_seqlen_q, block_table, causal,
                    softmax_scale, window_left, softcap, k_scale, v_scale, num_splits, return_lse, backend)
    append_kv(k, v, k_cache, v_cache, cache_seqlens, *, block_table, k_scale, v_scale, cu_seqlens,
              rotary_cos, rotary_sin, rotary_interleaved, backend)
    append_kv_slots(k, v, k_cache, v_cache, slot_mapping, *, k_scale, v_scale, positions,
                    rotary_cos, rotary_sin, rotary_interleaved, backend)
    apply_rotary(x, cos, sin, positions, *, interleaved, inplace)   # queries: the rotation the appends fuse
    merge_attention_states(out_a, lse_a, out_b, lse_b)
    merge_states(outs, lses)
    paged_kv_from_csr(kv_indptr, kv_indices, kv_last_page_len, page_size, *, max_pages_per_seq)
                      -> (block_table, cache_seqlens)   # FlashInfer's CSR page lists, sync-free

backend: None (auto), "cuda", "triton" or "reference"; see kvkernels.api.
"""

from .api import (append_kv, append_kv_slots, apply_rotary, cache_attention, decode_attention, merge_attention_states,
                  merge_states, prefill_attention)
from .config import set_batch_invariant, set_checked_mode
from .paging import paged_kv_from_csr

__version__ = "0.1.0"

__all__ = [
    "prefill_attention",
    "decode_attention",
    "cache_attention",
    "append_kv",
    "append_kv_slots",
    "apply_rotary",
    "merge_attention_states",
    "merge_states",
    "paged_kv_from_csr",
    "set_batch_invariant",
    "set_checked_mode",
]
