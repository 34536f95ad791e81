// Building blocks of the decode kernels: the fp8 (e4m3, e5m2) -> fp16/bf16 widening of a 16-byte
// cache vector, plus (through common/ptx.cuh) the PTX wrappers they share with prefill (cp.async,
// ldmatrix, mma.sync m16n8k16, ex2). CUDA headers only.
//
// The fp8 widening is __host__ __device__ (below sm_89 it is integer code plus one fp16 multiply),
// so tests/test_decode_cuda.py compiles it for the host and checks it against torch for all 256
// codes of each format (the host takes the same arithmetic as sm_80, with shifts for the byte
// permutes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/ptx.cuh"
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

// Four float8_e5m2 codes -> two half2 registers, laid out as e4m3x4_to_half2x2's. Exact and a pure
// byte move: an e5m2 code is the upper byte of the fp16 of the same value (same sign, the same 5
// exponent bits and bias 15, its 2 mantissa bits the top of fp16's 10), subnormals, infinities and
// NaN included. Two byte permutes on every architecture (cvt.rn.f16x2.e5m2x2 would be no cheaper).
KVK_DECODE_HD void e5m2x4_to_half2x2(uint32_t w, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__)
  lo = __byte_perm(w, 0u, 0x1404u);  // bytes [0, c0, 0, c1]
  hi = __byte_perm(w, 0u, 0x3424u);  // bytes [0, c2, 0, c3]
#else
  lo = ((w & 0x000000FFu) << 8) | ((w & 0x0000FF00u) << 16);
  hi = ((w & 0x00FF0000u) >> 8) | (w & 0xFF000000u);
#endif
}

// Sixteen fp8 codes (one 16-byte cache vector, e4m3 or, with kE5m2, e5m2) -> sixteen values of T
// (two 16-byte vectors).
template <typename T, bool kE5m2>
__device__ __forceinline__ void widen_fp8x16(const uint4& in, uint4& lo, uint4& hi);

template <>
__device__ __forceinline__ void widen_fp8x16<__half, false>(const uint4& in, uint4& lo, uint4& hi) {
  e4m3x4_to_half2x2(in.x, lo.x, lo.y);
  e4m3x4_to_half2x2(in.y, lo.z, lo.w);
  e4m3x4_to_half2x2(in.z, hi.x, hi.y);
  e4m3x4_to_half2x2(in.w, hi.z, hi.w);
}

template <>
__device__ __forceinline__ void widen_fp8x16<__half, true>(const uint4& in, uint4& lo, uint4& hi) {
  e5m2x4_to_half2x2(in.x, lo.x, lo.y);
  e5m2x4_to_half2x2(in.y, lo.z, lo.w);
  e5m2x4_to_half2x2(in.z, hi.x, hi.y);
  e5m2x4_to_half2x2(in.w, hi.z, hi.w);
}

// bf16: through fp16 and fp32, both exact for fp8 values (bf16 keeps 8 exponent and 7 mantissa bits:
// e4m3 has 3 mantissa bits, e5m2 2, and e5m2's smallest subnormal 2^-16 is a normal bf16).
template <bool kE5m2>
__device__ __forceinline__ void widen_fp8x16_bf16(const uint4& in, uint4& lo, uint4& hi) {
  widen_fp8x16<__half, kE5m2>(in, lo, hi);
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

template <>
__device__ __forceinline__ void widen_fp8x16<__nv_bfloat16, false>(const uint4& in, uint4& lo, uint4& hi) {
  widen_fp8x16_bf16<false>(in, lo, hi);
}

template <>
__device__ __forceinline__ void widen_fp8x16<__nv_bfloat16, true>(const uint4& in, uint4& lo, uint4& hi) {
  widen_fp8x16_bf16<true>(in, lo, hi);
}

}  // namespace decode
}  // namespace kvk
