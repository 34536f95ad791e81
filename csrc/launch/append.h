// Host interface of the append kernels: the parameter block (shared with csrc/kernels/append.cuh)
// and the launcher. Plain C++ plus the CUDA runtime types, so the torch glue includes it cheaply.
//
// One launch writes K and V. Every token of every head is a row of D elements, written as 16-byte
// vectors: the cache row must be a whole number of 16-byte vectors (D * cache element size % 16 == 0)
// and every pointer and every stride of a dimension longer than 1 must keep 16-byte alignment; the
// caller (csrc/ops/append.cpp) checks this and kvkernels/cuda/append.py sends other layouts to Triton.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace kvk {

// How a token finds its cache row.
enum class AppendMode : int {
  kContiguous = 0,  // append_kv, cache [B, S_max, Hkv, D]: row cache_seqlens[b] + i of sequence b
  kPaged = 1,       // append_kv, cache [num_pages, page_size, Hkv, D]: position p of sequence b is
                    // row p % page_size of page block_table[b, p / page_size]
  kSlots = 2,       // append_kv_slots, cache [num_pages, page_size, Hkv, D]: token t goes to row
                    // s % page_size of page s / page_size, s = slot_mapping[t]; s < 0 is skipped
};
// kContiguous and kPaged also come ragged (AppendParams::cu_seqlens set): k/v [T, Hkv, D] hold the
// new tokens of all sequences back to back, sequence b's n_b = cu_seqlens[b + 1] - cu_seqlens[b]
// tokens from row cu_seqlens[b], token i of them going to position cache_seqlens[b] + i.

// What the source holds; the cache is the source's own dtype (a bit copy) or fp8 (quantized; e4m3 or
// e5m2 as AppendParams::fp8_e5m2 says: the same kernels).
enum class AppendSource : int {
  kCopy = 0,       // cache dtype == source dtype (any element size): bytes are copied unchanged
  kHalfToFp8 = 1,  // fp16 source, fp8 cache
  kBf16ToFp8 = 2,  // bf16 source, fp8 cache
  kFloatToFp8 = 3, // fp32 source, fp8 cache
  // Caches of the source's dtype seen as that dtype (strides in elements): the rotary kernels, which
  // compute on the key, need the type; without rotary such appends are kCopy.
  kHalf = 4,
  kBf16 = 5,
  kFloat = 6,
};

// Strides are in elements of the tensor's own dtype; for AppendSource::kCopy the k/v and cache
// strides are in bytes (that kernel moves bytes, whatever the dtype). Sizes are those of the
// tensors; positions, pages and slots outside them are skipped, never accessed.
struct AppendParams {
  // Sources. append_kv: k/v [B, S_new, Hkv, D]; append_kv_slots and ragged append_kv: k/v
  // [T, Hkv, D], passed as [T, 1, Hkv, D] with stride_s = 0 (token t's row is t * stride_b).
  const void* k;
  const void* v;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  int64_t v_stride_b, v_stride_s, v_stride_h;

  // Caches [num_pages, page_size, Hkv, D]; a contiguous cache [B, S_max, Hkv, D] is B pages of S_max rows.
  void* k_cache;
  void* v_cache;
  int64_t kc_stride_page, kc_stride_row, kc_stride_h;
  int64_t vc_stride_page, vc_stride_row, vc_stride_h;
  int64_t num_pages;  // cache.shape[0]
  int64_t page_size;  // cache.shape[1]

  const int32_t* cache_seqlens;  // [B] (kContiguous, kPaged)
  const int32_t* block_table;    // [B, max_pages] (kPaged)
  int64_t bt_stride_b, bt_stride_page;
  int64_t max_pages;
  const void* slot_mapping;      // [T] int32 or int64 (kSlots)
  int64_t slot_stride;
  int64_t seqlens_stride;
  const int32_t* cu_seqlens;     // [B + 1] (ragged kContiguous / kPaged); nullptr: dense [B, S_new]
  int64_t cu_stride;

