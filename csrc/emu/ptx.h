// The emulated definitions of the PTX wrappers of common/ptx.cuh (same names, same signatures),
// with the semantics the PTX ISA gives them on sm_80:
//
//   cp.async       the 16 destination bytes hold poison (0xFF: NaN in every element type) from the
//                  issue until the cp.async.wait_group that covers the copy's group; src-size 0
//                  lands zeros. So a missing or too-weak wait reads NaN, not yesterday's data.
//   ldmatrix       x1 / x2 / x4, optionally .trans: lanes 8j..8j+7 give the row addresses of
//                  matrix j; lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of each
//                  matrix (of its transpose with .trans), in register j.
//   mma.sync       m16n8k16 .row.col, fp16 / bf16 inputs, fp32 accumulators, the PTX ISA fragment
//                  layouts (see mma_fn in ptx.cpp).
//   ex2 / rcp / lg2  .approx.ftz: exact result perturbed by the documented error bound (2^-22
//                  relative for ex2, 1 ulp for rcp, 2^-22 absolute for lg2), so a kernel that
//                  needs exact math fails;
//                  subnormal inputs and outputs flush to zero.
//
// Shared-memory addresses are 32-bit offsets into the block's dynamic shared memory, checked
// against the launch's size and the instruction's alignment.
#pragma once

#include <cstdint>

#include "emu/device.h"

namespace kvk {

inline unsigned char* dynamic_smem() { return emu::current_block().smem; }

inline uint32_t smem_u32(const void* ptr) { return emu::shared_addr(ptr, "cvta.to.shared"); }

// ------------------------------------------------------------------------------ cp.async

void cp_async_16(uint32_t smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait_group(int n);
template <int N>
inline void cp_async_wait() {
  cp_async_wait_group(N);
}

// ------------------------------------------------------------------------------ ldmatrix

// num matrices (1, 2 or 4), transposed or not; r[0..num) receive them.
void ldmatrix(uint32_t* r, int num, bool trans, uint32_t smem);

inline void ldmatrix_x1(uint32_t (&r)[1], uint32_t smem) { ldmatrix(r, 1, false, smem); }
inline void ldmatrix_x2(uint32_t (&r)[2], uint32_t smem) { ldmatrix(r, 2, false, smem); }
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem) { ldmatrix(r, 4, false, smem); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], uint32_t smem) { ldmatrix(r, 1, true, smem); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t smem) { ldmatrix(r, 2, true, smem); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem) { ldmatrix(r, 4, true, smem); }

// ------------------------------------------------------------------------------ mma.sync

void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
inline void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_m16n8k16_f16(d, a, b0, b1);
}
template <>
inline void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_m16n8k16_bf16(d, a, b0, b1);
}

// ------------------------------------------------------------------------------ MUFU

float exp2_approx(float x);
float rcp_approx(float x);
float log2_approx(float x);  // lg2.approx.ftz.f32, behind __log2f

}  // namespace kvk
