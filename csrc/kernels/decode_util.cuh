// Building blocks of the decode kernels: PTX wrappers for the sm_80 instructions they use
// (cp.async, ldmatrix, mma.sync m16n8k16, ex2) and the fp8 e4m3 -> fp16/bf16 widening of a
// 16-byte cache vector. CUDA headers only.
//
// The fp8 widening is __host__ __device__ (below sm_89 it is integer code plus one fp16 multiply),
// so tests/test_decode_cuda.py compiles it for the host and checks it against torch for all 256
// codes (the host takes the same arithmetic as sm_80, with shifts for the byte permutes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/decode_params.h"  // KVK_DECODE_HD

namespace kvk {
namespace decode {

// ------------------------------------------------------------------------------ fp8 widening

// Four float8_e4m3fn codes (code i in byte i of w) -> two half2 registers: codes 0, 1 in `lo`, codes
// 2, 3 in `hi` (lower code in bits 0..15). Exact: every e4m3 value (|x| <= 448, subnormals down to
// 2^-9) is an fp16 value; NaN (S.1111.111) stays NaN. sm_89+ converts a pair in one instruction.
// Below, each code is moved to the high byte of its 16-bit lane, its exponent and mantissa bits
// shifted into fp16 place, which reads the value 2^8 times too small (fp16's exponent bias is 15,
// e4m3's 7; subnormals line up the same way), and one fp16 multiply by 2^8 puts it right. Branch-free,
// and __host__ so the test suite runs this very code against torch for all 256 codes.
KVK_DECODE_HD uint32_t e4m3_pair_to_half2_prescaled(uint32_t t) {
  // t: two codes in the high bytes of the 16-bit lanes (code << 8).
  const uint32_t sign = t & 0x80008000u;
  const uint32_t mag = (t >> 1) & 0x3F803F80u;  // |code| << 7: exponent and mantissa bits in fp16 place
  __half2_raw raw;
  raw.x = static_cast<unsigned short>((sign | mag) & 0xFFFFu);
  raw.y = static_cast<unsigned short>((sign | mag) >> 16);
  const __half2 scaled = __hmul2(__half2(raw), __half2(__half2_raw{0x5C00u, 0x5C00u}));  // * 256, exact
  const __half2_raw r = static_cast<__half2_raw>(scaled);
  // |code| == 0x7F is NaN in e4m3fn and came out as +-480 (0x5F80): setting the fp16 exponent bits
  // makes it NaN. mag + 0x80 reaches bit 14 exactly for mag == 0x3F80, lane by lane.
  const uint32_t nan_lanes = ((mag + 0x00800080u) & 0x40004000u) >> 14;  // 1 in bit 0 / bit 16
  return (static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16)) | (nan_lanes * 0x7E00u);
}

KVK_DECODE_HD void e4m3x4_to_half2x2(uint32_t w, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n .reg .b16 c01, c23;\n mov.b32 {c01, c23}, %2;\n cvt.rn.f16x2.e4m3x2 %0, c01;\n"
      " cvt.rn.f16x2.e4m3x2 %1, c23;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
#elif defined(__CUDA_ARCH__)
  lo = e4m3_pair_to_half2_prescaled(__byte_perm(w, 0u, 0x1404u));  // bytes [0, c0, 0, c1]
  hi = e4m3_pair_to_half2_prescaled(__byte_perm(w, 0u, 0x3424u));  // bytes [0, c2, 0, c3]
#else
  lo = e4m3_pair_to_half2_prescaled(((w & 0x000000FFu) << 8) | ((w & 0x0000FF00u) << 16));
  hi = e4m3_pair_to_half2_prescaled(((w & 0x00FF0000u) >> 8) | (w & 0xFF000000u));
#endif
}

// Sixteen e4m3 codes (one 16-byte cache vector) -> sixteen values of T (two 16-byte vectors).
template <typename T>
__device__ __forceinline__ void widen_e4m3x16(const uint4& in, uint4& lo, uint4& hi);

template <>
__device__ __forceinline__ void widen_e4m3x16<__half>(const uint4& in, uint4& lo, uint4& hi) {
  e4m3x4_to_half2x2(in.x, lo.x, lo.y);
  e4m3x4_to_half2x2(in.y, lo.z, lo.w);
  e4m3x4_to_half2x2(in.z, hi.x, hi.y);
  e4m3x4_to_half2x2(in.w, hi.z, hi.w);
}

// bf16: through fp16 and fp32, both exact for e4m3 values (bf16 keeps 7 mantissa bits, e4m3 has 3).
template <>
__device__ __forceinline__ void widen_e4m3x16<__nv_bfloat16>(const uint4& in, uint4& lo, uint4& hi) {
  widen_e4m3x16<__half>(in, lo, hi);
  const uint32_t src[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  uint32_t dst[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&src[i]));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    dst[i] = *reinterpret_cast<const uint32_t*>(&b);
  }
  lo = make_uint4(dst[0], dst[1], dst[2], dst[3]);
  hi = make_uint4(dst[4], dst[5], dst[6], dst[7]);
}

// ------------------------------------------------------------------------------ PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy, bypassing L1 (K/V bytes are read once). valid == false reads
// nothing (src-size 0) and writes 16 zero bytes: rows past the end of a split, or behind an invalid
// page index, become zeros, never whatever the address would have held.
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Until at most N of this thread's committed groups are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

// d (16x8 fp32) += a (16x16 row-major) * b (16x8 column-major), fp16 or bf16 operands.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x, hardware approximation (relative error ~2^-22, far below the fp16/bf16 rounding of P);
// 2^-inf = +0, which is how masked scores become probability 0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two fp32 -> two 16-bit values of T in one register (round to nearest even), lo in bits 0..15.
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

}  // namespace decode
}  // namespace kvk
