// Explicit instantiation: sm80 prefill kernels for head dim 64, fp16 and bf16.
#include "kernels/prefill_sm80.cuh"
#include "launch/prefill.h"

namespace kvk {

cudaError_t prefill_sm80_hdim64(bool bf16, const PrefillParams& params, cudaStream_t stream) {
  return bf16 ? prefill::launch_sm80<__nv_bfloat16, 64>(params, stream)
              : prefill::launch_sm80<__half, 64>(params, stream);
}

}  // namespace kvk
