// Host launcher of decode: completes the parameter block and picks the head-dim file. No kernels
// here (they are instantiated in decode_hd64/128/256.cu).
#include "launch/decode.h"

namespace kvk {

cudaError_t launch_decode(DecodeParams p, DecodeDType q_dtype, DecodeDType cache_dtype, bool paged,
                          cudaStream_t stream) {
  if (p.batch <= 0 || p.num_heads <= 0) return cudaSuccess;  // nothing to compute
  if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0 || p.num_splits < 1 || p.split_tokens < 1 ||
      p.page_size < 1) {
    return cudaErrorInvalidValue;
  }
  p.group = p.num_heads / p.num_kv_heads;
  // Query-head tiles per block: the smallest power of two covering the group, at most the block's
  // warps allow; larger groups are served by several blocks (head_chunks), each reading the KV head.
  const int max_tiles = decode_max_heads_per_block(p.head_dim) / 16;
  const int needed = (p.group + 15) / 16;
  int tiles = 1;
  while (tiles < needed && tiles < max_tiles) tiles *= 2;
  p.m_tiles = tiles;
  p.head_chunks = (p.group + 16 * tiles - 1) / (16 * tiles);
  p.page_div = FastDivmod(static_cast<uint32_t>(p.page_size));
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.num_kv_heads * p.num_splits * p.head_chunks;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  switch (p.head_dim) {
    case 64: return launch_decode_hd64(p, q_dtype, cache_dtype, paged, stream);
    case 128: return launch_decode_hd128(p, q_dtype, cache_dtype, paged, stream);
    case 256: return launch_decode_hd256(p, q_dtype, cache_dtype, paged, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kvk
