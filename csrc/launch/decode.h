// Host interface of the decode kernels: the launcher over raw pointers (parameter block in
// csrc/kernels/decode_params.h). Plain C++ plus the CUDA runtime types, so the torch glue
// (csrc/ops/decode.cpp) includes it cheaply.
//
// Requirements the caller checks (csrc/ops/decode.cpp; kvkernels/cuda/decode.py routes other
// layouts to Triton): head_dim 64, 128 or 256; q/out fp16 or bf16; the cache q's dtype or fp8 e4m3;
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

// Fills the derived fields of `params` (m_tiles, head_chunks, page_div) and launches the decode
// kernel, then the merge kernel when num_splits > 1, on `stream`. Returns the first launch error.
// paged: block_table addresses a [num_pages, page_size, Hkv, D] cache; otherwise the cache is
// [B, S_max, Hkv, D] with page_size = S_max, num_pages = B, max_pages = 1.
cudaError_t launch_decode(DecodeParams params, DecodeDType q_dtype, DecodeDType cache_dtype, bool paged,
                          cudaStream_t stream);

// One per head-dim file (csrc/launch/decode_hd*.cu), params already complete.
cudaError_t launch_decode_hd64(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                               bool paged, cudaStream_t stream);
cudaError_t launch_decode_hd128(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                                bool paged, cudaStream_t stream);
cudaError_t launch_decode_hd256(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                                bool paged, cudaStream_t stream);

}  // namespace kvk
