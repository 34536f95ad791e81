// Arguments of one decode or cache-attention launch, shared by the host launchers
// (csrc/launch/decode*.cu, cache_attention*.cu), the torch glue (csrc/ops/decode.cpp,
// cache_attention.cpp) and the kernels (csrc/kernels/decode.cuh). Plain C++: no CUDA, no torch.
//
// Cache attention is decode with several queries per sequence: sequence b has n_b query tokens,
// the last n_b of its L_b = cache_seqlens[b] cached positions, so query i sits at p = L_b - n_b + i
// and sees [0, p] (causal) or [0, L_b), from p - window_left on with a window. The kernel's MMA rows
// are (query token, head of the GQA group) pairs, token-major: row R of a sequence is token R / group,
// head kvh * group + R % group. Decode is the case n_b = 1 (rows = the group's heads), with
// tokens_per_seq = 1 and the token strides 0, so one parameter block and one merge serve both.
//
// Decode: one query token per sequence attends to positions [start, len) of its cache, where
//   len   = clamp(cache_seqlens[b], 0, capacity)
//   start = window_left >= 0 ? max(0, len - window_left - 1) : 0.
// A contiguous cache [B, S_max, Hkv, D] is read as B pages of S_max rows, page b holding sequence b;
// a paged cache [num_pages, page_size, Hkv, D] finds position p of sequence b in row p % page_size of
// page block_table[b, p / page_size]. Page indices outside [0, num_pages) are skipped (those rows read
// as zeros and are masked), so a bad block table can give a wrong answer but never a bad access.
//
// Split-KV: split s of a sequence covers [start + s * split_tokens, start + (s + 1) * split_tokens)
// clipped to len (empty splits are allowed). With num_splits == 1 the kernel writes out/lse itself;
// otherwise it writes one partial state per split into the workspace and a merge kernel combines them
// in split order (deterministic).
//
// Strides are in elements of the tensor's dtype; the last (head-dim) stride is 1.
#pragma once

#include <cstdint>

// Host and device: the tests compile the division and the fp8 widening for the host.
#if defined(__CUDACC__)
#define KVK_DECODE_HD __host__ __device__ __forceinline__
#else
#define KVK_DECODE_HD inline
#endif

namespace kvk {

// Element type of q/out (the MMA type) and of the cache. Both fp8 formats run the same kernels (one
// fp8 instantiation per q dtype, head dim and layout): the launcher sets DecodeParams::fp8_e5m2 and
// the kernel's widening step branches on it, so e5m2 added no kernel to the build.
enum class DecodeDType : int { kHalf = 0, kBFloat16 = 1, kFloat8E4M3 = 2, kFloat8E5M2 = 3 };

constexpr bool decode_dtype_is_fp8(DecodeDType t) {
  return t == DecodeDType::kFloat8E4M3 || t == DecodeDType::kFloat8E5M2;
}

// n / d and n % d by a multiply and a shift (d fixed per launch, n < 2^31): the page of every row
// loaded is position / page_size, and an integer division would cost ~20 instructions per row.
// Round-up method: with l = ceil(log2 d) and m = floor(2^32 * (2^l - d) / d) + 1,
//   n / d = (umulhi(n, m) + n) >> l   for all 0 <= n < 2^31 (the sum cannot overflow 32 bits).
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 0;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    uint32_t l = 0;
    while (l < 32 && (uint64_t{1} << l) < d) ++l;
    shift = l;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1);
  }

  // n < 2^31.
  KVK_DECODE_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, multiplier);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
#endif
    return (hi + n) >> shift;
  }

  KVK_DECODE_HD void divmod(uint32_t n, uint32_t& quotient, uint32_t& remainder) const {
    quotient = div(n);
    remainder = n - quotient * divisor;
  }
};

