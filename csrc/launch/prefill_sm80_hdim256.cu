// Explicit instantiation: sm80 prefill kernels for head dim 256, fp16 and bf16.
#include "kernels/prefill_sm80.cuh"
#include "launch/prefill.h"

namespace kvk {

cudaError_t prefill_sm80_hdim256(bool bf16, const PrefillParams& params, cudaStream_t stream) {
  return bf16 ? prefill::launch_sm80<__nv_bfloat16, 256>(params, stream)
              : prefill::launch_sm80<__half, 256>(params, stream);
}

}  // namespace kvk
