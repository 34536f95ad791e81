// The emulated definitions of the sm_90a wrappers of kernels/prefill_wgmma.cuh (same names, same
// signatures), over the emulator's mbarriers and named barriers (emu/sm90.h), TMA (emu/tma.h) and
// wgmma (emu/wgmma.h). Included by prefill_wgmma.cuh under KVK_EMULATE only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "emu/ptx.h"
#include "emu/sm90.h"
#include "emu/tma.h"
#include "emu/wgmma.h"

namespace kvk {
namespace prefill {
namespace sm90 {

inline void wgmma_fence() { ::kvk::wgmma_fence(); }
inline void wgmma_commit() { ::kvk::wgmma_commit_group(); }
template <int N>
inline void wgmma_wait() {
  ::kvk::wgmma_wait_group(N);
}

// The emulator writes the accumulators from wgmma_wait itself: nothing to pin.
template <int N>
inline void fence_regs(float (&)[N]) {}

inline void mbar_init(uint64_t* bar, uint32_t count) { mbarrier_init(smem_u32(bar), count); }
inline void mbar_fence_init() { fence_mbarrier_init(); }
inline void mbar_arrive(uint64_t* bar) { mbarrier_arrive(smem_u32(bar)); }
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) { mbarrier_arrive_expect_tx(smem_u32(bar), bytes); }
inline void mbar_wait(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait_parity(smem_u32(bar), parity)) {
  }
}

inline void tma_load_4d(void* smem, const void* tensor_map, uint64_t* bar, int c0, int c1, int c2, int c3) {
  const int coords[4] = {c0, c1, c2, c3};
  tma_load(smem_u32(smem), tensor_map, smem_u32(bar), coords, 4);
}

inline void named_barrier_sync(int id, int count) { ::kvk::named_barrier_sync(id, count); }
inline void fence_proxy_async() { ::kvk::fence_proxy_async(); }

template <int N>
inline void setmaxnreg_inc() {
  setmaxnreg(true, N);
}
template <int N>
inline void setmaxnreg_dec() {
  setmaxnreg(false, N);
}

// Wgmma<T, N>::ss / ::rs as in the device header: D [64 x N] (+)= A [64 x 16] B [16 x N], ss with
// both operands K-major in shared memory, rs with A from registers and B N-major (imm-trans-b 1).
template <typename T, int N>
struct Wgmma {
  static constexpr int kRegs = N / 2;
  static constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  static void ss(float (&d)[kRegs], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    wgmma_mma_async_ss(d, N, kBf16, desc_a, desc_b, accumulate != 0, 1, 1, false, false);
  }
  static void rs(float (&d)[kRegs], const uint32_t (&a)[4], uint64_t desc_b) {
    wgmma_mma_async_rs(d, N, kBf16, a, desc_b, true, 1, 1, true);
  }
};

}  // namespace sm90
}  // namespace prefill
}  // namespace kvk
