// Append kernels: write new keys and values into a KV cache in place (append_kv, append_kv_slots).
//
// Memory-bound and trivially parallel: one thread moves one 16-byte vector of the cache row of one
// (token, head), for K and for V, so every store is a 128-bit STG and the two loads are in flight
// together. Which row a token goes to is the only logic (AppendMode, launch/append.h; a ragged batch
// finds each token's sequence by binary search over cu_seqlens in the kernel); a position,
// page or slot outside the cache is skipped, never accessed (the public API rejects them when it
// can see the indices without a device sync; this is the guarantee when it cannot).
//
// fp8 caches (e4m3 or e5m2) store saturate(value / scale[h]) rounded to nearest even, bit for bit
// what kvkernels.reference.quantize computes: IEEE division (__fdiv_rn, whatever the compiler flags),
// then the conversion of common/dtype.cuh (e4m3 as torch's clamp-and-cast, e5m2 as the hardware's
// cvt.rn.satfinite). One kernel per source and mode serves both formats (Cache = uint8_t, the fp8
// bytes): p.fp8_e5m2 picks the conversion, a uniform branch, so e5m2 added no kernel to the build.
//
// Fused rotary embedding (kRotary): the key vector is widened to fp32 and its first rotary_dim
// elements rotated at the token's position, x1*cos - x2*sin and x2*cos + x1*sin with every product
// and sum rounded on its own (__fmul_rn / __fadd_rn / __fsub_rn: nvcc would otherwise contract
// a*b - c*d into a fused multiply-add, one rounding fewer and different bits from
// kvkernels.reference.rotary_fp32), then rounded once to the cache dtype or quantized as above. A
// GPT-J partner is in the thread's own vector; a GPT-NeoX partner is rotary_dim / 2 elements away,
// one more 16-byte load of the source row when rotary_dim / 2 is a whole number of vectors (every
// usual head dim), element loads otherwise. The tables are read per element (L1/L2 hits: a
// [max_position, rotary_dim / 2] table row is shared by all heads of a token).
//
// CUDA headers only: no torch.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dtype.cuh"
#include "common/vec.cuh"
#include "launch/append.h"

