// Decode attention: one query token per sequence against its KV cache (contiguous or paged, fp16 /
// bf16 / fp8 e4m3 or e5m2), split-KV with a deterministic merge; and cache attention, its generalisation to
// several query tokens per sequence (chunked prefill, speculative verification), from the same kernel
// template. CUDA headers only.
//
// What bounds decode is HBM: every K/V byte of the attended positions is read once, and the kernel
// must keep enough bytes in flight to cover DRAM latency. Design:
//
// * One block per (sequence, KV head, split, chunk of query heads). All query heads of a GQA group
//   (up to 64; 32 for D = 256) are served by the block that reads the KV head, so each K/V byte is
//   read once whatever the group size.
// * K/V tiles of kTokens rows stream through a kStages-deep cp.async pipeline (16-byte copies, L1
//   bypassed). For paged caches the page-table entries of the next tile are fetched one iteration
//   before the copies that need them, so a page lookup never sits on the critical path.
// * Tensor cores for both products (mma.sync m16n8k16, fp32 accumulation), query heads on the M
//   side: S = Q K^T takes Q fragments from registers and K fragments by ldmatrix; P stays in
//   registers as the A operand of O += P V (V by ldmatrix.trans). Groups smaller than 16 waste MMA
//   rows, but decode needs < 10% of the SM's issue slots at full bandwidth, so one path serves every
//   group size (a CUDA-core path would need G * D FMAs per token per thread group: too slow for
//   G >= 8, no faster for G = 1).
// * Warps split a tile's tokens (each warp its 16-row sub-blocks, own online-softmax state); with
//   more than 16 query heads warps also split the heads (m_tiles), and at D = 256 a warp pair splits
//   the head dim of P V. Warp states are merged through shared memory at the end, in warp order.
// * fp8 caches: bytes land in a raw stage, are widened to q's dtype into a compute tile (exact), and
//   the per-head scales are folded out of the loop: k_scale into the score scale, v_scale into the
//   final normalisation. One kernel per layout reads both fp8 formats (CacheT = uint8_t, the raw
//   bytes): p.fp8_e5m2 picks the widening, a block-uniform branch per tile (e5m2 is two byte
//   permutes, e4m3 a few integer ops and an fp16 multiply below sm_89, a cvt from it).
// * Safety without host checks: lengths are clamped to the cache's capacity; rows past a split, or
//   behind a page index outside [0, num_pages), are zero-filled by the copy (nothing is read) and
//   masked out of the softmax; a sliding window starts the first split at the window's first
//   position, so pages wholly before it are never touched. Offsets are 64-bit.
// * Online softmax in the log2 domain (exp2), fp32 statistics. O is rescaled only when a row's
//   running max grows (a warp vote), which after the first tiles is rare.
// * Split-KV (plan from kvkernels/decode_plan.py: shapes only, so CUDA graphs stay valid): each split
//   writes a normalised fp32 partial and its LSE; kvk_decode_merge_kernel combines them in split
//   order. With one split the block writes out/lse directly; the two paths give identical bits for a
//   sequence that falls in one split, which batch-invariant mode relies on.
//
// Cache attention (kCacheAttn = true): the MMA rows of a block are (query token, group head) pairs,
// token-major (decode_params.h), so the queries of a sequence and the heads of a GQA group share every
// K/V tile as decode's heads do (speculative decoding, 4 tokens x 8 heads, is one 32-row block that
// reads each K/V byte once). Longer query runs are cut into row tiles (the head-chunk grid axis of
// decode), and a row tile attends [window start of its first row, causal limit of its last row):
// tiles above the causal diagonal are never loaded. Inside that range each row masks its own
// [p - window_left, p]; a warp whose 16 rows see nothing of a 16-token sub-block skips it. With
// kCacheAttn = false all of this compiles away and the kernel is decode's (one query per sequence:
// its range is the block's range).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "common/ptx.cuh"
#include "kernels/decode_params.h"
#include "kernels/decode_util.cuh"

