// Cache-attention kernels for head dim 256 (see decode_launch.cuh).
#include "launch/decode_launch.cuh"

namespace kvk {

cudaError_t launch_cache_attention_hd256(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype,
                                      bool paged, cudaStream_t stream) {
  return decode::launch_head_dim<256, true>(params, q_dtype, cache_dtype, paged, stream);
}

}  // namespace kvk