namespace kvk {

// Src == Cache is a cache of the source's dtype (Src == Cache == uint8_t: the bit copy, any dtype,
// strides in bytes); otherwise Cache is uint8_t, fp8 bytes of the format p.fp8_e5m2 names.
template <typename Src, typename Cache>
struct AppendTraits {
  static constexpr bool kQuantize = !std::is_same<Src, Cache>::value;
  static constexpr int kCacheElems = 16 / int(sizeof(Cache));   // cache elements per 16-byte store
  static constexpr int kSrcElems = 16 / int(sizeof(Src));       // source elements per 16-byte load
  static constexpr int kSrcLoads = kCacheElems / kSrcElems;     // 16-byte loads per store
  static_assert(!kQuantize || std::is_same<Cache, uint8_t>::value, "quantized caches are fp8 bytes");
  static_assert(kSrcLoads * kSrcElems == kCacheElems, "source element no narrower than the cache's");
};

// q = a / d, r = a % d for a >= 0, d > 0; 32-bit division when both fit (the common case: 64-bit
// division is a long software sequence).
__host__ __device__ __forceinline__ void divmod_nonneg(int64_t a, int64_t d, int64_t& q, int64_t& r) {
  if (((a | d) >> 31) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(d);
    q = q32;
    r = a - static_cast<int64_t>(q32) * d;
  } else {
    q = a / d;
    r = a - q * d;
  }
}

// The cache row (page, row) of token i of sequence b (slots: token b, i == 0); false = skip.
template <AppendMode kMode, typename SlotT>
__host__ __device__ __forceinline__ bool append_cache_row(const AppendParams& p, int32_t b, int32_t i, int64_t& page,
                                                 int64_t& row) {
  if constexpr (kMode == AppendMode::kSlots) {
    const int64_t slot = static_cast<int64_t>(static_cast<const SlotT*>(p.slot_mapping)[b * p.slot_stride]);
    if (slot < 0) return false;
    divmod_nonneg(slot, p.page_size, page, row);
    return page < p.num_pages;
  } else {
    const int64_t pos = static_cast<int64_t>(p.cache_seqlens[b * p.seqlens_stride]) + i;
    if (pos < 0) return false;
    if constexpr (kMode == AppendMode::kContiguous) {
      page = b;
      row = pos;
      return b < p.num_pages && pos < p.page_size;
    } else {
      int64_t logical_page;
      divmod_nonneg(pos, p.page_size, logical_page, row);
      if (logical_page >= p.max_pages) return false;
      page = p.block_table[b * p.bt_stride_b + logical_page * p.bt_stride_page];
      return page >= 0 && page < p.num_pages;
    }
  }
}

// Ragged append: the sequence b of token t, the last b in [0, B) with cu_seqlens[b] <= t, found by
// binary search (ceil(log2 B) dependent loads of a [B + 1] array that the whole grid reads, so L1/L2
// hits after the first warps; no host-side token -> sequence map, so nothing to build or sync), and
// t's index i = t - cu_seqlens[b] in it. false when t lies in no sequence (cu_seqlens[b] <= t <
// cu_seqlens[b + 1] fails): only with a cu_seqlens that is not valid offsets (the API rejects those
// when it can read them); every load stays inside [0, B].
__host__ __device__ __forceinline__ bool ragged_sequence(const AppendParams& p, int32_t t, int32_t& b, int32_t& i) {
  if (p.batch <= 0) return false;
  int32_t lo = 0, hi = p.batch - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;  // in (lo, hi]: the interval shrinks every step
    if (p.cu_seqlens[mid * p.cu_stride] <= t) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int32_t start = p.cu_seqlens[lo * p.cu_stride];
  const int32_t end = p.cu_seqlens[(lo + 1) * p.cu_stride];
  if (t < start || t >= end) return false;
  b = lo;
  i = t - start;
  return true;
}

// IEEE division, round to nearest even, whatever the compiler flags.
__host__ __device__ __forceinline__ float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// IEEE product / sum / difference rounded on their own: never contracted into a fused multiply-add
// (nvcc contracts by default; the emulator's host build has -ffp-contract=off, setup.py).
__host__ __device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

__host__ __device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

__host__ __device__ __forceinline__ float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Entry j of row pos of a rotary table [max_position, rotary_half] (fp32 or Src), widened to fp32.
template <typename Src>
__host__ __device__ __forceinline__ float rotary_table(const AppendParams& p, const void* table, int64_t stride,
                                                       int64_t pos, int32_t j) {
  if (p.rotary_cos_fp32) return static_cast<const float*>(table)[pos * stride + j];
  return DType<Src>::to_float(static_cast<const Src*>(table)[pos * stride + j]);
}

// Widens kSrcLoads source vectors to the kCacheElems floats of one cache vector.
template <typename Src, typename Cache>
__host__ __device__ __forceinline__ void widen(const uint4 (&src)[AppendTraits<Src, Cache>::kSrcLoads],
                                               float (&out)[AppendTraits<Src, Cache>::kCacheElems]) {
  using Tr = AppendTraits<Src, Cache>;
#pragma unroll
  for (int j = 0; j < Tr::kSrcLoads; ++j) {
    float part[Tr::kSrcElems];
    unpack_to_float<Src>(src[j], part);
#pragma unroll
    for (int e = 0; e < Tr::kSrcElems; ++e) out[j * Tr::kSrcElems + e] = part[e];
  }
}

// Rotates x = the key elements [col, col + kCacheElems) of the source row `row` (Src [D]) in place
// at position pos; elements at or past rotary_dim are left as they are.
template <typename Src, typename Cache>
__host__ __device__ __forceinline__ void rotate_key(const AppendParams& p, const Src* row, int64_t col, int64_t pos,
                                                    float (&x)[AppendTraits<Src, Cache>::kCacheElems]) {
  using Tr = AppendTraits<Src, Cache>;
  constexpr int N = Tr::kCacheElems;
  const int64_t half = p.rotary_half;
  if (col >= 2 * half) return;
  float partner[N];
  if (p.rotary_interleaved) {
#pragma unroll
    for (int e = 0; e < N; ++e) partner[e] = x[e ^ 1];  // col and N even: pairs never straddle vectors
  } else if (half % N == 0) {
    // The vector lies in one half; its partner is the aligned vector half elements away.
    const int64_t pc = col < half ? col + half : col - half;
    uint4 raw[Tr::kSrcLoads];
#pragma unroll
    for (int j = 0; j < Tr::kSrcLoads; ++j) raw[j] = ld_global_16(row + pc + j * Tr::kSrcElems);
    widen<Src, Cache>(raw, partner);
  } else {
    // Element loads (rotary_dim / 2 not a multiple of the vector: rare). 32-bit indices (D <= 256);
    // elements past rotary_dim read their own position (in bounds, unused).
    const int32_t h32 = static_cast<int32_t>(half);
    const int32_t c32 = static_cast<int32_t>(col);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const int32_t d = c32 + e;
      const int32_t pd = d < h32 ? d + h32 : (d < 2 * h32 ? d - h32 : d);
      partner[e] = DType<Src>::to_float(row[pd]);
    }
  }
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const int64_t d = col + e;
    if (d >= 2 * half) continue;
    const bool first = p.rotary_interleaved ? (d & 1) == 0 : d < half;
    const int32_t j = static_cast<int32_t>(p.rotary_interleaved ? d >> 1 : (d < half ? d : d - half));
    const float c = rotary_table<Src>(p, p.rotary_cos, p.cos_stride, pos, j);
    const float s = rotary_table<Src>(p, p.rotary_sin, p.sin_stride, pos, j);
    const float xc = mul_rn(x[e], c);
    const float ps = mul_rn(partner[e], s);
    x[e] = first ? sub_rn(xc, ps) : add_rn(xc, ps);
  }
}