  const float* k_scale;  // [Hkv] fp32, stride 0 for one scale per tensor (fp8 caches)
  const float* v_scale;
  int64_t k_scale_stride, v_scale_stride;
  int32_t fp8_e5m2;      // fp8 caches: 1 = float8_e5m2, 0 = float8_e4m3fn (K and V alike)

  // Fused rotary embedding of the keys (rotary_cos != nullptr selects the rotary kernels): the key
  // of a token at position pos is rotated over its first 2 * rotary_half dims in fp32 before it is
  // rounded / quantized (kvkernels.reference.rotary_fp32); values are untouched. A token whose
  // position is outside [0, max_position) is not written (K nor V).
  const void* rotary_cos;    // [max_position, rotary_half], the source's dtype or fp32 (rotary_cos_fp32)
  const void* rotary_sin;    // same shape and dtype
  int64_t cos_stride, sin_stride;  // row strides, in elements
  int64_t max_position;
  const void* positions;     // [T] int32 / int64 (positions_int64), kSlots only: token t's position
  int64_t positions_stride;
  int32_t rotary_half;       // rotary_dim / 2 >= 1
  int32_t rotary_interleaved;  // 1: GPT-J pairs (x[2j], x[2j + 1]); 0: GPT-NeoX (x[j], x[j + rotary_half])
  int32_t rotary_cos_fp32;   // 1: tables are fp32; 0: the source's dtype
  int32_t positions_int64;

  int32_t batch;           // B (T for slots)
  int32_t seq_new;         // S_new (1 for slots and ragged)
  int32_t num_tokens;      // T (ragged only: dense has B * S_new tokens)
  int32_t num_heads;       // Hkv
  int32_t vecs_per_head;   // 16-byte vectors in one cache row: D * cache element size / 16
  int32_t tokens_per_block;  // set by the launcher
};

// 128 threads: a cache row of 8 heads x 128 dims in fp16 is exactly 128 vectors, so a decode-step
// append (one token per sequence) gives one token per block; smaller rows pack several tokens.
constexpr int kAppendThreads = 128;

// Tokens the launch covers: one thread group per token.
__host__ __device__ inline int64_t append_num_tokens(const AppendParams& p) {
  return p.cu_seqlens != nullptr ? static_cast<int64_t>(p.num_tokens) : static_cast<int64_t>(p.batch) * p.seq_new;
}

// The launch shape: sets p.tokens_per_block and the grid; false when the append is too large for
// one launch. grid_x == 0 means nothing to write.
inline bool append_launch_shape(AppendParams& p, uint32_t& grid_x, uint32_t& grid_y) {
  const int64_t tokens = append_num_tokens(p);
  const int64_t row_vecs = static_cast<int64_t>(p.num_heads) * p.vecs_per_head;
  grid_x = grid_y = 0;
  // an empty cache or an empty ragged batch too (no sequence to find a token in)
  if (tokens <= 0 || row_vecs <= 0 || p.num_pages <= 0 || p.page_size <= 0 || p.batch <= 0) return true;
  const int64_t blocks_per_token = (row_vecs + kAppendThreads - 1) / kAppendThreads;
  if (tokens > INT32_MAX || row_vecs > INT32_MAX || blocks_per_token > 65535) return false;
  p.tokens_per_block = row_vecs >= kAppendThreads ? 1 : static_cast<int32_t>(kAppendThreads / row_vecs);
  grid_x = static_cast<uint32_t>((tokens + p.tokens_per_block - 1) / p.tokens_per_block);
  grid_y = static_cast<uint32_t>(blocks_per_token);
  return true;
}

// Launches one append (K and V) on `stream`. Returns the launch status; enqueues nothing when
// there is no token. slot_int64 selects the slot_mapping dtype (kSlots only); p.cu_seqlens selects
// the ragged kernels (kContiguous and kPaged only); p.rotary_cos the rotary kernels (every source
// but kCopy: a same-dtype rotary append is kHalf / kBf16 / kFloat).
cudaError_t launch_append(AppendParams params, AppendSource source, AppendMode mode, bool slot_int64,
                          cudaStream_t stream);

}  // namespace kvk
