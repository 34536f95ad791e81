// Explicit instantiation: sm90 prefill kernels for head dim 128, fp16 and bf16.
#include "kernels/prefill_sm90.cuh"
#include "launch/prefill.h"

namespace kvk {

cudaError_t prefill_sm90_hdim128(bool bf16, const PrefillParams& params, cudaStream_t stream) {
  return bf16 ? prefill::launch_sm90<__nv_bfloat16, 128>(params, stream)
              : prefill::launch_sm90<__half, 128>(params, stream);
}

}  // namespace kvk
