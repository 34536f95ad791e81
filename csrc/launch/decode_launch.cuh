// Launch templates of the decode kernels, included by one .cu file per head dim and op
// (decode_hd64/128/256.cu: kCacheAttn = false; cache_attention_hd64/128/256.cu: true) so the six
// compile in parallel. Each file instantiates 8 kernels (q fp16/bf16 x cache same/fp8 x
// contiguous/paged) and 2 merges (the merge is shared: the same template in both ops' files). The fp8
// kernels (CacheT = uint8_t, raw fp8 bytes) read e4m3 and e5m2 alike: p.fp8_e5m2 picks the widening.
#pragma once

#include <atomic>
#include <cstdint>

#include "common/launch.cuh"
#include "kernels/decode.cuh"
#include "launch/decode.h"

namespace kvk {
namespace decode {

// Dynamic shared memory above 48 KB must be opted into per kernel and device; done once per device
// (a bit per device index, devices past 63 ask every time).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes, std::atomic<uint64_t>& done) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

template <typename T, typename CacheT, int D, bool kPaged, bool kCacheAttn>
cudaError_t launch_typed(const DecodeParams& p, cudaStream_t stream) {
  using Tr = Traits<T, CacheT, D>;
  static std::atomic<uint64_t> smem_done{0};
  auto kernel = kvk_decode_kernel<T, CacheT, D, kPaged, kCacheAttn>;
  cudaError_t err = allow_smem(kernel, Tr::kSmemBytes, smem_done);
  if (err != cudaSuccess) return err;
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.num_kv_heads * p.num_splits * p.head_chunks;
  KVK_LAUNCH(static_cast<unsigned>(blocks), kThreads, Tr::kSmemBytes, stream, kernel)(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_heads;
  KVK_LAUNCH(static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream, kvk_decode_merge_kernel<T, D>)(p);
  return cudaGetLastError();
}

template <typename T, int D, bool kCacheAttn>
cudaError_t launch_cache(const DecodeParams& params, DecodeDType cache_dtype, bool paged, cudaStream_t stream) {
  DecodeParams p = params;
  p.fp8_e5m2 = cache_dtype == DecodeDType::kFloat8E5M2 ? 1 : 0;
  if (decode_dtype_is_fp8(cache_dtype)) {
    return paged ? launch_typed<T, uint8_t, D, true, kCacheAttn>(p, stream)
                 : launch_typed<T, uint8_t, D, false, kCacheAttn>(p, stream);
  }
  return paged ? launch_typed<T, T, D, true, kCacheAttn>(p, stream)
               : launch_typed<T, T, D, false, kCacheAttn>(p, stream);
}

template <int D, bool kCacheAttn>
cudaError_t launch_head_dim(const DecodeParams& p, DecodeDType q_dtype, DecodeDType cache_dtype, bool paged,
                            cudaStream_t stream) {
  if (cache_dtype != q_dtype && !decode_dtype_is_fp8(cache_dtype)) return cudaErrorInvalidValue;
  switch (q_dtype) {
    case DecodeDType::kHalf: return launch_cache<__half, D, kCacheAttn>(p, cache_dtype, paged, stream);
    case DecodeDType::kBFloat16: return launch_cache<__nv_bfloat16, D, kCacheAttn>(p, cache_dtype, paged, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace decode
}  // namespace kvk