namespace kvk {
namespace decode {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

constexpr int max_int(int a, int b) { return a > b ? a : b; }

// Compile-time shape of one instantiation: T is q's dtype (and the MMA type), CacheT the cache's
// (uint8_t: fp8 bytes of either format).
template <typename T, typename CacheT, int D>
struct Traits {
  static_assert(D == 64 || D == 128 || D == 256, "head dims 64, 128, 256");
  static constexpr bool kFp8 = sizeof(CacheT) == 1;
  // D = 256: a warp pair shares each 16-token sub-block, both compute S, each accumulates half of O
  // (16 x 128 fp32 = 64 registers a thread, next to 64 for the query fragments).
  static constexpr int kDimGroups = D == 256 ? 2 : 1;
  static constexpr int kDimsPerWarp = D / kDimGroups;
  static constexpr int kWarpGroups = kWarps / kDimGroups;  // warps (pairs) with distinct work
  static constexpr int kTokens = 16 * kWarpGroups;         // KV rows per tile: 64 (32 at D = 256)
  static constexpr int kMaxMTiles = kWarpGroups;           // query-head MMA tiles per block
  // Stage depth: ~64-96 KB of shared memory a block (2 blocks an SM on H100), two or three tiles in
  // flight while one is consumed.
  static constexpr int kStages = (kFp8 || D == 64) ? 4 : 3;
  static constexpr int kChunksPerRow = D * static_cast<int>(sizeof(CacheT)) / 16;  // 16-byte copies a row
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kRowsPerThread = kTokens / kRowsPerPass;
  static constexpr int kStageBytes = kTokens * D * static_cast<int>(sizeof(CacheT));  // K (or V) of a stage
  static constexpr int kTileBytes = kTokens * D * 2;                                  // T-typed tile
  static constexpr int kPipeBytes = 2 * kStages * kStageBytes + (kFp8 ? 2 * kTileBytes : 0);
  // Paged: one byte a row and stage, whether the row's page index was valid (rows of an invalid page
  // are masked out of the softmax, not just zero-filled).
  static constexpr int kFlagBytes = kStages * kTokens;
  // End-of-block merge of warp states: per (warp group, head row) slot: m, l and a row of O.
  static constexpr int kSlots = 16 * kWarpGroups;
  static constexpr int kMergeStride = D + 8;  // floats; the pad spreads a warp's float2 stores over banks
  static constexpr int kMergeBytes = (2 * kSlots + kSlots * kMergeStride) * 4;
  static constexpr int kSmemBytes = max_int(kPipeBytes + kFlagBytes, kMergeBytes);

  static_assert(kThreads % kChunksPerRow == 0 && kTokens % kRowsPerPass == 0, "tile loader shape");
  static_assert(kTokens * D / 16 % kThreads == 0, "fp8 widening pass shape");
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a T-typed [kTokens][D] tile. The chunk index
// is XORed with row % 8 so that the 8 rows an ldmatrix reads at one column, and the 8 chunks a
// cp.async wave writes, fall in distinct banks.
template <int D>
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
  return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// Per-thread part of loading K/V tiles of one split: which rows and 16-byte column it copies and the
// page lookups. Strides and pointers are read from the kernel parameters (constant bank) where they
// are used rather than held in registers, which the MMA fragments need.
template <typename T, typename CacheT, int D, bool kPaged>
struct TileLoader {
  using Tr = Traits<T, CacheT, D>;
  static constexpr int R = Tr::kRowsPerThread;

  const DecodeParams& p;
  int b, kvh;
  int lo, hi;  // positions [lo, hi) of this split
  int row0;    // first tile row of this thread; then every kRowsPerPass rows
  int chunk;   // 16-byte column of this thread

  __device__ __forceinline__ TileLoader(const DecodeParams& params, int b_, int kvh_, int lo_, int hi_, int tid)
      : p(params), b(b_), kvh(kvh_), lo(lo_), hi(hi_), row0(tid / Tr::kChunksPerRow), chunk(tid % Tr::kChunksPerRow) {}

  // Page-table entries of this thread's rows of `tile` (-1 for rows past the split). The loads are
  // only consumed by the issue() of that tile, an iteration later.
  __device__ __forceinline__ void fetch_pages(int tile, int (&pages)[R]) const {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      pages[j] = -1;
      if (kPaged) {
        const int pos = lo + tile * Tr::kTokens + row0 + j * Tr::kRowsPerPass;
        if (pos < hi) {
          const int64_t slot = p.page_div.div(static_cast<uint32_t>(pos));
          pages[j] = __ldg(p.block_table + b * p.bt_stride_b + slot * p.bt_stride_page);
        }
      }
    }
  }

