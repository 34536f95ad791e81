// Instantiations and host launcher of the append kernels: 4 source kinds x 6 addressing modes
// (contiguous and paged, each dense or ragged; int32 slots, int64 slots) = 24 small kernels, and
// their rotary twins over the 6 typed sources (fp16, bf16, fp32 caches; fp8 from each) = 36 more.
// The fp8 kernels (cache type uint8_t) write e4m3 and e5m2 alike, as p.fp8_e5m2 says.
// The rotary layout (NeoX / GPT-J) and the table dtype are runtime flags: a uniform branch costs
// less than doubling the instantiations again.
#include "common/launch.cuh"
#include "kernels/append.cuh"
#include "launch/append.h"

namespace kvk {
namespace {

template <typename Src, typename Cache, AppendMode kMode, typename SlotT, bool kRotary>
cudaError_t launch_kernel(const AppendParams& p, bool ragged, dim3 grid, cudaStream_t stream) {
  if (ragged) {
    KVK_LAUNCH(grid, kAppendThreads, 0, stream, kvk_append_kernel<Src, Cache, kMode, SlotT, true, kRotary>)(p);
  } else {
    KVK_LAUNCH(grid, kAppendThreads, 0, stream, kvk_append_kernel<Src, Cache, kMode, SlotT, false, kRotary>)(p);
  }
  return cudaGetLastError();
}

template <typename Src, typename Cache, bool kRotary = false>
cudaError_t launch_for_source(const AppendParams& p, AppendMode mode, bool slot_int64, dim3 grid,
                              cudaStream_t stream) {
  const bool ragged = p.cu_seqlens != nullptr;
  switch (mode) {
    case AppendMode::kContiguous:
      return launch_kernel<Src, Cache, AppendMode::kContiguous, int32_t, kRotary>(p, ragged, grid, stream);
    case AppendMode::kPaged:
      return launch_kernel<Src, Cache, AppendMode::kPaged, int32_t, kRotary>(p, ragged, grid, stream);
    case AppendMode::kSlots:
      if (ragged) return cudaErrorInvalidValue;  // slots address tokens directly
      if (slot_int64) {
        KVK_LAUNCH(grid, kAppendThreads, 0, stream,
                   kvk_append_kernel<Src, Cache, AppendMode::kSlots, int64_t, false, kRotary>)(p);
      } else {
        KVK_LAUNCH(grid, kAppendThreads, 0, stream,
                   kvk_append_kernel<Src, Cache, AppendMode::kSlots, int32_t, false, kRotary>)(p);
      }
      return cudaGetLastError();
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_append(AppendParams p, AppendSource source, AppendMode mode, bool slot_int64,
                          cudaStream_t stream) {
  uint32_t grid_x, grid_y;
  if (!append_launch_shape(p, grid_x, grid_y)) return cudaErrorInvalidValue;
  if (grid_x == 0) return cudaSuccess;  // nothing to write: no launch
  const dim3 grid(grid_x, grid_y);
  if (p.rotary_cos != nullptr) {
    if (p.rotary_sin == nullptr || p.rotary_half < 1) return cudaErrorInvalidValue;
    switch (source) {
      case AppendSource::kHalf:
        return launch_for_source<__half, __half, true>(p, mode, slot_int64, grid, stream);
      case AppendSource::kBf16:
        return launch_for_source<__nv_bfloat16, __nv_bfloat16, true>(p, mode, slot_int64, grid, stream);
      case AppendSource::kFloat:
        return launch_for_source<float, float, true>(p, mode, slot_int64, grid, stream);
      case AppendSource::kHalfToFp8:
        return launch_for_source<__half, uint8_t, true>(p, mode, slot_int64, grid, stream);
      case AppendSource::kBf16ToFp8:
        return launch_for_source<__nv_bfloat16, uint8_t, true>(p, mode, slot_int64, grid, stream);
      case AppendSource::kFloatToFp8:
        return launch_for_source<float, uint8_t, true>(p, mode, slot_int64, grid, stream);
      default:
        return cudaErrorInvalidValue;  // a byte copy has no type to rotate in
    }
  }
  switch (source) {
    case AppendSource::kCopy:
      return launch_for_source<uint8_t, uint8_t>(p, mode, slot_int64, grid, stream);
    case AppendSource::kHalfToFp8:
      return launch_for_source<__half, uint8_t>(p, mode, slot_int64, grid, stream);
    case AppendSource::kBf16ToFp8:
      return launch_for_source<__nv_bfloat16, uint8_t>(p, mode, slot_int64, grid, stream);
    case AppendSource::kFloatToFp8:
      return launch_for_source<float, uint8_t>(p, mode, slot_int64, grid, stream);
    default:
      break;  // the typed sources are for the rotary kernels only
  }
  return cudaErrorInvalidValue;
}

}  // namespace kvk
