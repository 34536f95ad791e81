// Flash-attention forward for sm_80 and newer: mma.sync m16n8k16 tensor cores, ldmatrix,
// cp.async double buffering of K/V tiles, online softmax in registers (exp2), XOR-swizzled shared
// memory. CUDA headers only.
//
// One block computes kBlockM query rows of one (sequence, query head) against every key tile the
// mask lets them see; each warp owns 16 rows and never exchanges data with other warps, so the
// only block-wide barriers are the two per key tile that hand K and V buffers over.
//
// Per tile j (K/V double buffered, loads of tile j+1 in flight while tile j is computed):
//   S = Q K_j^T                    (fp32 accumulators, 16 x kBlockN per warp)
//   x = S * scale * log2(e)        (or softcap * log2(e) * tanh(S * scale / softcap)); mask -> -inf
//   m' = max(m, rowmax x);  P = 2^(x - m');  l = l * 2^(m - m') + rowsum P;  O = O * 2^(m - m')
//   O += P V_j                     (P rounded to the input dtype, as the A operand of the MMA)
// End: O /= l; lse = (m + log2 l) * ln 2. A row that saw no key has l == 0: out 0, lse -inf.
#pragma once

#include <cuda_runtime.h>

#include "common/launch.cuh"
#include "common/ptx.cuh"
#include "common/vec.cuh"
#include "kernels/prefill_common.cuh"
#include "kernels/prefill_config.h"

namespace kvk {
namespace prefill {

// Element offset of (row, 16-byte chunk) in a [rows][D] tile of 16-bit values. Rows are 128, 256
// or 512 bytes, so without a swizzle the 8 row addresses of an ldmatrix phase would all fall in
// the same 4 banks; XOR-ing the chunk index with row % 8 spreads them over all 32 banks (and keeps
// the cp.async writes, one 16-byte chunk per thread, conflict-free too).
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Cooperative copy of rows [0, ROWS) of a global tile into a swizzled shared tile; only rows
// [row_lo, row_hi) are read, the others become zeros. For K/V tiles that range is the keys some
// row of the block sees: a key before the window's start or past the sequence is never read, so
// a NaN or inf stored there cannot reach the output through P = 0 times V.
template <int ROWS, int D, int NT, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int row_lo, int row_hi,
                                                int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert((ROWS * kChunks) % NT == 0, "tile must split evenly over the block");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / NT; ++i) {
    const int idx = tid + i * NT;
    const int row = idx / kChunks, chunk = idx % kChunks;
    const bool valid = row >= row_lo && row < row_hi;
    const T* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
    cp_async_16(smem + swz<D>(row, chunk), src, valid);
  }
}

// One fp32 load kept where it is written (a volatile asm is not hoisted): the ALiBi slope is read
// next to its use in every tile, so nothing extra stays live across the MMAs (at D = 256 that register
// is a spill on sm_90a). The emulator and the host pass read it plainly.
__device__ __forceinline__ float load_in_place(const float* ptr) {
#if defined(__CUDA_ARCH__)
  float v;
  asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(ptr));
  return v;
#else
  return *ptr;
#endif
}

template <typename T_, int D>
struct Sm80Config : Sm80Shape<D> {
  using T = T_;
};

// Grid: x = query row block (heaviest first), y = query head, z = sequence. Block: kThreads.
// Dynamic shared memory: Sm80Shape<D>::kSmemBytes.
template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) kvk_prefill_sm80_kernel(const PrefillParams p) {
  using T = typename Cfg::T;
  constexpr int D = Cfg::kHeadDim;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int NT = Cfg::kThreads;
  constexpr int kNTilesS = BN / 8;  // n8 tiles of S per warp
  constexpr int kNTilesO = D / 8;   // n8 tiles of O per warp
  constexpr int kKSteps = D / 16;   // k16 steps of Q K^T

  unsigned char* const smem_raw = dynamic_smem();
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][D]
  T* sK = sQ + BM * D;                     // [2][BN][D]
  T* sV = sK + 2 * BN * D;                 // [2][BN][D]

  // Causal / windowed blocks late in the sequence see the most keys: schedule them first so the
  // short ones fill the tail of the grid.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const SeqView seq = seq_view(p, b, head);
  const int m_start = m_block * BM;
  if (m_start >= seq.sq) return;  // whole block past this sequence (varlen)
  const Mask mask = make_mask(p, seq);
  const int m_last = min(m_start + BM, seq.sq) - 1;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  const T* q = static_cast<const T*>(p.q) + seq.q_offset + int64_t(m_start) * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + seq.k_offset;
  const T* v = static_cast<const T*>(p.v) + seq.v_offset;

  int tile_begin, n_tiles;
  mask.tile_range(m_start, m_last, BN, &tile_begin, &n_tiles);

  float o[kNTilesO][4];
