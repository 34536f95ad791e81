// Element types of the kernels and their conversions to and from fp32.
//
// CUDA headers only (no torch): every kernel file may include this.
//
//   kvk::DType<T>::to_float(x)     exact widening of half / bf16 / fp8 e4m3 / fp8 e5m2 / float
//   kvk::DType<T>::from_float(f)   narrowing, round to nearest even; for fp8 e4m3 it saturates
//                                  to +-448 exactly like the reference's
//                                  `x.clamp(-448, 448).to(torch.float8_e4m3fn)`, for fp8 e5m2 to
//                                  +-57344 as the hardware's cvt.rn.satfinite.e5m2x2.f32
//                                  (kvkernels.reference.e5m2_satfinite)
//   kvk::DType<T>::kBytes          sizeof(T); kVecElems = elements in one 16-byte vector
//
// T is one of float, __half, __nv_bfloat16 and the two fp8 cache formats: __nv_fp8_e4m3
// (torch.float8_e4m3fn: 4 exponent bits, 3 mantissa bits, no infinity, NaN = S.1111.111) and
// __nv_fp8_e5m2 (torch.float8_e5m2: 5 exponent bits, 2 mantissa bits, IEEE-like: infinities
// S.11111.00, NaN S.11111.{01,10,11}; the upper byte of the fp16 of the same value).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>
#include <cstring>

