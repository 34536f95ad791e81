// The device environment of the CUDA emulator: what a kernel file sees of CUDA when it is compiled
// as host C++ (KVK_EMULATE, forced in front of every emulated translation unit by the build).
//
// The CUDA toolkit's own headers give the types (__half, __nv_bfloat16, __nv_fp8_e4m3, uint4,
// dim3, cudaError_t) and their host conversions, which round exactly like the device's. This file
// adds what only the device has: threadIdx / blockIdx / blockDim / gridDim of the running fiber,
// the barriers, shuffles and votes (runtime.h), the device-only intrinsics the kernels use, and
// KVK_LAUNCH (common/launch.cuh) as a run of the grid. The PTX wrappers have their emulated
// definitions in emu/ptx.h.
#pragma once

#ifndef KVK_EMULATE
#error "emu/device.h is the host build of the kernels; compile with -DKVK_EMULATE"
#endif

#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "emu/racecheck.h"
#include "emu/runtime.h"

// Qualifiers without meaning on the host (the toolkit defines __device__, __host__, __global__,
// __shared__ and __forceinline__ already).
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif

namespace kvk {
namespace emu {

inline const uint3& thread_idx() { return current().idx; }
inline const uint3& block_idx() { return current_block().idx; }
inline const dim3& block_dim() { return current_launch().block; }
inline const dim3& grid_dim() { return current_launch().grid; }

// ---------------------------------------------------------------------------- warp collectives

template <typename T>
inline uint32_t to_word(T v) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

template <typename T>
inline T from_word(uint32_t u) {
  T v;
  memcpy(&v, &u, 4);
  return v;
}

// in: value, source-lane argument, mode; lanes outside the mask or the width read their own value.
enum ShuffleMode : uint32_t { kShflIdx, kShflXor, kShflDown, kShflUp };

inline void shuffle_fn(Warp& w, Block&) {
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(w.mask >> l & 1u)) continue;
    const uint32_t arg = w.in[l][1], mode = w.in[l][2], width = w.in[l][3];
    const int seg = l & ~static_cast<int>(width - 1);  // first lane of l's width-segment
    int src;
    switch (mode) {
      case kShflIdx: src = seg + static_cast<int>(arg % width); break;
      case kShflXor: src = l ^ static_cast<int>(arg); break;
      case kShflDown: src = l + static_cast<int>(arg); break;
      default: src = l - static_cast<int>(arg); break;
    }
    const bool in_segment = src >= seg && src < seg + static_cast<int>(width);
    // A source outside the segment, or a lane not taking part, gives the lane's own value
    // (the PTX ISA leaves an inactive source undefined; own value is what a test can see).
    if (!in_segment || !(w.mask >> src & 1u)) src = l;
    w.out[l][0] = w.in[src][0];
  }
}

template <typename T>
inline T shuffle(const char* name, uint32_t mask, T value, uint32_t arg, ShuffleMode mode, int width) {
  if (width <= 0 || width > kWarpSize || (width & (width - 1))) fail("%s: width %d is not a power of two <= 32", name, width);
  const uint32_t in[4] = {to_word(value), arg, mode, static_cast<uint32_t>(width)};
  return from_word<T>(warp_collective(name, shuffle_fn, mask, in, 4)[0]);
}

inline void ballot_fn(Warp& w, Block&) {
  uint32_t ballot = 0;
  for (int l = 0; l < kWarpSize; ++l) {
    if ((w.mask >> l & 1u) && w.in[l][0]) ballot |= 1u << l;
  }
  for (int l = 0; l < kWarpSize; ++l) w.out[l][0] = ballot;
}

inline uint32_t ballot(const char* name, uint32_t mask, bool pred) {
  const uint32_t in[1] = {pred ? 1u : 0u};
  return warp_collective(name, ballot_fn, mask, in, 1)[0];
}

// A full-mask __syncwarp orders the warp's shared-memory accesses (for the race checker); one with a
// partial mask is taken as ordering nothing, the strict reading.
inline void syncwarp_fn(Warp& w, Block& b) {
  if (w.mask == 0xFFFFFFFFu) race::warp_barrier(static_cast<int>(&w - b.warps.data()));
}

}  // namespace emu
}  // namespace kvk

