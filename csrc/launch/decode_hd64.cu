// Decode kernels for head dim 64 (see decode_launch.cuh).
#include "launch/decode_launch.cuh"

namespace kvk {

cudaError_t launch_decode_hd64(const DecodeParams& params, DecodeDType q_dtype, DecodeDType cache_dtype, bool paged,
                               cudaStream_t stream) {
  return decode::launch_head_dim<64, false>(params, q_dtype, cache_dtype, paged, stream);
}

}  // namespace kvk
