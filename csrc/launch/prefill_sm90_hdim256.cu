// Explicit instantiation: sm90 prefill kernels for head dim 256, fp16 and bf16.
#include "kernels/prefill_sm90.cuh"
#include "launch/prefill.h"

namespace kvk {

cudaError_t prefill_sm90_hdim256(bool bf16, const PrefillParams& params, cudaStream_t stream) {
  return bf16 ? prefill::launch_sm90<__nv_bfloat16, 256>(params, stream)
              : prefill::launch_sm90<__half, 256>(params, stream);
}

}  // namespace kvk
