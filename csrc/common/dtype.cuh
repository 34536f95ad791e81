// Element types of the kernels and their conversions to and from fp32.
//
// CUDA headers only (no torch): every kernel file may include this.
//
//   kvk::DType<T>::to_float(x)     exact widening of half / bf16 / fp8 e4m3 / float
//   kvk::DType<T>::from_float(f)   narrowing, round to nearest even; for fp8 e4m3 it saturates
//                                  to +-448 exactly like the reference's
//                                  `x.clamp(-448, 448).to(torch.float8_e4m3fn)`
//   kvk::DType<T>::kBytes          sizeof(T); kVecElems = elements in one 16-byte vector
//
// T is one of float, __half, __nv_bfloat16, __nv_fp8_e4m3 (the fp8 cache format,
// torch.float8_e4m3fn: 4 exponent bits, 3 mantissa bits, no infinity, NaN = S.1111.111).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>
#include <cstring>

namespace kvk {

// Largest finite float8_e4m3fn.
constexpr float kFp8E4m3Max = 448.0f;

// The bits of a float (host and device).
__host__ __device__ __forceinline__ uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

__host__ __device__ __forceinline__ float float_from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// fp32 -> float8_e4m3fn bits, as torch computes `x.clamp(-448, 448).to(torch.float8_e4m3fn)`:
// finite values and +-inf saturate to +-448, everything rounds to nearest even (subnormals
// included), NaN becomes 0x7F with the input's sign bit. Integer arithmetic plus one fp32 add
// (torch's own algorithm); cheap on every architecture and the host, where it is checked against
// torch's conversion for all 2^32 inputs.
__host__ __device__ __forceinline__ uint8_t e4m3_from_float_portable(float x) {
  const uint32_t bits = float_bits(x);
  const uint32_t sign = bits & 0x80000000u;
  uint32_t a = bits ^ sign;  // |x|
  uint32_t r;
  if (a > 0x7F800000u) {
    r = 0x7Fu;  // NaN
  } else {
    a = a < 0x43E00000u ? a : 0x43E00000u;  // clamp |x| to 448 (inf included): ordered like the value
    if (a < (121u << 23)) {
      // |x| < 2^-6, a subnormal of e4m3: adding 2^14 rounds it to a multiple of 2^-9 (the subnormal
      // step) to nearest even, in the low mantissa bits of the sum.
#ifdef __CUDA_ARCH__
      const float sum = __fadd_rn(float_from_bits(a), 16384.0f);
#else
      const float sum = float_from_bits(a) + 16384.0f;
#endif
      r = float_bits(sum) - (141u << 23);
    } else {
      // Normal: rebias the exponent (127 -> 7) and round the 23-bit mantissa to 3 bits, ties to even.
      const uint32_t mant_odd = (a >> 20) & 1u;
      a += (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu + mant_odd;
      r = a >> 20;
    }
  }
  return static_cast<uint8_t>(r | (sign >> 24));
}

// The same conversion, two values at a time: lo in bits 0..7, hi in bits 8..15. sm_89+ converts a
// pair in one instruction (cvt.rn.satfinite.e4m3x2.f32) after the same clamp; that instruction
// returns a canonical positive NaN where torch keeps the sign, so NaN is patched.
__host__ __device__ __forceinline__ uint16_t float2_to_e4m3x2_sat(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const float clo = fminf(fmaxf(lo, -kFp8E4m3Max), kFp8E4m3Max);  // fmaxf(NaN, c) = c: patched below
  const float chi = fminf(fmaxf(hi, -kFp8E4m3Max), kFp8E4m3Max);
  uint16_t bits = __nv_cvt_float2_to_fp8x2(make_float2(clo, chi), __NV_SATFINITE, __NV_E4M3);
  // x != x: NaN (valid without fast-math, which this project never uses).
  if (lo != lo) bits = (bits & 0xFF00u) | 0x7Fu | ((float_bits(lo) >> 24) & 0x80u);
  if (hi != hi) bits = (bits & 0x00FFu) | 0x7F00u | ((float_bits(hi) >> 16) & 0x8000u);
  return bits;
#else
  return static_cast<uint16_t>(e4m3_from_float_portable(lo) | (e4m3_from_float_portable(hi) << 8));
#endif
}

__host__ __device__ __forceinline__ uint8_t float_to_e4m3_sat(float x) {
  return static_cast<uint8_t>(float2_to_e4m3x2_sat(x, 0.0f) & 0xFFu);
}

template <typename T>
struct DType;

template <>
struct DType<float> {
  static constexpr int kBytes = 4;
  __host__ __device__ __forceinline__ static float to_float(float x) { return x; }
  __host__ __device__ __forceinline__ static float from_float(float x) { return x; }
};

template <>
struct DType<__half> {
  static constexpr int kBytes = 2;
  __host__ __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __host__ __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct DType<__nv_bfloat16> {
  static constexpr int kBytes = 2;
  __host__ __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __host__ __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct DType<__nv_fp8_e4m3> {
  static constexpr int kBytes = 1;
  __host__ __device__ __forceinline__ static float to_float(__nv_fp8_e4m3 x) { return static_cast<float>(x); }
  __host__ __device__ __forceinline__ static __nv_fp8_e4m3 from_float(float x) {
    __nv_fp8_e4m3 r;
    r.__x = float_to_e4m3_sat(x);
    return r;
  }
};

// Elements of T in one 16-byte (128-bit) vector.
template <typename T>
constexpr int kVecElems = 16 / DType<T>::kBytes;

static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2 && sizeof(__nv_fp8_e4m3) == 1,
              "element sizes assumed by DType");

}  // namespace kvk
