// Host entry points of the prefill kernels: plain C++ over raw pointers and strides
// (PrefillParams), callable from the torch glue without any CUDA compiler.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/prefill_params.h"

namespace kvk {

// Launch geometry of one call: which kernel shape runs and how many blocks.
struct PrefillLaunchPlan {
  int block_m;     // query rows per block
  int block_n;     // keys per K/V tile
  int threads;     // threads per block
  int smem_bytes;  // dynamic shared memory per block
  int grid_x;      // query row blocks: ceil(max_seqlen_q / block_m)
  int grid_y;      // query heads
  int grid_z;      // sequences
};

// path: kvk::prefill::kPathSm80 or kPathSm90. Returns false when (path, head_dim) has no kernel.
bool prefill_plan(int path, int head_dim, int batch, int num_heads, int max_seqlen_q, PrefillLaunchPlan* plan);

// Runs one prefill on `stream`. The caller has checked shapes, dtypes (fp16 / bf16), alignment
// (16-byte base pointers, strides in multiples of 8 elements) and, for kPathSm90, that the device is
// compute capability 9.0. Returns the launch's CUDA error.
cudaError_t prefill_launch(int path, bool bf16, const PrefillParams& params, cudaStream_t stream);

// One launcher per (path, head dim), each in its own translation unit so the build parallelises.
cudaError_t prefill_sm80_hdim64(bool bf16, const PrefillParams& params, cudaStream_t stream);
cudaError_t prefill_sm80_hdim128(bool bf16, const PrefillParams& params, cudaStream_t stream);
cudaError_t prefill_sm80_hdim256(bool bf16, const PrefillParams& params, cudaStream_t stream);
cudaError_t prefill_sm90_hdim64(bool bf16, const PrefillParams& params, cudaStream_t stream);
cudaError_t prefill_sm90_hdim128(bool bf16, const PrefillParams& params, cudaStream_t stream);
cudaError_t prefill_sm90_hdim256(bool bf16, const PrefillParams& params, cudaStream_t stream);

}  // namespace kvk
