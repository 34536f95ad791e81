// Flash-attention forward for sm_90a (H100/H200): wgmma tensor cores, TMA loads into 128-byte
// swizzled shared memory, mbarrier pipelines, warp specialisation with register reallocation.
// CUDA headers only. The kernel body exists only when compiling for sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL) and for the CPU emulator (KVK_EMULATE); in the sm_80 cubin it is a
// trap that the host never launches.
//
// Block = 3 warpgroups (384 threads) for kBlockM = 128 query rows of one (sequence, head):
//   warpgroup 0, producer: gives registers back (setmaxnreg 24); one thread issues the TMA loads
//     of Q once and of K_j / V_j into a ring of kStages stages, each stage guarded by a "full"
//     mbarrier (TMA bytes landed) and an "empty" mbarrier (all 8 consumer warps done reading).
//   warpgroups 1, 2, consumers (setmaxnreg 240): 64 query rows each. Per key tile j:
//       S_j = Q K_j^T                       wgmma m64 n(kBlockN) k16, operands in shared memory
//       O  = O * 2^(m_{j-2} - m_{j-1})      rescale while S_j runs on the tensor cores (D <= 128)
//       O += P_{j-1} V_{j-1}                wgmma m64 n(D) k16, P from registers, issued before
//                                           the softmax of S_j so the tensor cores work on it
//                                           while this warpgroup does the softmax (FA3's
//                                           intra-warpgroup overlap)
//       softmax(S_j) -> P_j                 once P_{j-1} V_{j-1} is done, P_j replaces it
//   and finally O += P_last V_last, normalise, write through shared memory with 16-byte stores.
// The two consumer warpgroups are independent, so one's softmax also overlaps the other's MMAs.
// Softmax, masking, LSE: identical math to the sm80 kernel (prefill_common.cuh).
#pragma once

#include <cuda.h>  // CUtensorMap (type only; the driver is reached through cudaGetDriverEntryPointByVersion)
#include <cuda_runtime.h>

#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "common/vec.cuh"
#include "kernels/prefill_common.cuh"
#include "kernels/prefill_config.h"
#include "kernels/prefill_wgmma.cuh"

namespace kvk {
namespace prefill {

template <typename T_, int D>
struct Sm90Config : Sm90Shape<D> {
  using T = T_;
  static constexpr int kConsumerWarps = Sm90Shape<D>::kConsumerWarpgroups * 4;
  // Register budget after reallocation: 128 * 24 + 256 * 240 = 64512 <= 65536 per SM.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // Rescale O while Q K^T runs (see the main loop); at D = 256 the extra live range spills.
  static constexpr bool kEarlyRescale = D <= 128;
};

constexpr int kConsumerBarrier = 1;  // named barrier of the consumer warpgroups (0 is __syncthreads)

// Byte offset of element (row, col) in a shared tile stored as 64-column panels of `rows` rows,
// 128-byte swizzled (the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B).
template <int ROWS>
__device__ __forceinline__ int panel_offset(int row, int col) {
  return (col >> 6) * ROWS * 128 + row * 128 + ((((col & 63) >> 3) ^ (row & 7)) << 4) + ((col & 7) << 1);
}

// Grid: x = query row block (heaviest first), y = query head, z = sequence. Block: 384 threads.
// Dynamic shared memory: Sm90Shape<D>::kSmemBytes.
//   tmap_q: q as 4-D (D, rows, Hq, batch) box (64, kBlockM, 1, 1); varlen: rows = Tq, batch = 1
//   tmap_k: k as 4-D (D, rows, Hkv, batch) box (64, kBlockN, 1, 1)
//   tmap_v: v likewise
template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    kvk_prefill_sm90_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_k,
                            const __grid_constant__ CUtensorMap tmap_v, const PrefillParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(KVK_EMULATE)
  using namespace sm90;
  using T = typename Cfg::T;
  constexpr int D = Cfg::kHeadDim;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int kStages = Cfg::kStages;
  constexpr int kPanels = Cfg::kPanels;
  constexpr int kSRegs = BN / 2;  // S accumulator registers per consumer thread
  constexpr int kORegs = D / 2;   // O accumulator registers per consumer thread