// A 16-byte store that stays one STG.E.128: in the rotary kernels NVVM splits the plain uint4 store
// (st_global_16) into four 32-bit ones on sm_80 (the union round trips of the fp32 math hide that
// the four words travel together); the vector store is spelled out instead.
__host__ __device__ __forceinline__ void st_global_v4(void* ptr, const uint4& v) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#else
  st_global_16(ptr, v);
#endif
}

// The rotated key's cache vector: rounded to the cache dtype, or fp8 (e5m2: p.fp8_e5m2) of value / scale.
template <typename Src, typename Cache>
__host__ __device__ __forceinline__ uint4 rotated_convert(float (&x)[AppendTraits<Src, Cache>::kCacheElems],
                                                         float scale, bool e5m2) {
  using Tr = AppendTraits<Src, Cache>;
  if constexpr (Tr::kQuantize) {
#pragma unroll
    for (int e = 0; e < Tr::kCacheElems; ++e) x[e] = div_rn(x[e], scale);
    return pack_fp8(x, e5m2);
  } else {
    return pack_from_float<Cache>(x);
  }
}

// The sign bit of element e of a 16-byte vector of Src, from its bits.
template <typename Src>
__host__ __device__ __forceinline__ uint32_t sign_bit(const uint4& raw, int e) {
  Vec16<Src> v;
  v.raw = raw;
  if constexpr (sizeof(Src) == 2) {
    return static_cast<uint32_t>(v.u16[e]) >> 15;
  } else {
    return v.u32[e] >> 31;
  }
}

// The 16-byte cache vector for kSrcLoads source vectors: a copy, or fp8 (e5m2 or e4m3) of value / scale.
// A NaN source keeps its sign, as in the reference (NaN / scale in torch): the device's fp16 -> fp32
// conversion and its division both return the canonical, positive NaN, so the sign is put back
// from the source's bits (e4m3 stores it; e5m2 stores the canonical 0x7F whatever the sign).
template <typename Src, typename Cache>
__host__ __device__ __forceinline__ uint4 append_convert(const uint4 (&src)[AppendTraits<Src, Cache>::kSrcLoads],
                                                float scale, bool e5m2) {
  using Tr = AppendTraits<Src, Cache>;
  if constexpr (!Tr::kQuantize) {
    return src[0];
  } else {
    float values[Tr::kCacheElems];
#pragma unroll
    for (int j = 0; j < Tr::kSrcLoads; ++j) {
      float part[Tr::kSrcElems];
      unpack_to_float<Src>(src[j], part);
#pragma unroll
      for (int e = 0; e < Tr::kSrcElems; ++e) {
        const float q = div_rn(part[e], scale);
        values[j * Tr::kSrcElems + e] = q != q ? float_from_bits(0x7FC00000u | (sign_bit<Src>(src[j], e) << 31)) : q;
      }
    }
    return pack_fp8(values, e5m2);
  }
}