  // Starts the copies of `tile` into K and V stage buffers (shared-memory addresses); paged: also
  // records in flags[row] whether the row is attended (inside the split, valid page).
  __device__ __forceinline__ void issue(int tile, uint32_t k_stage, uint32_t v_stage, unsigned char* flags,
                                        const int (&pages)[R]) const {
    constexpr int kVec = 16 / static_cast<int>(sizeof(CacheT));  // elements per copy
    const CacheT* k = static_cast<const CacheT*>(p.k_cache) + kvh * p.k_stride_head + chunk * kVec;
    const CacheT* v = static_cast<const CacheT*>(p.v_cache) + kvh * p.v_stride_head + chunk * kVec;
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int row = row0 + j * Tr::kRowsPerPass;
      const int pos = lo + tile * Tr::kTokens + row;
      bool ok = pos < hi;
      int64_t page, in_page;
      if (kPaged) {
        uint32_t slot, rem;
        p.page_div.divmod(static_cast<uint32_t>(pos), slot, rem);
        ok = ok && static_cast<unsigned>(pages[j]) < static_cast<unsigned>(p.num_pages);
        if (chunk == 0) flags[row] = ok;
        page = pages[j];
        in_page = rem;
      } else {  // a contiguous cache is one page per sequence
        page = b;
        in_page = pos;
      }
      // fp8 lands raw (row-major, widened later); fp16/bf16 lands in its swizzled compute layout.
      const uint32_t dst = Tr::kFp8 ? static_cast<uint32_t>(row * D + chunk * 16) : swizzle<D>(row, chunk);
      cp_async_16(k_stage + dst, ok ? k + page * p.k_stride_page + in_page * p.k_stride_row : k, ok);
      cp_async_16(v_stage + dst, ok ? v + page * p.v_stride_page + in_page * p.v_stride_row : v, ok);
    }
  }
};

// fp8 only: widens a raw [kTokens][D] stage of fp8 codes (e4m3, or e5m2 with kE5m2) into a swizzled
// T-typed tile.
template <typename T, int D, int kTokens, bool kE5m2>
__device__ __forceinline__ void widen_tile(const unsigned char* raw, unsigned char* tile, int tid) {
  constexpr int kRawChunksPerRow = D / 16;
#pragma unroll
  for (int i = 0; i < kTokens * kRawChunksPerRow / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kRawChunksPerRow;
    const int col = c % kRawChunksPerRow;
    const uint4 in = *reinterpret_cast<const uint4*>(raw + c * 16);
    uint4 lo, hi;
    widen_fp8x16<T, kE5m2>(in, lo, hi);
    *reinterpret_cast<uint4*>(tile + swizzle<D>(row, 2 * col)) = lo;
    *reinterpret_cast<uint4*>(tile + swizzle<D>(row, 2 * col + 1)) = hi;
  }
}

// Normalises one 8-wide piece of an output row and writes it: the final out/lse (one split) or the
// split's partial (several). Shared by the direct and the split path so that a sequence that falls in
// one split gets the same bits either way.
// tok: the row's token in q's token stride (decode 0); flat: its flat token index (decode_params.h).
template <typename T>
__device__ __forceinline__ void store_row_piece(const DecodeParams& p, int split, int b, int tok, int flat, int head,
                                                int col8, float (&acc)[8], float M, float L, float v_scale) {
  const float inv = L > 0.0f ? v_scale / L : 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] *= inv;
  const float lse2 = L > 0.0f ? M + log2f(L) : neg_inf();
  if (p.num_splits == 1) {
    uint4 v;
    v.x = pack2<T>(acc[0], acc[1]);
    v.y = pack2<T>(acc[2], acc[3]);
    v.z = pack2<T>(acc[4], acc[5]);
    v.w = pack2<T>(acc[6], acc[7]);
    T* out = static_cast<T*>(p.out) + b * p.out_stride_b + tok * p.out_stride_t + head * p.out_stride_h + col8 * 8;
    *reinterpret_cast<uint4*>(out) = v;
    if (col8 == 0) p.lse[b * p.lse_stride_b + tok * p.lse_stride_t + head * p.lse_stride_h] = lse2 * kLn2;
  } else {
    const int64_t row = (static_cast<int64_t>(split) * p.num_tokens + flat) * p.num_heads + head;
    if (L > 0.0f) {  // the merge never reads an empty split's partial
      float4* dst = reinterpret_cast<float4*>(p.ws_out + row * p.head_dim + col8 * 8);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
    if (col8 == 0) p.ws_lse[row] = lse2;
  }
}

// One block: (sequence b, KV head, split, row tile: a chunk of query heads in decode, of (token, head)
// rows in cache attention). Grid: 1-D, batch * Hkv * num_splits * head_chunks blocks, kThreads
// threads, Traits::kSmemBytes dynamic shared memory.
// Two blocks an SM is what the shared memory allows on H100; saying so lets ptxas use up to 255
// registers (without the hint it aims at three blocks, 168 registers, and spills at D >= 128).
template <typename T, typename CacheT, int D, bool kPaged, bool kCacheAttn>
__global__ void __launch_bounds__(kThreads, 2) kvk_decode_kernel(const __grid_constant__ DecodeParams p) {
  using Tr = Traits<T, CacheT, D>;
  constexpr int kT = Tr::kTokens;
  constexpr int kS = Tr::kStages;
  constexpr int R = Tr::kRowsPerThread;
  unsigned char* const smem = dynamic_smem();

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;

  // ---- which block
  uint32_t bid = blockIdx.x;
  const int chunk = bid % p.head_chunks;
  bid /= p.head_chunks;
  const int split = bid % p.num_splits;
  bid /= p.num_splits;
  const int kvh = bid % p.num_kv_heads;
  const int b = bid / p.num_kv_heads;

  // ---- the rows of this block: rows [0, rows) are rows row0 + r of the sequence (decode: its heads)
  const int heads_per_block = 16 * p.m_tiles;
  int n_q = 1;     // the sequence's query tokens
  int tok0 = 0;    // its first token in q's token stride (ragged: global)
  int flat0 = b;   // its first flat token index (decode_params.h)
  if constexpr (kCacheAttn) {
    if (p.cu_seqlens_q != nullptr) {  // clamped, so a bad cu_seqlens_q cannot address outside q
      const int first = min(max(p.cu_seqlens_q[b], 0), p.num_tokens);
      n_q = min(max(p.cu_seqlens_q[b + 1], first), p.num_tokens) - first;
      tok0 = flat0 = first;
    } else {
      n_q = p.tokens_per_seq;
      flat0 = b * p.tokens_per_seq;
    }
  }
  const int row0 = chunk * heads_per_block;
  const int rows = min(heads_per_block, n_q * p.group - row0);
  if (kCacheAttn && rows <= 0) return;  // a row tile past this sequence's queries (uniform: the whole block)
  // Token (within the sequence) and query head of row r of the block.
  const auto row_token = [&](int r) { return kCacheAttn ? (row0 + r) / p.group : 0; };
  const auto row_head = [&](int r) { return kvh * p.group + (kCacheAttn ? (row0 + r) % p.group : row0 + r); };

  // ---- warp roles: dim group (D = 256), query-head tile, token group
  const int dg = warp % Tr::kDimGroups;
  const int mt = (warp / Tr::kDimGroups) % p.m_tiles;
  const int tg = (warp / Tr::kDimGroups) / p.m_tiles;
  const int ntg = Tr::kWarpGroups / p.m_tiles;
  const bool warp_has_heads = mt * 16 < rows;

  // ---- Q fragments (A operand of S = Q K^T), loaded first: they depend on nothing, and their latency
  // overlaps the length and page-table reads below
  const int g = lane >> 2;       // MMA fragment row (and +8)
  const int c2 = 2 * (lane & 3);  // MMA fragment column pair
  uint32_t qa[D / 16][4];
  {
    const int r0 = mt * 16 + g;
    const int r1 = r0 + 8;
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + c2;
    const T* q0 = q + (tok0 + row_token(r0)) * p.q_stride_t + static_cast<int64_t>(row_head(r0)) * p.q_stride_h;
    const T* q1 = q + (tok0 + row_token(r1)) * p.q_stride_t + static_cast<int64_t>(row_head(r1)) * p.q_stride_h;
    const bool ok0 = r0 < rows;
    const bool ok1 = r1 < rows;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      qa[ks][0] = ok0 ? *reinterpret_cast<const uint32_t*>(q0 + 16 * ks) : 0u;
      qa[ks][1] = ok1 ? *reinterpret_cast<const uint32_t*>(q1 + 16 * ks) : 0u;
      qa[ks][2] = ok0 ? *reinterpret_cast<const uint32_t*>(q0 + 16 * ks + 8) : 0u;
      qa[ks][3] = ok1 ? *reinterpret_cast<const uint32_t*>(q1 + 16 * ks + 8) : 0u;
    }
  }