  unsigned char* smem_raw = dynamic_smem();
  // Tiles on 1024-byte boundaries (the 128-byte swizzle atom); kSmemBytes reserves the slack.
  unsigned char* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  T* sQ = reinterpret_cast<T*>(smem);                                          // [kPanels][BM][64]
  T* sK = reinterpret_cast<T*>(smem + Cfg::kQBytes);                           // [kStages][kPanels][BN][64]
  T* sV = reinterpret_cast<T*>(smem + Cfg::kQBytes + kStages * Cfg::kKVBytes);  // [kStages][kPanels][BN][64]
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Cfg::kQBytes + 2 * kStages * Cfg::kKVBytes);
  uint64_t* q_full = bars;
  uint64_t* k_full = bars + 1;
  uint64_t* v_full = bars + 1 + kStages;
  uint64_t* k_empty = bars + 1 + 2 * kStages;
  uint64_t* v_empty = bars + 1 + 3 * kStages;
  static_assert((1 + 4 * kStages) * 8 <= Cfg::kBarrierBytes, "barrier space");

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const SeqView seq = seq_view(p, b, head);
  const int m_start = m_block * BM;
  if (m_start >= seq.sq) return;  // uniform over the block
  const Mask mask = make_mask(p, seq);
  const int m_last = min(m_start + BM, seq.sq) - 1;
  int tile_begin, n_tiles;
  mask.tile_range(m_start, m_last, BN, &tile_begin, &n_tiles);

  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;

  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&k_full[s], 1);
      mbar_init(&v_full[s], 1);
      mbar_init(&k_empty[s], Cfg::kConsumerWarps);
      mbar_init(&v_empty[s], Cfg::kConsumerWarps);
    }
    mbar_fence_init();
  }
  __syncthreads();

  // Tensor-map coordinates: dense maps index (d, row in sequence, head, batch); varlen maps have
  // one batch and index rows of the packed tensor.
  const int b_coord = p.cu_seqlens_q != nullptr ? 0 : b;

  if (warpgroup == 0) {
    // ------------------------------------------------------------------------- producer
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid == 0 && n_tiles > 0) {
      const int kv_head = head / (p.num_heads / p.num_kv_heads);
      mbar_arrive_expect_tx(q_full, Cfg::kQBytes);
#pragma unroll
      for (int pn = 0; pn < kPanels; ++pn)
        tma_load_4d(sQ + pn * BM * 64, &tmap_q, q_full, pn * 64, seq.q_row0 + m_start, head, b_coord);
      for (int it = 0; it < n_tiles; ++it) {
        const int stage = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        const int row = seq.k_row0 + (tile_begin + it) * BN;
        mbar_wait(&k_empty[stage], phase ^ 1);
        mbar_arrive_expect_tx(&k_full[stage], Cfg::kKVBytes);
#pragma unroll
        for (int pn = 0; pn < kPanels; ++pn)
          tma_load_4d(sK + (stage * kPanels + pn) * BN * 64, &tmap_k, &k_full[stage], pn * 64, row, kv_head, b_coord);
        mbar_wait(&v_empty[stage], phase ^ 1);
        mbar_arrive_expect_tx(&v_full[stage], Cfg::kKVBytes);
#pragma unroll
        for (int pn = 0; pn < kPanels; ++pn)
          tma_load_4d(sV + (stage * kPanels + pn) * BN * 64, &tmap_v, &v_full[stage], pn * 64, row, kv_head, b_coord);
      }
    }
    return;
  }

  // --------------------------------------------------------------------------- consumers
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int cw = warpgroup - 1;               // consumer warpgroup: rows [64 cw, 64 cw + 64) of the block
  const int warp_in_wg = (tid % 128) / 32;
  const int lane = tid % 32;
  const int row_a = m_start + cw * 64 + warp_in_wg * 16 + (lane >> 2);  // rows row_a, row_a + 8
  const int col_a = 2 * (lane & 3);

  float o[kORegs];
