// Inline-PTX wrappers for the sm_80 instructions the attention kernels (decode and prefill) build
// on, and the fp32 -> 16-bit packing of their MMA fragments.
//
// CUDA headers only (no torch): every kernel file may include this. Everything here is sm_80 PTX,
// also valid on sm_90a; the sm_90a-only instructions (wgmma, TMA, mbarrier, setmaxnreg) live with
// the one kernel that uses them (kernels/prefill_wgmma.cuh).
//
//   kvk::dynamic_smem()                    the block's dynamic shared memory (the launch's byte count)
//   kvk::smem_u32(p)                       generic pointer into shared memory -> 32-bit shared address
//   kvk::cp_async_16(smem, gmem, valid)    16-byte async global -> shared copy (.cg), zero-fill if !valid
//   kvk::cp_async_commit() / cp_async_wait<N>()
//   kvk::ldmatrix_x4(r, smem)              four 8x8 b16 matrices (also _x1, _x2, _trans), smem: address or pointer
//   kvk::mma_m16n8k16<T>(d, a, b0, b1)     d (16x8 fp32) += a (16x16) * b (16x8), T = __half / bf16
//   kvk::exp2_approx(x), kvk::rcp_approx(x) the MUFU approximations (ex2, rcp)
//   kvk::pack2<T>(lo, hi)                  two fp32 -> one register of two T (round to nearest even)
//
// Shared-memory operands come either as a 32-bit shared address (kernels that keep a base address
// and add byte offsets: one register per operand, no 64-bit pointer math) or as a generic pointer
// (converted with smem_u32); both overloads emit the same instruction.
//
// Built with KVK_EMULATE (the CPU emulator, csrc/emu/), the instructions come from emu/ptx.h
// instead: the same names and signatures with the PTX ISA's semantics in host C++, so the kernels
// compile unchanged for both.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(KVK_EMULATE)
#include "emu/ptx.h"
#else
namespace kvk {

// One name for the dynamic shared memory of every kernel (its size is the launch's third argument).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char kvk_dynamic_smem[];
  return kvk_dynamic_smem;
}

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ------------------------------------------------------------------------------ cp.async

// 16-byte global -> shared copy that bypasses L1 (.cg: K/V bytes are read once per block).
// valid == false reads nothing (src-size 0) and writes 16 zero bytes: rows past the end of a
// sequence or split, or behind an invalid page index, become zeros, never whatever the address
// would have held.
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ------------------------------------------------------------------------------ ldmatrix

// One and two 8x8 b16 matrices (lanes 0-7, 0-15 supply the row addresses).
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem));
}

__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem));
}

// Four 8x8 b16 matrices; lane l supplies the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

// The same, each matrix transposed (the B operand of P V from a row-major V tile).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

// ------------------------------------------------------------------------------ mma.sync

// d (16x8 fp32) += a (16x16, row-major) * b (16x8, column-major), fp16 or bf16 operands.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------ MUFU

// 2^x, hardware approximation (relative error ~2^-22, far below the fp16/bf16 rounding of P);
// 2^-inf = +0, which is how masked scores become probability 0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x, hardware approximation (at most 1 ulp off); 1 / inf = 0.
__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace kvk
#endif  // KVK_EMULATE

namespace kvk {

// ------------------------------------------------------------------------------ shared-pointer forms

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  cp_async_16(smem_u32(smem), gmem, valid);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ldmatrix_x4(r, smem_u32(smem)); }

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ldmatrix_x4_trans(r, smem_u32(smem));
}

// ------------------------------------------------------------------------------ fragments

// Two fp32 -> two 16-bit values of T in one register (round to nearest even), lo in bits 0..15:
// the layout of an mma.sync A operand register, so P goes from the S accumulator to P V directly.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

}  // namespace kvk
