// Explicit instantiation: sm80 prefill kernels for head dim 128, fp16 and bf16.
#include "kernels/prefill_sm80.cuh"
#include "launch/prefill.h"

namespace kvk {

cudaError_t prefill_sm80_hdim128(bool bf16, const PrefillParams& params, cudaStream_t stream) {
  return bf16 ? prefill::launch_sm80<__nv_bfloat16, 128>(params, stream)
              : prefill::launch_sm80<__half, 128>(params, stream);
}

}  // namespace kvk