  // ---- the positions [lo, hi) this split attends: of the block's range [start, end)
  const int len = min(max(p.seqlens[b * p.seqlens_stride], 0), p.capacity);
  int start = p.window_left >= 0 ? max(0, len - p.window_left - 1) : 0;
  int end = len;
  // Cache attention: rows g, g + 8 of this warp see positions [row_lo[k], row_hi[k]) (row_hi 0: none).
  int row_lo[2] = {0, 0}, row_hi[2] = {0, 0};
  if constexpr (kCacheAttn) {
    // Rows are token-major: the first row has the earliest window start, the last the latest limit.
    const int pos0 = len - n_q;  // position of token 0 (negative when n_q > len: those queries see nothing)
    const int first_p = pos0 + row_token(0);
    const int last_p = pos0 + row_token(rows - 1);
    start = p.window_left >= 0 ? max(0, first_p - p.window_left) : 0;
    end = max(p.causal ? min(len, last_p + 1) : len, 0);
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int r = mt * 16 + g + 8 * k;
      if (r < rows) {
        const int pq = pos0 + row_token(r);
        row_hi[k] = p.causal ? min(pq + 1, len) : len;
        row_lo[k] = p.window_left >= 0 ? max(pq - p.window_left, 0) : 0;
      }
    }
  }
  // ALiBi of rows g, g + 8: slope in log2 units (0 for no bias or no row) and the row's position.
  const bool has_alibi = p.alibi_slopes != nullptr;
  float alibi[2] = {0.0f, 0.0f};
  int alibi_pos[2] = {len - 1, len - 1};
  if (has_alibi) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int r = mt * 16 + g + 8 * k;
      if (r < rows) {
        alibi[k] = p.alibi_slopes[b * p.alibi_stride_b + row_head(r)] * kLog2e;
        if constexpr (kCacheAttn) alibi_pos[k] = len - n_q + row_token(r);
      }
    }
  }
  const int64_t first = start + static_cast<int64_t>(split) * p.split_tokens;
  const int lo = static_cast<int>(min(first, static_cast<int64_t>(end)));
  const int hi = static_cast<int>(min(first + p.split_tokens, static_cast<int64_t>(end)));
  const int n = hi - lo;
  const int num_tiles = (n + kT - 1) / kT;

  // ---- shared memory
  const uint32_t smem_base = smem_u32(smem);
  const uint32_t k_stages = smem_base;
  const uint32_t v_stages = smem_base + kS * Tr::kStageBytes;
  unsigned char* const widened = smem + 2 * kS * Tr::kStageBytes;  // fp8: K tile, then V tile
  unsigned char* const flags = smem + Tr::kPipeBytes;               // paged: [kS][kT] row flags

  // ---- prologue: page lookups of the first kS tiles in flight together, then kS - 1 tiles of copies
  const TileLoader<T, CacheT, D, kPaged> loader(p, b, kvh, lo, hi, tid);
  int pages[kS][R];
