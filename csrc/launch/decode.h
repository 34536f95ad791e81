// Host interface of the decode and cache-attention kernels: the launchers over raw pointers
// (parameter block in csrc/kernels/decode_params.h). Plain C++ plus the CUDA runtime types, so the torch glue
// (csrc/ops/decode.cpp) includes it cheaply.
//
// Requirements the caller checks (csrc/ops/decode.cpp; kvkernels/cuda/decode.py routes other
// layouts to Triton): head_dim 64, 128 or 256; q/out fp16 or bf16; the cache q's dtype or fp8 (e4m3, e5m2);
// q, out, k_cache and v_cache 16-byte aligned with every stride of a dimension longer than one a
// multiple of 16 bytes; capacity < 2^30; with num_splits > 1 a workspace of
// [num_splits, B, Hq, D] + [num_splits, B, Hq] fp32 and num_splits * split_tokens covering the
// attended positions.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/decode_params.h"

namespace kvk {

// Tokens of one KV tile of the kernel for a head dim: split_tokens should be a multiple of it
// (kvkernels/cuda/decode.py plans with the same number).
constexpr int decode_tile_tokens(int head_dim) { return head_dim == 256 ? 32 : 64; }

// Most query heads one block serves (larger GQA groups are cut into chunks of this many).
constexpr int decode_max_heads_per_block(int head_dim) { return head_dim == 256 ? 32 : 64; }

// MMA rows of one block for a sequence of `rows` rows (decode: the group's heads; cache attention:
// max_seqlen_q * group): the smallest multiple of 16 that is a power-of-two number of 16-row tiles
// covering them, at most what the block's warps allow. kvkernels/cuda/cache_attn.py mirrors it.
constexpr int decode_rows_per_block(int head_dim, long long rows) {
  int tiles = 1;
  while (16LL * tiles < rows && 16 * tiles < decode_max_heads_per_block(head_dim)) tiles *= 2;
  return 16 * tiles;
}

// Cache attention: the most positions one row tile can attend, which num_splits * split_tokens
// must cover. A tile of `rows_per_block` rows holds at most (rows_per_block - 1) / group + 2 query
// tokens; causal with a window it attends from its first token's window start to its last token,
// non-causal with a window from that start to the end of the sequence (at most max_seqlen_q tokens
// past the first); without a window, the capacity.
constexpr long long cache_attention_span(long long capacity, int window_left, bool causal, int max_seqlen_q,
                                         int group, int rows_per_block) {
  if (window_left < 0) return capacity;
  const long long tile_tokens = (rows_per_block - 1) / group + 2;
  const long long tokens = causal && tile_tokens < max_seqlen_q ? tile_tokens : max_seqlen_q;
  const long long span = window_left + tokens;
  return span < capacity ? span : capacity;
}

// Fills the derived fields of `p` (group, m_tiles, head_chunks, page_div) from the sizes, max_seqlen_q
// included; cudaErrorInvalidValue / InvalidConfiguration for sizes no kernel takes.
cudaError_t complete_decode_params(DecodeParams& p);

// Fills the derived fields of `params` (m_tiles, head_chunks, page_div) and launches the decode
// kernel, then the merge kernel when num_splits > 1, on `stream`. Returns the first launch error.
// paged: block_table addresses a [num_pages, page_size, Hkv, D] cache; otherwise the cache is
// [B, S_max, Hkv, D] with page_size = S_max, num_pages = B, max_pages = 1.
cudaError_t launch_decode(DecodeParams params, DecodeDType q_dtype, DecodeDType cache_dtype, bool paged,
                          cudaStream_t stream);

// Cache attention (csrc/launch/cache_attention.cu): the same kernel template with kCacheAttn, rows
// (token, head) token-major. The caller sets cu_seqlens_q (ragged) or tokens_per_seq = Sq (dense),
// num_tokens, max_seqlen_q, causal and the token strides; splits must cover cache_attention_span.
cudaError_t launch_cache_attention(DecodeParams params, DecodeDType q_dtype, DecodeDType cache_dtype, bool paged,
                                   cudaStream_t stream);

// One per head-dim file (csrc/launch/decode_hd*.cu, cache_attention_hd*.cu), params already complete.
cudaError_t launch_decode_hd64(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                               bool paged, cudaStream_t stream);
cudaError_t launch_decode_hd128(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                                bool paged, cudaStream_t stream);
cudaError_t launch_decode_hd256(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                                bool paged, cudaStream_t stream);
cudaError_t launch_cache_attention_hd64(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                                        bool paged, cudaStream_t stream);
cudaError_t launch_cache_attention_hd128(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                                         bool paged, cudaStream_t stream);
cudaError_t launch_cache_attention_hd256(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                                         bool paged, cudaStream_t stream);

}  // namespace kvk