#pragma unroll
  for (int t = 0; t < kNTilesO; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
  // Rows (lane / 4) and (lane / 4 + 8) of the warp's 16: running max (log2 domain) and this
  // thread's partial row sum (summed over the 4 threads of a row at the end).
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};

  if (n_tiles > 0) {
    // cp.async groups, in commit order: Q, K_0, V_0, then (K_{j+1}, V_{j+1}) once per tile.
    load_tile_async<BM, D, NT>(sQ, q, p.q_row_stride, 0, seq.sq - m_start, tid);
    cp_async_commit();
    int key_lo, key_hi;  // the keys some row of the block sees
    mask.key_range(m_start, m_last, &key_lo, &key_hi);
    const int n0_first = tile_begin * BN;
    load_tile_async<BN, D, NT>(sK, k + int64_t(n0_first) * p.k_row_stride, p.k_row_stride, key_lo - n0_first,
                               key_hi - n0_first, tid);
    cp_async_commit();
    load_tile_async<BN, D, NT>(sV, v + int64_t(n0_first) * p.v_row_stride, p.v_row_stride, key_lo - n0_first,
                               key_hi - n0_first, tid);
    cp_async_commit();

    // ldmatrix lane -> row/chunk patterns (see the fragment layouts of mma.m16n8k16):
    //   A (Q, row-major):        matrix l/8 = (rows +8*(l/8 % 2), k +8*(l/16))
    //   B (K as K^T, no trans):  matrix l/8 = (keys +8*(l/16),   k +8*(l/8 % 2))
    //   B (V, trans):            matrix l/8 = (keys +8*(l/8 % 2), d +8*(l/16))
    const int q_row = warp * 16 + (lane & 15);
    const int q_chunk = lane >> 4;
    const int k_row = (lane & 7) + ((lane >> 4) << 3);
    const int k_chunk = (lane >> 3) & 1;
    const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const int v_chunk = lane >> 4;

    uint32_t q_frag[Cfg::kQInRegs ? kKSteps : 1][4];
    if constexpr (Cfg::kQInRegs) {
      cp_async_wait<2>();  // Q landed (K_0, V_0 may be in flight)
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) ldmatrix_x4(q_frag[kk], sQ + swz<D>(q_row, kk * 2 + q_chunk));
    }

    const int row_a = m_start + warp * 16 + (lane >> 2);  // query row of accumulator regs 0,1 (+8: 2,3)
    const int col_a = 2 * (lane & 3);                      // key column offset within an n8 tile

    for (int it = 0; it < n_tiles; ++it) {
      const int buf = it & 1;
      const int n0 = (tile_begin + it) * BN;
      cp_async_wait<1>();  // K_it landed (V_it may be in flight)
      __syncthreads();     // ... for every thread; and every warp is done with tile it-1's buffers
      if (it + 1 < n_tiles) {
        const int n1 = n0 + BN;
        load_tile_async<BN, D, NT>(sK + (buf ^ 1) * BN * D, k + int64_t(n1) * p.k_row_stride, p.k_row_stride,
                                   key_lo - n1, key_hi - n1, tid);
        cp_async_commit();
        load_tile_async<BN, D, NT>(sV + (buf ^ 1) * BN * D, v + int64_t(n1) * p.v_row_stride, p.v_row_stride,
                                   key_lo - n1, key_hi - n1, tid);
        cp_async_commit();
      } else {  // empty groups keep the wait counts below uniform
        cp_async_commit();
        cp_async_commit();
      }

      // ---- S = Q K^T. s[4 * t + r] is register r of n8 tile t (the accumulator layout
      // softmax_tile expects).
      const T* sKb = sK + buf * BN * D;
      float s[kNTilesS * 4];
#pragma unroll
      for (int i = 0; i < kNTilesS * 4; ++i) s[i] = 0.0f;
      // ALiBi without a softcap: the accumulators start at -slope / softmax_scale * |distance|, so the
      // scaling below turns them into -slope * log2(e) * |distance| (FlashAttention's way). A uniform
      // branch; the slope is read in place (held across the loop, one register spills at D = 256).
      if (p.alibi_slopes != nullptr && p.softcap == 0.0f) {
        const float a = load_in_place(p.alibi_slopes + blockIdx.z * p.alibi_batch_stride + blockIdx.y) * p.alibi_pre;
        const float d0 = static_cast<float>(row_a + mask.diag - n0 - col_a);
#pragma unroll
        for (int i = 0; i < kNTilesS * 4; ++i)
          s[i] = -a * fabsf(d0 + static_cast<float>(8 * ((i >> 1) & 1) - (i >> 2) * 8 - (i & 1)));
      }
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        uint32_t a[4];
        if constexpr (Cfg::kQInRegs) {
          a[0] = q_frag[kk][0], a[1] = q_frag[kk][1], a[2] = q_frag[kk][2], a[3] = q_frag[kk][3];
        } else {
          ldmatrix_x4(a, sQ + swz<D>(q_row, kk * 2 + q_chunk));
        }
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t bk[4];
          ldmatrix_x4(bk, sKb + swz<D>(np * 16 + k_row, kk * 2 + k_chunk));
          mma_m16n8k16<T>(*reinterpret_cast<float(*)[4]>(&s[8 * np]), a, bk[0], bk[1]);
          mma_m16n8k16<T>(*reinterpret_cast<float(*)[4]>(&s[8 * np + 4]), a, bk[2], bk[3]);
        }
      }

      // ---- scale (+ softcap), ALiBi, mask, online softmax
      float rescale[2];
      softmax_tile(s, row_max, row_sum, rescale, p, mask, mask.needs_mask(m_start, m_last, n0, BN), row_a,
                   n0 + col_a,
                   // ALiBi with a softcap: added after the tanh (not compiled at D = 256, whose registers
                   // it would overflow on sm_90a; kvkernels.cuda.prefill sends that case elsewhere).
                   Cfg::kHeadDim < 256 && p.alibi_slopes != nullptr && p.softcap > 0.0f
                       ? load_in_place(p.alibi_slopes + blockIdx.z * p.alibi_batch_stride + blockIdx.y) *
                             1.4426950408889634f
                       : 0.0f);