// ------------------------------------------------------------------------ the built-in variables

#define threadIdx (::kvk::emu::thread_idx())
#define blockIdx (::kvk::emu::block_idx())
#define blockDim (::kvk::emu::block_dim())
#define gridDim (::kvk::emu::grid_dim())
#ifndef warpSize
#define warpSize 32
#endif

// ----------------------------------------------------------------------- barriers, shuffles, votes

inline void __syncthreads() { ::kvk::emu::sync_block("__syncthreads"); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  ::kvk::emu::warp_collective("__syncwarp", ::kvk::emu::syncwarp_fn, mask, nullptr, 0);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int lane, int width = 32) {
  return ::kvk::emu::shuffle("__shfl_sync", mask, v, static_cast<uint32_t>(lane), ::kvk::emu::kShflIdx, width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::kvk::emu::shuffle("__shfl_xor_sync", mask, v, static_cast<uint32_t>(lane_mask), ::kvk::emu::kShflXor,
                             width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::kvk::emu::shuffle("__shfl_down_sync", mask, v, delta, ::kvk::emu::kShflDown, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::kvk::emu::shuffle("__shfl_up_sync", mask, v, delta, ::kvk::emu::kShflUp, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::kvk::emu::ballot("__ballot_sync", mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return ::kvk::emu::ballot("__any_sync", mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  return ::kvk::emu::ballot("__all_sync", mask, pred != 0) == mask;
}

// ---------------------------------------------------------------------------- device intrinsics

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline float __int_as_float(int x) { return ::kvk::emu::from_word<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(::kvk::emu::to_word(x)); }
inline float __uint_as_float(unsigned x) { return ::kvk::emu::from_word<float>(x); }
inline unsigned __float_as_uint(float x) { return ::kvk::emu::to_word(x); }

// Device min/max: any mix of integer widths, like CUDA's overload set.
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) > static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}

namespace kvk {
float rcp_approx(float x);   // emu/ptx.h
float log2_approx(float x);  // emu/ptx.h
}

// __log2f: lg2.approx.ftz.f32.
inline float __log2f(float x) { return ::kvk::log2_approx(x); }

// __fdividef(x, y): x * rcp.approx(y) on the device, 2 ulp, and 0 for 2^126 < |y| < 2^128.
inline float __fdividef(float x, float y) {
  const float ay = std::fabs(y);
  if (ay > 8.507059e37f && std::isfinite(ay)) return 0.0f * x;
  return x * ::kvk::rcp_approx(y);
}

// ------------------------------------------------------------------------------------- launches

// The C++ form of cudaFuncSetAttribute (cuda_runtime.h declares it for nvcc only).
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

namespace kvk {
namespace emu {

void set_last_error(cudaError_t err, const char* message);
std::string kernel_name(const void* kernel, const char* expr);

template <typename... Params>
struct KernelLaunch {
  void (*kernel)(Params...);
  const char* expr;
  dim3 grid, block;
  size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    const void* k = reinterpret_cast<const void*>(kernel);
    const std::string name = kernel_name(k, expr);
    if (smem > static_cast<size_t>(max_dynamic_smem(k)) || smem > static_cast<size_t>(emulated_smem_optin())) {
      set_last_error(cudaErrorInvalidValue, "dynamic shared memory above the kernel's limit");
      return;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
      set_last_error(cudaErrorInvalidConfiguration, "invalid grid");
      return;
    }
    // The launch copies the arguments once (the kernel parameter space); each thread's call copies
    // them into its own frame, as a by-value parameter is per thread.
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    run_grid(name.c_str(), grid, block, smem, [&] { std::apply(kernel, params); });
  }
};

template <typename... Params>
KernelLaunch<Params...> make_launch(const char* expr, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem) {
  return KernelLaunch<Params...>{kernel, expr, grid, block, smem};
}

}  // namespace emu
}  // namespace kvk