#pragma unroll
  for (int i = 0; i < kORegs; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};

  if (n_tiles > 0) {
    float s[kSRegs];  // the first k16 step of every S overwrites it (accumulate = 0)
#pragma unroll
    for (int i = 0; i < kSRegs; ++i) s[i] = 0.0f;
    uint32_t pf[BN / 16][4];  // P of the previous tile as wgmma A fragments (k16 steps)
    const T* sQw = sQ + cw * 64 * 64;  // this warpgroup's 64 rows inside each Q panel

    // S_j = Q K_j^T into s (K-major operands: Q rows of this warpgroup, K tile of `stage`).
    const auto issue_qk = [&](int stage) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t da = smem_desc(sQw + (kk / 4) * BM * 64 + (kk % 4) * 16, 16, 1024);
        const uint64_t db = smem_desc(sK + (stage * kPanels + kk / 4) * BN * 64 + (kk % 4) * 16, 16, 1024);
        Wgmma<T, BN>::ss(s, da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
    };
    // O += P V_stage (P from pf, V N-major: panels of 64 head-dim columns, BN rows each).
    const auto issue_pv = [&](int stage) {
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint64_t dv = smem_desc(sV + stage * kPanels * BN * 64 + kk * 16 * 64, BN * 128, 1024);
        Wgmma<T, D>::rs(o, pf[kk], dv);
      }
      wgmma_commit();
    };
    // A boundary tile's V rows outside the keys the block sees, [key_lo, key_hi) (rows before the
    // window's start, rows past the sequence's end: the next sequence's or padding), are zeroed
    // before P V reads them: P is 0 there, but 0 * NaN is not 0. TMA loads whole tiles and zero-fills
    // only past the whole tensor. Both consumer warpgroups read the stage: they share the stores
    // and meet at a named barrier (the condition is uniform over the block).
    int key_lo, key_hi;
    mask.key_range(m_start, m_last, &key_lo, &key_hi);
    const auto clean_v = [&](int it, int stage) {
      const int n0 = (tile_begin + it) * BN;
      if (n0 >= key_lo && n0 + BN <= key_hi) return;
      unsigned char* tile = reinterpret_cast<unsigned char*>(sV + stage * kPanels * BN * 64);
      for (int c = tid - 128; c < kPanels * BN * 8; c += Cfg::kConsumerWarps * 32) {  // 16-byte chunks
        const int key = n0 + (c / 8) % BN;  // a row's 8 chunks are its 128 bytes, whatever the swizzle
        if (key < key_lo || key >= key_hi) *reinterpret_cast<uint4*>(tile + c * 16) = make_uint4(0u, 0u, 0u, 0u);
      }
      fence_proxy_async();  // the stores before wgmma's async-proxy reads
      named_barrier_sync(kConsumerBarrier, Cfg::kConsumerWarps * 32);
    };
    const auto release = [&](uint64_t* bar) {
      __syncwarp();
      if (lane == 0) mbar_arrive(bar);
    };
    const auto softmax_to_p = [&](int it, float (&scale_o)[2]) {
      const int n0 = (tile_begin + it) * BN;
      softmax_tile(s, row_max, row_sum, scale_o, p, mask, mask.needs_mask(m_start, m_last, n0, BN), row_a,
                   n0 + col_a);
    };
    const auto pack_p = [&]() {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pf[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
        pf[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
        pf[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
        pf[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };

    mbar_wait(q_full, 0);
    // rescale: 2^(m_old - m_new) of the latest softmax. With kEarlyRescale, O is rescaled just
    // before the P V that brings it up to date is issued, so the multiplies overlap the Q K^T in
    // flight: after tile j, O = 2^(m_{j-2} - m_{j-1}) * O + P_{j-1} V_{j-1} (relative to m_{j-1}).
    // Otherwise (D = 256, where O alone is 128 registers and the early form spills) O is rescaled
    // once P_{j-1} V_{j-1} is done: O = 2^(m_{j-1} - m_j) * (O + P_{j-1} V_{j-1}).
    float rescale[2];
    const auto scale_o = [&]() {
#pragma unroll
      for (int i = 0; i < kORegs; ++i) o[i] *= rescale[(i >> 1) & 1];
    };
    // Tile 0: nothing to overlap with yet; O is still zero.
    mbar_wait(&k_full[0], 0);
    issue_qk(0);
    wgmma_wait<0>();
    fence_regs(s);
    release(&k_empty[0]);
    softmax_to_p(0, rescale);
    pack_p();
    for (int it = 1; it < n_tiles; ++it) {
      const int stage = it % kStages;
      const int prev = (it - 1) % kStages;
      mbar_wait(&k_full[stage], (it / kStages) & 1);
      issue_qk(stage);                                   // S_it = Q K_it^T
      if constexpr (Cfg::kEarlyRescale) scale_o();
      mbar_wait(&v_full[prev], ((it - 1) / kStages) & 1);
      clean_v(it - 1, prev);
      issue_pv(prev);                                    // O += P_{it-1} V_{it-1}, runs under the softmax
      wgmma_wait<1>();                                   // S_it done (groups complete in order)
      fence_regs(s);
      release(&k_empty[stage]);
      softmax_to_p(it, rescale);
      wgmma_wait<0>();                                   // P_{it-1} V_{it-1} done: pf may be rewritten
      fence_regs(o);
      release(&v_empty[prev]);
      if constexpr (!Cfg::kEarlyRescale) scale_o();
      pack_p();
    }
    const int last = (n_tiles - 1) % kStages;
    if constexpr (Cfg::kEarlyRescale) scale_o();
    mbar_wait(&v_full[last], ((n_tiles - 1) / kStages) & 1);
    clean_v(n_tiles - 1, last);
    issue_pv(last);                                      // O += P_last V_last
    wgmma_wait<0>();
    fence_regs(o);
    release(&v_empty[last]);
  }

  // ---- epilogue: normalise; each warp stages its 16 rows in its own rows of the Q tile (no
  // other warp reads them any more), then writes whole rows with 16-byte stores.
  float inv_sum[2], lse[2];
  finish_rows(row_max, row_sum, inv_sum, lse);
  unsigned char* stage_base = reinterpret_cast<unsigned char*>(sQ);
  const int r_local = cw * 64 + warp_in_wg * 16 + (lane >> 2);  // row within the block tile
#pragma unroll
  for (int i = 0; i < kORegs; i += 2) {
    const int h = (i >> 1) & 1;
    const int col = (i >> 2) * 8 + col_a;
    *reinterpret_cast<uint32_t*>(stage_base + panel_offset<BM>(r_local + 8 * h, col)) =
        pack2<T>(o[i] * inv_sum[h], o[i + 1] * inv_sum[h]);
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + seq.o_offset;
  constexpr int kChunks = D / 8;
  const int warp_row0 = cw * 64 + warp_in_wg * 16;
#pragma unroll
  for (int i = 0; i < 16 * kChunks / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = idx / kChunks, c = idx % kChunks;
    const int row = m_start + warp_row0 + r;
    if (row < seq.sq) {
      const uint4 val = *reinterpret_cast<const uint4*>(stage_base + panel_offset<BM>(warp_row0 + r, c * 8));
      st_global_16(out + int64_t(row) * p.o_row_stride + c * 8, val);
    }
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row_a + 8 * h;
      if (row < seq.sq) p.lse[seq.lse_offset + row] = lse[h];
    }
  }
#else
  // Not an sm_90a target: the host only launches this kernel on compute capability 9.0.
  __trap();
#endif
}

// ------------------------------------------------------------------------------------- host

// cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda at link time).
cudaError_t encode_tensor_map(CUtensorMap* map, CUtensorMapDataType dtype, const void* base, int head_dim,
                              int64_t rows, int64_t heads, int64_t batches, int64_t row_stride, int64_t head_stride,
                              int64_t batch_stride, int box_rows);

template <typename T>
struct TensorMapDtype;
template <>
struct TensorMapDtype<__half> {
  static constexpr CUtensorMapDataType value = CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
};
template <>
struct TensorMapDtype<__nv_bfloat16> {
  static constexpr CUtensorMapDataType value = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
};

// Host side: tensor maps, grid and launch of one (dtype, head dim). The caller has checked that
// the device is compute capability 9.0, that base pointers are 16-byte aligned, every stride is a
// non-zero multiple of 8 elements, and that q and k have at least one row.
template <typename T, int D>
cudaError_t launch_sm90(const PrefillParams& p, cudaStream_t stream) {
  using Cfg = Sm90Config<T, D>;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t q_rows = varlen ? p.total_q : p.seqlen_q;
  const int64_t k_rows = varlen ? p.total_k : p.seqlen_k;
  const int64_t batches = varlen ? 1 : p.batch;
  // A varlen map has a single batch; its batch stride only has to be a valid multiple of 16 bytes.
  const int64_t q_bs = varlen ? q_rows * p.q_row_stride : p.q_batch_stride;
  const int64_t k_bs = varlen ? k_rows * p.k_row_stride : p.k_batch_stride;
  const int64_t v_bs = varlen ? k_rows * p.v_row_stride : p.v_batch_stride;
  constexpr CUtensorMapDataType dt = TensorMapDtype<T>::value;
  CUtensorMap tq, tk, tv;
  cudaError_t err;
  if ((err = encode_tensor_map(&tq, dt, p.q, D, q_rows, p.num_heads, batches, p.q_row_stride, p.q_head_stride, q_bs,
                               Cfg::kBlockM)) != cudaSuccess)
    return err;
  if ((err = encode_tensor_map(&tk, dt, p.k, D, k_rows, p.num_kv_heads, batches, p.k_row_stride, p.k_head_stride,
                               k_bs, Cfg::kBlockN)) != cudaSuccess)
    return err;
  if ((err = encode_tensor_map(&tv, dt, p.v, D, k_rows, p.num_kv_heads, batches, p.v_row_stride, p.v_head_stride,
                               v_bs, Cfg::kBlockN)) != cudaSuccess)
    return err;
  auto kernel = kvk_prefill_sm90_kernel<Cfg>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM, p.num_heads, p.batch);
  KVK_LAUNCH(grid, Cfg::kThreads, Cfg::kSmemBytes, stream, kernel)(tq, tk, tv, p);
  return cudaGetLastError();
}

}  // namespace prefill
}  // namespace kvk