#pragma unroll
      for (int t = 0; t < kNTilesO; ++t) {
        o[t][0] *= rescale[0];
        o[t][1] *= rescale[0];
        o[t][2] *= rescale[1];
        o[t][3] *= rescale[1];
      }

      // ---- O += P V. The accumulator layout of two adjacent n8 tiles of S is exactly the A
      // fragment layout of one k16 step, so P goes from registers to the MMA with no shuffle.
      cp_async_wait<2>();  // V_it landed (K_{it+1}, V_{it+1} may be in flight)
      __syncthreads();
      const T* sVb = sV + buf * BN * D;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        a[0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
        a[1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
        a[2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
        a[3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, sVb + swz<D>(kk * 16 + v_row, dp * 2 + v_chunk));
          mma_m16n8k16<T>(o[2 * dp], a, bv[0], bv[1]);
          mma_m16n8k16<T>(o[2 * dp + 1], a, bv[2], bv[3]);
        }
      }
    }
  }

  // ---- epilogue: normalise, stage the warp's 16 rows in its own rows of sQ (only this warp
  // ever reads them), then write 16-byte chunks of whole rows to global memory.
  float inv_sum[2], lse[2];
  finish_rows(row_max, row_sum, inv_sum, lse);
  __syncwarp();
  {
    const int r0 = warp * 16 + (lane >> 2);
#pragma unroll
    for (int t = 0; t < kNTilesO; ++t) {
      const int col = 2 * (lane & 3);
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(r0, t) + col) = pack2<T>(o[t][0] * inv_sum[0], o[t][1] * inv_sum[0]);
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(r0 + 8, t) + col) =
          pack2<T>(o[t][2] * inv_sum[1], o[t][3] * inv_sum[1]);
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + seq.o_offset;
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = 0; i < 16 * kChunks / 32; ++i) {
    const int idx = lane + i * 32;
    const int r = idx / kChunks, c = idx % kChunks;
    const int row = m_start + warp * 16 + r;
    if (row < seq.sq) {
      const uint4 val = *reinterpret_cast<const uint4*>(sQ + swz<D>(warp * 16 + r, c));
      st_global_16(out + int64_t(row) * p.o_row_stride + c * 8, val);
    }
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = m_start + warp * 16 + (lane >> 2) + i * 8;
      if (row < seq.sq) p.lse[seq.lse_offset + row] = lse[i];
    }
  }
}

// Host side: grid and launch of one (dtype, head dim). Returns the CUDA error of the launch.
template <typename T, int D>
cudaError_t launch_sm80(const PrefillParams& p, cudaStream_t stream) {
  using Cfg = Sm80Config<T, D>;
  auto kernel = kvk_prefill_sm80_kernel<Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM, p.num_heads, p.batch);
  KVK_LAUNCH(grid, Cfg::kThreads, Cfg::kSmemBytes, stream, kernel)(p);
  return cudaGetLastError();
}

}  // namespace prefill
}  // namespace kvk