#pragma unroll
  for (int s = 0; s < kS; ++s) loader.fetch_pages(s, pages[s]);
#pragma unroll
  for (int s = 0; s < kS - 1; ++s) {
    if (s < num_tiles) {
      loader.issue(s, k_stages + s * Tr::kStageBytes, v_stages + s * Tr::kStageBytes, flags + s * kT, pages[s]);
    }
    cp_async_commit();
  }
  int next_pages[R];
#pragma unroll
  for (int j = 0; j < R; ++j) next_pages[j] = pages[kS - 1][j];

  // ---- score scale (log2 domain) with the K scale folded in (fp8 always; 16-bit caches when given)
  const float k_scale = p.k_scale != nullptr ? p.k_scale[kvh * p.k_scale_stride] : 1.0f;
  const float v_scale = p.v_scale != nullptr ? p.v_scale[kvh * p.v_scale_stride] : 1.0f;
  const bool use_softcap = p.softcap > 0.0f;
  const float qk_scale = p.softmax_scale * k_scale;
  const float score_mul = use_softcap ? qk_scale / p.softcap : qk_scale * kLog2e;  // before tanh / final
  const float softcap_log2 = p.softcap * kLog2e;

  // ---- per-warp online-softmax state for rows g and g + 8 of its head tile
  constexpr int kOTiles = Tr::kDimsPerWarp / 8;
  float o[kOTiles][4];