struct DecodeParams {
  // ---- tensors (decode shapes first; cache attention in brackets)
  const void* q;             // [B, Hq, D] fp16/bf16 (dense [B, Sq, Hq, D], ragged [Tq, Hq, D]);
                             // strides q_stride_b (0 when ragged), q_stride_t (0 for decode), q_stride_h
  const void* k_cache;       // contiguous [B, S_max, Hkv, D] or paged [num_pages, page_size, Hkv, D];
                             // q's dtype or fp8 (e4m3 or e5m2: fp8_e5m2)
  const void* v_cache;       // same shape and dtype as k_cache (its own strides)
  const int32_t* seqlens;    // [B] cache_seqlens, stride seqlens_stride
  const int32_t* block_table;  // [B, max_pages] (paged only, else nullptr)
  const int32_t* cu_seqlens_q; // cache attention, ragged q only: [B + 1], sequence b's queries are
                               // tokens [cu[b], cu[b+1]) of q (clamped to [0, num_tokens]); else nullptr
  const float* k_scale;      // [Hkv] fp32, stride k_scale_stride (0 = one scale per tensor); null = 1
  const float* v_scale;      // [Hkv] fp32, stride v_scale_stride; null = 1
  void* out;                 // like q, q's dtype; strides out_stride_b, out_stride_t, out_stride_h
  float* lse;                // [B, Hq] ([B, Hq, Sq] | [Hq, Tq]) fp32 natural log; strides lse_stride_b,
                             // lse_stride_t, lse_stride_h
  float* ws_out;             // [num_splits, num_tokens, Hq, D] fp32 contiguous: per-split normalised outputs
  float* ws_lse;             // [num_splits, num_tokens, Hq] fp32 contiguous: per-split LSE in log2 units

  // Token strides: decode 0. Ragged tensors index tokens globally (cu[b] + i) with batch strides 0.
  int64_t q_stride_b, q_stride_t, q_stride_h;
  int64_t k_stride_page, k_stride_row, k_stride_head;  // page = batch for a contiguous cache
  int64_t v_stride_page, v_stride_row, v_stride_head;
  int64_t out_stride_b, out_stride_t, out_stride_h;
  int64_t lse_stride_b, lse_stride_t, lse_stride_h;
  int64_t seqlens_stride;
  int64_t bt_stride_b, bt_stride_page;
  int64_t k_scale_stride, v_scale_stride;

  // ---- sizes
  int batch;        // B
  int num_heads;    // Hq
  int num_kv_heads; // Hkv; query head h reads kv head h / group
  int group;        // Hq / Hkv
  int head_dim;     // D: 64, 128 or 256
  int page_size;    // paged: rows per page; contiguous: S_max
  int num_pages;    // paged: k_cache.shape[0]; contiguous: B
  int max_pages;    // paged: block_table.shape[1]; contiguous: 1
  int capacity;     // most positions a sequence can hold: max_pages * page_size (contiguous: S_max)
  // Query tokens. Flat token index (rows of the split workspace and the merge): decode b, dense
  // b * Sq + i, ragged cu[b] + i; the merge finds a token's (b, i) as (flat / tokens_per_seq,
  // flat % tokens_per_seq), which with the ragged batch strides of 0 addresses it globally.
  int num_tokens;      // decode B, dense B * Sq, ragged Tq
  int tokens_per_seq;  // decode 1, dense Sq, ragged Tq
  int max_seqlen_q;    // decode 1, dense Sq, ragged the largest n_b (sizes the grid: rows per sequence)
  bool causal;         // cache attention: query i sees up to its own position p (decode: p = L - 1 anyway)

  // ---- attention
  float softmax_scale;
  float softcap;    // 0 = off; else scores = softcap * tanh(scores / softcap)
  int window_left;  // -1 = unbounded; else positions >= p - window_left (decode: the last window_left + 1)
  // ALiBi (FlashAttention's alibi_slopes): the score of the query at p and position j gets
  // -slope * |p - j| (after the softcap, unscaled), slope = alibi_slopes[b * alibi_stride_b + head].
  const float* alibi_slopes;  // fp32 [B, Hq], head stride 1, or nullptr (no bias)
  int64_t alibi_stride_b;     // 0: one slope per head for every sequence

  // ---- split-KV plan (kvkernels/decode_plan.py)
  int num_splits;   // >= 1
  int split_tokens; // tokens per split (a multiple of the kernel's KV tile); split s of a block covers
                    // [start + s * split_tokens, ...) where start is the window start of the block's first row

  // ---- set by the launcher from the cache dtype (csrc/launch/decode_launch.cuh)
  int fp8_e5m2;     // fp8 caches: 1 = float8_e5m2, 0 = float8_e4m3fn (block-uniform branch of the widening)

  // ---- derived by the launcher (csrc/launch/decode.cu)
  int m_tiles;      // 16-row MMA tiles of rows per block: 1, 2 or 4
  int head_chunks;  // row tiles: blocks along a sequence's rows, ceil(max_seqlen_q * group / (16 * m_tiles))
  FastDivmod page_div;  // position -> (page slot, row): divides by page_size
};

}  // namespace kvk
