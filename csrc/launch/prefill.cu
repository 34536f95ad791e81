// Prefill dispatch: (path, head dim) -> the launcher of its own translation unit; launch plans
// from the tile table; the TMA tensor-map encoder of the sm90 path. No kernel code here.
#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include <mutex>

#include "kernels/prefill_config.h"
#include "launch/prefill.h"

namespace kvk {

namespace {

template <typename Shape>
void fill_plan(int batch, int num_heads, int max_seqlen_q, PrefillLaunchPlan* plan) {
  plan->block_m = Shape::kBlockM;
  plan->block_n = Shape::kBlockN;
  plan->threads = Shape::kThreads;
  plan->smem_bytes = Shape::kSmemBytes;
  plan->grid_x = (max_seqlen_q + Shape::kBlockM - 1) / Shape::kBlockM;
  plan->grid_y = num_heads;
  plan->grid_z = batch;
}

}  // namespace

bool prefill_plan(int path, int head_dim, int batch, int num_heads, int max_seqlen_q, PrefillLaunchPlan* plan) {
  using namespace prefill;
  if (path == kPathSm80) {
    switch (head_dim) {
      case 64: fill_plan<Sm80Shape<64>>(batch, num_heads, max_seqlen_q, plan); return true;
      case 128: fill_plan<Sm80Shape<128>>(batch, num_heads, max_seqlen_q, plan); return true;
      case 256: fill_plan<Sm80Shape<256>>(batch, num_heads, max_seqlen_q, plan); return true;
      default: return false;
    }
  }
  if (path == kPathSm90) {
    switch (head_dim) {
      case 64: fill_plan<Sm90Shape<64>>(batch, num_heads, max_seqlen_q, plan); return true;
      case 128: fill_plan<Sm90Shape<128>>(batch, num_heads, max_seqlen_q, plan); return true;
      case 256: fill_plan<Sm90Shape<256>>(batch, num_heads, max_seqlen_q, plan); return true;
      default: return false;
    }
  }
  return false;
}

cudaError_t prefill_launch(int path, bool bf16, const PrefillParams& params, cudaStream_t stream) {
  using namespace prefill;
  if (path == kPathSm80) {
    switch (params.head_dim) {
      case 64: return prefill_sm80_hdim64(bf16, params, stream);
      case 128: return prefill_sm80_hdim128(bf16, params, stream);
      case 256: return prefill_sm80_hdim256(bf16, params, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  if (path == kPathSm90) {
    switch (params.head_dim) {
      case 64: return prefill_sm90_hdim64(bf16, params, stream);
      case 128: return prefill_sm90_hdim128(bf16, params, stream);
      case 256: return prefill_sm90_hdim256(bf16, params, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  return cudaErrorInvalidValue;
}

namespace prefill {

// The driver's cuTensorMapEncodeTiled, found once through the runtime (cudaGetDriverEntryPoint-
// ByVersion), so the extension needs no -lcuda at link time.
static PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) ==
            cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  return fn;
}

// A [batches, heads, rows, head_dim] view (any strides, in elements) as a 4-D tensor map with
// dims innermost first (head_dim, rows, heads, batches), boxes of 64 x box_rows, 128-byte swizzle,
// out-of-range elements read as zeros. A dimension of size 1 is never stepped along, so its stride
// only has to be legal (a non-zero multiple of 16 bytes): it is replaced by head_dim elements.
cudaError_t encode_tensor_map(CUtensorMap* map, CUtensorMapDataType dtype, const void* base, int head_dim,
                              int64_t rows, int64_t heads, int64_t batches, int64_t row_stride, int64_t head_stride,
                              int64_t batch_stride, int box_rows) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  constexpr int64_t kElem = 2;  // fp16 / bf16
  const auto legal = [&](int64_t size, int64_t stride) { return size == 1 ? int64_t(head_dim) : stride; };
  const cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(rows), cuuint64_t(heads), cuuint64_t(batches)};
  const cuuint64_t strides[3] = {cuuint64_t(legal(rows, row_stride) * kElem), cuuint64_t(legal(heads, head_stride) * kElem),
                                 cuuint64_t(legal(batches, batch_stride) * kElem)};
  const cuuint32_t box[4] = {64u, cuuint32_t(box_rows), 1u, 1u};
  const cuuint32_t elem_strides[4] = {1u, 1u, 1u, 1u};
  const CUresult r = encode(map, dtype, 4, const_cast<void*>(base), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace prefill
}  // namespace kvk