#pragma unroll
  for (int i = 0; i < kOTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m0 = neg_inf(), m1 = neg_inf();  // running max (log2 units)
  float l0 = 0.0f, l1 = 0.0f;            // running sum of this thread's columns (quad-reduced at the end)

  // ---- main loop over tiles
  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<kS - 2>();
    __syncthreads();  // tile's copies visible to all; every warp is done with the stage reused below
    {
      const int ahead = tile + kS - 1;
      if (ahead < num_tiles) {
        const int st = ahead % kS;
        loader.issue(ahead, k_stages + st * Tr::kStageBytes, v_stages + st * Tr::kStageBytes, flags + st * kT,
                     next_pages);
        loader.fetch_pages(ahead + 1, next_pages);
      }
      cp_async_commit();
    }
    const int st = tile % kS;
    uint32_t k_tile, v_tile;
    if (Tr::kFp8) {
      const unsigned char* k_raw = smem + st * Tr::kStageBytes;
      const unsigned char* v_raw = smem + kS * Tr::kStageBytes + st * Tr::kStageBytes;
      if (p.fp8_e5m2) {
        widen_tile<T, D, kT, true>(k_raw, widened, tid);
        widen_tile<T, D, kT, true>(v_raw, widened + Tr::kTileBytes, tid);
      } else {
        widen_tile<T, D, kT, false>(k_raw, widened, tid);
        widen_tile<T, D, kT, false>(v_raw, widened + Tr::kTileBytes, tid);
      }
      __syncthreads();
      k_tile = smem_u32(widened);
      v_tile = smem_u32(widened + Tr::kTileBytes);
    } else {
      k_tile = k_stages + st * Tr::kStageBytes;
      v_tile = v_stages + st * Tr::kStageBytes;
    }
    if (!warp_has_heads) continue;

    const int tile_valid = n - tile * kT;  // > 0
    for (int sb = tg; sb < kT / 16; sb += ntg) {
      const int valid = tile_valid - sb * 16;  // tokens of this sub-block inside the split
      if (valid <= 0) break;
      // Tokens [lim_lo, lim_hi) of the sub-block seen by rows g (0) and g + 8 (1): decode sees all valid.
      int lim_lo[2] = {0, 0}, lim_hi[2] = {valid, valid};
      if constexpr (kCacheAttn) {
        const int base = lo + tile * kT + sb * 16;  // position of token 0 of the sub-block
        bool none = true;
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          lim_lo[k] = row_lo[k] - base;
          lim_hi[k] = min(valid, row_hi[k] - base);
          none = none && min(lim_hi[k], 16) <= max(lim_lo[k], 0);
        }
        // None of the warp's rows sees this sub-block (above the causal diagonal, or before every
        // row's window): skip its MMAs. Warp-uniform, as ldmatrix needs.
        if (__all_sync(0xffffffffu, none)) continue;
      }

      // S = Q K^T for 16 heads x 16 tokens: s[0] tokens 0-7, s[1] tokens 8-15
      float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      {
        const int krow = sb * 16 + ((lane >> 4) << 3) + (lane & 7);
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          uint32_t kb[4];
          ldmatrix_x4(kb, k_tile + swizzle<D>(krow, 2 * ks + ((lane >> 3) & 1)));
          mma_m16n8k16<T>(s[0], qa[ks], kb[0], kb[1]);
          mma_m16n8k16<T>(s[1], qa[ks], kb[2], kb[3]);
        }
      }

      // scores in log2 units; tokens past the split (and paged: rows of an invalid page) are -inf
      uint32_t row_ok = 0xFFFFFFFFu;  // bit t: token t of the sub-block may be attended
      if (kPaged) {
        const unsigned char* f = flags + st * kT + sb * 16 + c2;
        row_ok = (f[0] << c2) | (f[1] << (c2 + 1)) | (f[8] << (c2 + 8)) | (f[9] << (c2 + 9));
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[j][e] * score_mul;
          if (use_softcap) {
            // tanh(x) = 1 - 2 / (1 + e^{2x}): absolute error ~1e-7, no cancellation issue for the
            // softmax (shift-invariant), saturates cleanly to +-1.
            const float e2x = exp2_approx(x * (2.0f * kLog2e));
            x = softcap_log2 * (1.0f - __fdividef(2.0f, 1.0f + e2x));
          }
          const int token = 8 * j + c2 + (e & 1);
          if (has_alibi) {  // uniform branch; one FMA a score, after the softcap
            const int dist = alibi_pos[e >> 1] - (lo + tile * kT + sb * 16 + token);
            x = fmaf(-alibi[e >> 1], static_cast<float>(dist < 0 ? -dist : dist), x);
          }
          bool seen = token < lim_hi[e >> 1] && ((row_ok >> token) & 1u);
          if (kCacheAttn) seen = seen && token >= lim_lo[e >> 1];
          s[j][e] = seen ? x : neg_inf();
        }
      }

      // online softmax: new running max of rows g (m0) and g + 8 (m1), shared by the quad
      float mx0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
      float mx1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float mn0 = fmaxf(m0, mx0);
      const float mn1 = fmaxf(m1, mx1);
      // O and l only need rescaling where a row that already holds mass sees a larger max.
      const bool grow = (mn0 > m0 && m0 != neg_inf()) || (mn1 > m1 && m1 != neg_inf());
      if (__any_sync(0xffffffffu, grow)) {
        const float a0 = mn0 == m0 ? 1.0f : exp2_approx(m0 - mn0);
        const float a1 = mn1 == m1 ? 1.0f : exp2_approx(m1 - mn1);
#pragma unroll
        for (int i = 0; i < kOTiles; ++i) {
          o[i][0] *= a0;
          o[i][1] *= a0;
          o[i][2] *= a1;
          o[i][3] *= a1;
        }
        l0 *= a0;
        l1 *= a1;
      }
      m0 = mn0;
      m1 = mn1;
      // a row with nothing visible yet keeps max -inf: subtract 0 instead (exp2(-inf) = 0 everywhere)
      const float base0 = mn0 == neg_inf() ? 0.0f : mn0;
      const float base1 = mn1 == neg_inf() ? 0.0f : mn1;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        s[j][0] = exp2_approx(s[j][0] - base0);
        s[j][1] = exp2_approx(s[j][1] - base0);
        s[j][2] = exp2_approx(s[j][2] - base1);
        s[j][3] = exp2_approx(s[j][3] - base1);
      }
      l0 += (s[0][0] + s[0][1]) + (s[1][0] + s[1][1]);
      l1 += (s[0][2] + s[0][3]) + (s[1][2] + s[1][3]);

      // O += P V; P (16 x 16 tokens) is the A operand straight from the S accumulators
      const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                              pack2<T>(s[1][2], s[1][3])};
      const int vrow = sb * 16 + (((lane >> 3) & 1) << 3) + (lane & 7);