namespace kvk {

// Largest finite float8_e4m3fn and float8_e5m2.
constexpr float kFp8E4m3Max = 448.0f;
constexpr float kFp8E5m2Max = 57344.0f;
// The NaN the hardware's fp32 -> e5m2 conversion returns for every NaN input (canonical, positive).
constexpr uint8_t kFp8E5m2NaN = 0x7F;

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

// fp32 -> fp8 bits, by integer arithmetic plus one fp32 add (torch's own algorithm for both formats,
// after a clamp), cheap on every architecture and the host. e5m2 false: float8_e4m3fn. e5m2 true:
// float8_e5m2. The format may be a runtime value: the append kernels serve both formats with one
// kernel, so the constants below become selects rather than a second copy of the code; with a
// constant argument (e4m3_from_float_portable, e5m2_from_float_portable) they fold away.
//
//   e4m3, as torch computes `x.clamp(-448, 448).to(torch.float8_e4m3fn)`: finite values and +-inf
//   saturate to +-448, everything rounds to nearest even (subnormals included), NaN becomes 0x7F with
//   the input's sign bit. Checked against torch's conversion for all 2^32 inputs.
//
//   e5m2, as the PTX ISA defines cvt.rn.satfinite.e5m2x2.f32 (and the toolkit's own host emulation of
//   it, __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2), computes): round to nearest even
//   (subnormals included: steps of 2^-16); .satfinite: |x| > 57344, infinities included, gives
//   +-57344 (0x7B / 0xFB); NaN gives the canonical NaN 0x7F, whatever its sign. torch's
//   `x.to(torch.float8_e5m2)` differs (|x| >= 61440 and inf give inf, NaN keeps its sign); the
//   reference (kvkernels.reference.e5m2_satfinite) follows the hardware. Clamping |x| to 57344 first
//   is the same as saturating the rounded result (everything above 57344 ends at 57344 either way).
//   Checked against the toolkit's host code for all 2^32 inputs (by hand; tests/test_decode_cuda.py
//   checks a dense sample of them on every run).
__host__ __device__ __forceinline__ uint8_t fp8_from_float_portable(float x, bool e5m2) {
  const uint32_t bits = float_bits(x);
  const uint32_t sign = bits & 0x80000000u;
  uint32_t a = bits ^ sign;  // |x|
  if (a > 0x7F800000u) return static_cast<uint8_t>(e5m2 ? kFp8E5m2NaN : 0x7Fu | (sign >> 24));  // NaN
  // The format: the largest finite value (448 / 57344), the smallest normal (2^-6 / 2^-14), 2^14 / 2^7
  // (whose fp32 ulp is the subnormal step, 2^-9 / 2^-16), and the fp32 mantissa bits dropped (20 / 21).
  const uint32_t max_bits = e5m2 ? 0x47600000u : 0x43E00000u;
  const uint32_t min_normal = e5m2 ? (113u << 23) : (121u << 23);
  const uint32_t magic = e5m2 ? (134u << 23) : (141u << 23);
  const uint32_t shift = e5m2 ? 21u : 20u;
  const uint32_t rebias = static_cast<uint32_t>((e5m2 ? 15 : 7) - 127) << 23;  // exponent bias 127 -> 15 / 7
  a = a < max_bits ? a : max_bits;  // clamp |x| (inf included): the bit pattern is ordered like the value
  uint32_t r;
  if (a < min_normal) {
    // A subnormal of the format: adding `magic` rounds it to a multiple of the subnormal step to
    // nearest even, in the low mantissa bits of the sum.
#ifdef __CUDA_ARCH__
    const float sum = __fadd_rn(float_from_bits(a), float_from_bits(magic));
#else
    const float sum = float_from_bits(a) + float_from_bits(magic);
#endif
    r = float_bits(sum) - magic;
  } else {
    // Normal: rebias the exponent and round the 23-bit mantissa to 3 (e4m3) / 2 (e5m2) bits, ties to even.
    const uint32_t mant_odd = (a >> shift) & 1u;
    a += rebias + ((1u << (shift - 1)) - 1u) + mant_odd;
    r = a >> shift;
  }
  return static_cast<uint8_t>(r | (sign >> 24));
}

__host__ __device__ __forceinline__ uint8_t e4m3_from_float_portable(float x) { return fp8_from_float_portable(x, false); }
__host__ __device__ __forceinline__ uint8_t e5m2_from_float_portable(float x) { return fp8_from_float_portable(x, true); }

// The same conversion, two values at a time: lo in bits 0..7, hi in bits 8..15. sm_89+ converts a
// pair in one instruction (cvt.rn.satfinite.{e4m3x2,e5m2x2}.f32) after the same clamp (so an
// infinity never depends on the instruction's handling of it); that instruction returns a canonical
// positive NaN where torch's e4m3 keeps the sign, so NaN is set explicitly: the results are those of
// the portable code on every architecture by construction.
__host__ __device__ __forceinline__ uint16_t float2_to_fp8x2_sat(float lo, float hi, bool e5m2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const float mx = e5m2 ? kFp8E5m2Max : kFp8E4m3Max;
  const float clo = fminf(fmaxf(lo, -mx), mx);  // fmaxf(NaN, c) = c: patched below
  const float chi = fminf(fmaxf(hi, -mx), mx);
  const float2 c = make_float2(clo, chi);
  uint16_t bits = e5m2 ? __nv_cvt_float2_to_fp8x2(c, __NV_SATFINITE, __NV_E5M2)
                       : __nv_cvt_float2_to_fp8x2(c, __NV_SATFINITE, __NV_E4M3);
  // x != x: NaN (valid without fast-math, which this project never uses).
  const uint32_t keep_sign = e5m2 ? 0u : 0x80u;  // e4m3's NaN keeps the sign (torch), e5m2's does not (hardware)
  if (lo != lo) bits = (bits & 0xFF00u) | 0x7Fu | ((float_bits(lo) >> 24) & keep_sign);
  if (hi != hi) bits = (bits & 0x00FFu) | 0x7F00u | ((float_bits(hi) >> 16) & (keep_sign << 8));
  return bits;
#else
  return static_cast<uint16_t>(fp8_from_float_portable(lo, e5m2) | (fp8_from_float_portable(hi, e5m2) << 8));
#endif
}

__host__ __device__ __forceinline__ uint16_t float2_to_e4m3x2_sat(float lo, float hi) {
  return float2_to_fp8x2_sat(lo, hi, false);
}

__host__ __device__ __forceinline__ uint16_t float2_to_e5m2x2_sat(float lo, float hi) {
  return float2_to_fp8x2_sat(lo, hi, true);
}

__host__ __device__ __forceinline__ uint8_t float_to_e4m3_sat(float x) {
  return static_cast<uint8_t>(float2_to_e4m3x2_sat(x, 0.0f) & 0xFFu);
}

__host__ __device__ __forceinline__ uint8_t float_to_e5m2_sat(float x) {
  return static_cast<uint8_t>(float2_to_e5m2x2_sat(x, 0.0f) & 0xFFu);
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

template <>
struct DType<__nv_fp8_e5m2> {
  static constexpr int kBytes = 1;
  __host__ __device__ __forceinline__ static float to_float(__nv_fp8_e5m2 x) { return static_cast<float>(x); }
  __host__ __device__ __forceinline__ static __nv_fp8_e5m2 from_float(float x) {
    __nv_fp8_e5m2 r;
    r.__x = float_to_e5m2_sat(x);
    return r;
  }
};

// Elements of T in one 16-byte (128-bit) vector.
template <typename T>
constexpr int kVecElems = 16 / DType<T>::kBytes;

static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2 && sizeof(__nv_fp8_e4m3) == 1 &&
                  sizeof(__nv_fp8_e5m2) == 1,
              "element sizes assumed by DType");

}  // namespace kvk
