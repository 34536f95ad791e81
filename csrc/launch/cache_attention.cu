// Host launcher of cache attention: completes the parameter block and picks the head-dim file
// (kernels instantiated in cache_attention_hd64/128/256.cu, from the decode kernel template).
#include "launch/decode.h"

namespace kvk {

cudaError_t launch_cache_attention(DecodeParams p, DecodeDType q_dtype, DecodeDType cache_dtype, bool paged,
                                   cudaStream_t stream) {
  if (p.batch <= 0 || p.num_heads <= 0 || p.num_tokens <= 0 || p.max_seqlen_q <= 0) return cudaSuccess;
  const cudaError_t err = complete_decode_params(p);
  if (err != cudaSuccess) return err;
  switch (p.head_dim) {
    case 64: return launch_cache_attention_hd64(p, q_dtype, cache_dtype, paged, stream);
    case 128: return launch_cache_attention_hd128(p, q_dtype, cache_dtype, paged, stream);
    case 256: return launch_cache_attention_hd256(p, q_dtype, cache_dtype, paged, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kvk