// One thread of the launch: block (block_x, block_y), thread thread_x of kAppendThreads.
// grid (ceil(tokens / tokens_per_block), ceil(Hkv * vecs_per_head / kAppendThreads)).
// Thread -> (token, head h, vector c of the head's row). tokens = B * S_new, or T when ragged
// (< 2^31, host-checked). Host-callable too, so the whole launch can be emulated on a CPU.
template <typename Src, typename Cache, AppendMode kMode, typename SlotT, bool kRagged = false, bool kRotary = false>
__host__ __device__ __forceinline__ void append_thread(const AppendParams& p, int32_t block_x, int32_t block_y,
                                                       int32_t thread_x) {
  using Tr = AppendTraits<Src, Cache>;
  static_assert(!kRagged || kMode != AppendMode::kSlots, "slots address tokens directly: no ragged variant");
  static_assert(!kRotary || !std::is_same<Src, uint8_t>::value, "the rotary kernels need the source's type");
  const int32_t row_vecs = p.num_heads * p.vecs_per_head;  // vectors per token, all heads
  const int32_t lanes = row_vecs < kAppendThreads ? row_vecs : kAppendThreads;
  const int32_t sub = thread_x / lanes;  // token within the block
  const int32_t w = block_y * kAppendThreads + thread_x % lanes;
  const int64_t token = static_cast<int64_t>(block_x) * p.tokens_per_block + sub;
  if (sub >= p.tokens_per_block || w >= row_vecs || token >= append_num_tokens(p)) return;
  const int32_t t = static_cast<int32_t>(token);
  const int32_t h = w / p.vecs_per_head;
  const int32_t c = w - h * p.vecs_per_head;

  // The source row: token t of [T, 1, Hkv, D] (ragged, slots), or (b, i) of [B, S_new, Hkv, D].
  int32_t b = t, i = 0;
  if constexpr (!kRagged && kMode != AppendMode::kSlots) {
    b = t / p.seq_new;
    i = t - b * p.seq_new;
  }
  const int64_t col = static_cast<int64_t>(c) * Tr::kCacheElems;  // first element of the vector
  const Src* k_src = static_cast<const Src*>(p.k) + b * p.k_stride_b + i * p.k_stride_s + h * p.k_stride_h + col;
  const Src* v_src = static_cast<const Src*>(p.v) + b * p.v_stride_b + i * p.v_stride_s + h * p.v_stride_h + col;
  // Loads first: the source address needs no index, while the cache row waits on up to
  // log2(B) + 2 dependent index loads (cu_seqlens, cache_seqlens, block_table); issuing the source
  // loads before them hides one latency behind the other. A skipped token's loads are in bounds.
  uint4 k_in[Tr::kSrcLoads], v_in[Tr::kSrcLoads];
#pragma unroll
  for (int j = 0; j < Tr::kSrcLoads; ++j) {
    k_in[j] = ld_global_16(k_src + j * Tr::kSrcElems);
    v_in[j] = ld_global_16(v_src + j * Tr::kSrcElems);
  }

  if constexpr (kRagged) {
    if (!ragged_sequence(p, t, b, i)) return;
  }
  int64_t page, row;
  if (!append_cache_row<kMode, SlotT>(p, b, i, page, row)) return;
  int64_t pos = 0;  // the rotary position
  if constexpr (kRotary) {
    if constexpr (kMode == AppendMode::kSlots) {
      pos = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[t * p.positions_stride]
                              : static_cast<int64_t>(static_cast<const int32_t*>(p.positions)[t * p.positions_stride]);
    } else {
      pos = static_cast<int64_t>(p.cache_seqlens[b * p.seqlens_stride]) + i;
    }
    if (pos < 0 || pos >= p.max_position) return;  // no row of the table: not written
  }

  Cache* k_dst = static_cast<Cache*>(p.k_cache) + page * p.kc_stride_page + row * p.kc_stride_row +
                 h * p.kc_stride_h + col;
  Cache* v_dst = static_cast<Cache*>(p.v_cache) + page * p.vc_stride_page + row * p.vc_stride_row +
                 h * p.vc_stride_h + col;
  float k_scale = 1.0f, v_scale = 1.0f;
  if constexpr (Tr::kQuantize) {
    k_scale = p.k_scale[h * p.k_scale_stride];
    v_scale = p.v_scale[h * p.v_scale_stride];
  }
  const bool e5m2 = p.fp8_e5m2 != 0;
  if constexpr (kRotary) {
    float x[Tr::kCacheElems];
    widen<Src, Cache>(k_in, x);
    rotate_key<Src, Cache>(p, k_src - col, col, pos, x);
    st_global_v4(k_dst, rotated_convert<Src, Cache>(x, k_scale, e5m2));
    st_global_v4(v_dst, append_convert<Src, Cache>(v_in, v_scale, e5m2));
  } else {
    st_global_16(k_dst, append_convert<Src, Cache>(k_in, k_scale, e5m2));
    st_global_16(v_dst, append_convert<Src, Cache>(v_in, v_scale, e5m2));
  }
}

// The kernel: append_thread for every thread of the grid.
//   p.k, p.v              [B, S_new, Hkv, D] Src (slots, ragged: [T, 1, Hkv, D])
//   p.k_cache, p.v_cache  [num_pages, page_size, Hkv, D] Cache (uint8_t for fp8: p.fp8_e5m2 names the format)
//   p.cache_seqlens       [B] int32 (contiguous/paged), p.block_table [B, max_pages] int32 (paged),
//   p.cu_seqlens          [B + 1] int32 (ragged), p.slot_mapping [T] SlotT (slots),
//   p.k_scale/p.v_scale   [Hkv] fp32 (fp8 caches)
//   p.rotary_cos/sin      [max_position, rotary_half] Src or fp32 (kRotary), p.positions [T] (kRotary, slots)
template <typename Src, typename Cache, AppendMode kMode, typename SlotT, bool kRagged = false, bool kRotary = false>
__global__ void __launch_bounds__(kAppendThreads) kvk_append_kernel(const __grid_constant__ AppendParams p) {
  append_thread<Src, Cache, kMode, SlotT, kRagged, kRotary>(p, static_cast<int32_t>(blockIdx.x),
                                                   static_cast<int32_t>(blockIdx.y), static_cast<int32_t>(threadIdx.x));
}

}  // namespace kvk
