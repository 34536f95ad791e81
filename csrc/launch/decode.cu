// Host launcher of decode: completes the parameter block and picks the head-dim file. No kernels
// here (they are instantiated in decode_hd64/128/256.cu).
#include "launch/decode.h"

namespace kvk {

cudaError_t complete_decode_params(DecodeParams& p) {
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0 || p.num_splits < 1 || p.split_tokens < 1 ||
      p.page_size < 1 || p.max_seqlen_q < 1 || p.tokens_per_seq < 1) {
    return cudaErrorInvalidValue;
  }
  p.group = p.num_heads / p.num_kv_heads;
  // Row tiles per block: the smallest power of two covering a sequence's rows (decode: the group's
  // heads), at most the block's warps allow; more rows are served by several blocks (head_chunks),
  // each reading the KV head (cache attention: each only up to its last row's causal limit).
  const int64_t rows = static_cast<int64_t>(p.max_seqlen_q) * p.group;
  const int per_block = decode_rows_per_block(p.head_dim, rows);
  p.m_tiles = per_block / 16;
  const int64_t chunks = (rows + per_block - 1) / per_block;
  p.page_div = FastDivmod(static_cast<uint32_t>(p.page_size));
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.num_kv_heads * p.num_splits * chunks;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  p.head_chunks = static_cast<int>(chunks);
  return cudaSuccess;
}

cudaError_t launch_decode(DecodeParams p, DecodeDType q_dtype, DecodeDType cache_dtype, bool paged,
                          cudaStream_t stream) {
  if (p.batch <= 0 || p.num_heads <= 0) return cudaSuccess;  // nothing to compute
  // One query per sequence: the flat token index of the merge is the sequence.
  p.num_tokens = p.batch;
  p.tokens_per_seq = 1;
  p.max_seqlen_q = 1;
  p.q_stride_t = p.out_stride_t = p.lse_stride_t = 0;
  p.cu_seqlens_q = nullptr;
  const cudaError_t err = complete_decode_params(p);
  if (err != cudaSuccess) return err;
  switch (p.head_dim) {
    case 64: return launch_decode_hd64(p, q_dtype, cache_dtype, paged, stream);
    case 128: return launch_decode_hd128(p, q_dtype, cache_dtype, paged, stream);
    case 256: return launch_decode_hd256(p, q_dtype, cache_dtype, paged, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kvk
