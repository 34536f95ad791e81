// 16-byte (128-bit) global memory accesses and conversions of a 16-byte vector to/from fp32.
//
// CUDA headers only (no torch): every kernel file may include this.
//
// One 16-byte access per thread is what lets a memory-bound kernel reach full bandwidth: the SASS
// shows LDG.E.128 / STG.E.128 (the build review test checks for them). The pointer must be
// 16-byte aligned; the host side checks base pointers and strides before choosing a kernel.
//
//   uint4 v = kvk::ld_global_nc_16(p);   read-only path (ld.global.nc): data not written by this kernel
//   uint4 v = kvk::ld_global_16(p);      plain load (host-callable, like the helpers below)
//   kvk::st_global_16(p, v);             plain store
//   kvk::unpack_to_float<T>(v, f);       uint4 holding kVecElems<T> values of T -> float f[kVecElems<T>]
//   kvk::pack_from_float<T>(f)           the reverse (round to nearest even; fp8 saturates)
#pragma once

#include <cstdint>

#include "common/dtype.cuh"

namespace kvk {

__device__ __forceinline__ uint4 ld_global_nc_16(const void* ptr) {
  return __ldg(reinterpret_cast<const uint4*>(ptr));
}

__host__ __device__ __forceinline__ uint4 ld_global_16(const void* ptr) {
  return *reinterpret_cast<const uint4*>(ptr);
}

__host__ __device__ __forceinline__ void st_global_16(void* ptr, const uint4& v) {
  *reinterpret_cast<uint4*>(ptr) = v;
}

__host__ __device__ __forceinline__ bool is_aligned_16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

// The 16 bytes of a vector viewed as N elements of T (register-only: the union never touches memory
// once the compiler scalarises it; check -Xptxas -v for "0 bytes stack frame").
template <typename T>
union Vec16 {
  static constexpr int N = kVecElems<T>;
  uint4 raw;
  T elems[N];
  uint16_t u16[8];
  uint32_t u32[4];
};

template <typename T>
__host__ __device__ __forceinline__ void unpack_to_float(const uint4& raw, float (&out)[kVecElems<T>]) {
  Vec16<T> v;
  v.raw = raw;
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) out[i] = DType<T>::to_float(v.elems[i]);
}

template <typename T>
__host__ __device__ __forceinline__ uint4 pack_from_float(const float (&in)[kVecElems<T>]) {
  Vec16<T> v;
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) v.elems[i] = DType<T>::from_float(in[i]);
  return v.raw;
}

// fp8 e4m3 and e5m2 pack two at a time (one cvt instruction per pair on sm_89+).
template <>
__host__ __device__ __forceinline__ uint4 pack_from_float<__nv_fp8_e4m3>(const float (&in)[16]) {
  Vec16<__nv_fp8_e4m3> v;
#pragma unroll
  for (int i = 0; i < 8; ++i) v.u16[i] = float2_to_e4m3x2_sat(in[2 * i], in[2 * i + 1]);
  return v.raw;
}

template <>
__host__ __device__ __forceinline__ uint4 pack_from_float<__nv_fp8_e5m2>(const float (&in)[16]) {
  Vec16<__nv_fp8_e5m2> v;
#pragma unroll
  for (int i = 0; i < 8; ++i) v.u16[i] = float2_to_e5m2x2_sat(in[2 * i], in[2 * i + 1]);
  return v.raw;
}

// Either fp8 format, named at run time (e5m2 true: float8_e5m2): one copy of the code.
__host__ __device__ __forceinline__ uint4 pack_fp8(const float (&in)[16], bool e5m2) {
  Vec16<__nv_fp8_e4m3> v;
#pragma unroll
  for (int i = 0; i < 8; ++i) v.u16[i] = float2_to_fp8x2_sat(in[2 * i], in[2 * i + 1], e5m2);
  return v.raw;
}

}  // namespace kvk