#pragma unroll
      for (int np = 0; np < kOTiles / 2; ++np) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_tile + swizzle<D>(vrow, dg * (Tr::kDimsPerWarp / 8) + 2 * np + (lane >> 4)));
        mma_m16n8k16<T>(o[2 * np], pa, vb[0], vb[1]);
        mma_m16n8k16<T>(o[2 * np + 1], pa, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the merge area

  // ---- merge the warp states through shared memory (slot = token group * head rows + row)
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  float* const m_s = reinterpret_cast<float*>(smem);
  float* const l_s = m_s + Tr::kSlots;
  float* const o_s = l_s + Tr::kSlots;
  if (warp_has_heads) {
    const int slot0 = tg * heads_per_block + mt * 16 + g;
    const int slot1 = slot0 + 8;
    if (dg == 0 && (lane & 3) == 0) {
      m_s[slot0] = m0;
      l_s[slot0] = l0;
      m_s[slot1] = m1;
      l_s[slot1] = l1;
    }
#pragma unroll
    for (int i = 0; i < kOTiles; ++i) {
      const int col = dg * Tr::kDimsPerWarp + 8 * i + c2;
      *reinterpret_cast<float2*>(o_s + slot0 * Tr::kMergeStride + col) = make_float2(o[i][0], o[i][1]);
      *reinterpret_cast<float2*>(o_s + slot1 * Tr::kMergeStride + col) = make_float2(o[i][2], o[i][3]);
    }
  }
  __syncthreads();

  constexpr int kPieces = D / 8;  // 8-wide pieces of an output row
  for (int item = tid; item < rows * kPieces; item += kThreads) {
    const int r = item / kPieces;
    const int col8 = item % kPieces;
    float M = neg_inf();
    for (int t = 0; t < ntg; ++t) M = fmaxf(M, m_s[t * heads_per_block + r]);
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    float L = 0.0f;
    if (M != neg_inf()) {
      for (int t = 0; t < ntg; ++t) {
        const int slot = t * heads_per_block + r;
        const float mt_ = m_s[slot];
        if (mt_ == neg_inf()) continue;  // a warp that saw no token of this split
        const float w = mt_ == M ? 1.0f : exp2_approx(mt_ - M);
        L += w * l_s[slot];
        const float4* src = reinterpret_cast<const float4*>(o_s + slot * Tr::kMergeStride + col8 * 8);
        const float4 a = src[0], c = src[1];
        acc[0] += w * a.x;
        acc[1] += w * a.y;
        acc[2] += w * a.z;
        acc[3] += w * a.w;
        acc[4] += w * c.x;
        acc[5] += w * c.y;
        acc[6] += w * c.z;
        acc[7] += w * c.w;
      }
    }
    store_row_piece<T>(p, split, b, tok0 + row_token(r), flat0 + row_token(r), row_head(r), col8, acc, M, L, v_scale);
  }
}

// Combines the split partials of every (query token, query head): one warp per row, splits in order.
// Grid: ceil(num_tokens * Hq / kWarps) blocks of kThreads threads (decode: num_tokens = B).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) kvk_decode_merge_kernel(const __grid_constant__ DecodeParams p) {
  constexpr int kPerLane = D / 32;  // 2, 4 or 8 floats
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);  // flat token * Hq + head
  if (row >= static_cast<int64_t>(p.num_tokens) * p.num_heads) return;
  const int flat = static_cast<int>(row / p.num_heads);
  const int head = static_cast<int>(row % p.num_heads);
  const int b = flat / p.tokens_per_seq;    // decode: flat itself
  const int tok = flat % p.tokens_per_seq;  // decode: 0
  const int64_t split_stride = static_cast<int64_t>(p.num_tokens) * p.num_heads;

  float M = neg_inf();
  for (int s = lane; s < p.num_splits; s += 32) M = fmaxf(M, p.ws_lse[s * split_stride + row]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));

  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.0f;
  float L = 0.0f;
  if (M != neg_inf()) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float ls = p.ws_lse[s * split_stride + row];
      if (ls == neg_inf()) continue;  // empty split: no partial was written
      const float w = ls == M ? 1.0f : exp2f(ls - M);
      L += w;
      const float* src = p.ws_out + (s * split_stride + row) * D + lane * kPerLane;
      if constexpr (kPerLane % 4 == 0) {  // 16-byte loads
#pragma unroll
        for (int i = 0; i < kPerLane; i += 4) {
          const float4 v = *reinterpret_cast<const float4*>(src + i);
          acc[i] += w * v.x;
          acc[i + 1] += w * v.y;
          acc[i + 2] += w * v.z;
          acc[i + 3] += w * v.w;
        }
      } else {
        const float2 v = *reinterpret_cast<const float2*>(src);
        acc[0] += w * v.x;
        acc[1] += w * v.y;
      }
    }
  }
  const float inv = L > 0.0f ? 1.0f / L : 0.0f;
  uint32_t packed[kPerLane / 2];
#pragma unroll
  for (int i = 0; i < kPerLane; i += 2) packed[i / 2] = pack2<T>(acc[i] * inv, acc[i + 1] * inv);
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + tok * p.out_stride_t + head * p.out_stride_h + lane * kPerLane;
  if constexpr (kPerLane == 8) {
    *reinterpret_cast<uint4*>(out) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  } else if constexpr (kPerLane == 4) {
    *reinterpret_cast<uint2*>(out) = make_uint2(packed[0], packed[1]);
  } else {
    *reinterpret_cast<uint32_t*>(out) = packed[0];
  }
  if (lane == 0) {
    p.lse[b * p.lse_stride_b + tok * p.lse_stride_t + head * p.lse_stride_h] =
        L > 0.0f ? (M + log2f(L)) * kLn2 : neg_inf();
  }
}

}  // namespace decode
}  // namespace kvk
