// Pieces shared by the prefill kernels of both paths: the per-sequence view of a launch and the
// online softmax of one key tile (the causal / window mask itself is prefill_mask.h). The PTX
// wrappers (cp.async, ldmatrix, mma.sync, ex2, rcp) are common/ptx.cuh. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/ptx.cuh"
#include "kernels/prefill_mask.h"
#include "kernels/prefill_params.h"

namespace kvk {
namespace prefill {

// ------------------------------------------------------------------------------ math

// tanh(x) = 1 - 2 / (e^(2x) + 1) from the two approximate MUFU ops. Absolute error ~1e-7
// (e^(2x) -> inf gives 1, -> 0 gives -1): times a softcap of ~50 that stays far below the fp16 /
// bf16 rounding of a logit, and it is a handful of instructions where libdevice's tanhf is ~40.
__device__ __forceinline__ float tanh_approx(float x) {
  const float e = exp2_approx(x * 2.8853900817779268f);  // 2 * log2(e)
  return 1.0f - 2.0f * rcp_approx(e + 1.0f);
}

// ------------------------------------------------------------------------- sequence + mask

// One (sequence, head) of a launch: where its rows start and how many there are.
struct SeqView {
  int64_t q_offset;    // element offset of (row 0, head) in q
  int64_t k_offset;    // element offset of (row 0, kv head) in k
  int64_t v_offset;    // element offset of (row 0, kv head) in v
  int64_t o_offset;    // element offset of (row 0, head) in out
  int64_t lse_offset;  // offset of row 0 in lse
  int q_row0;          // first row of the sequence in the q tensor (varlen), else 0
  int k_row0;          // first row in k/v
  int sq, sk;          // lengths
};

__device__ __forceinline__ SeqView seq_view(const PrefillParams& p, int b, int head) {
  SeqView s;
  const int kv_head = head / (p.num_heads / p.num_kv_heads);
  if (p.cu_seqlens_q != nullptr) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.k_row0 = p.cu_seqlens_k[b];
    s.sq = p.cu_seqlens_q[b + 1] - s.q_row0;
    s.sk = p.cu_seqlens_k[b + 1] - s.k_row0;
  } else {
    s.q_row0 = 0;
    s.k_row0 = 0;
    s.sq = p.seqlen_q;
    s.sk = p.seqlen_k;
  }
  s.q_offset = b * p.q_batch_stride + s.q_row0 * p.q_row_stride + head * p.q_head_stride;
  s.k_offset = b * p.k_batch_stride + s.k_row0 * p.k_row_stride + kv_head * p.k_head_stride;
  s.v_offset = b * p.v_batch_stride + s.k_row0 * p.v_row_stride + kv_head * p.v_head_stride;
  s.o_offset = b * p.o_batch_stride + s.q_row0 * p.o_row_stride + head * p.o_head_stride;
  s.lse_offset = b * p.lse_batch_stride + head * p.lse_head_stride + s.q_row0;
  return s;
}

__device__ __forceinline__ Mask make_mask(const PrefillParams& p, const SeqView& s) {
  return Mask{s.sk, s.sk - s.sq, p.window_left, p.window_right};
}

constexpr float kLn2 = 0.6931471805599453f;

// One key tile of the online softmax, for the two query rows a thread holds in an MMA
// accumulator (mma.sync m16n8 tiles side by side, or a wgmma m64 accumulator): element i is row
// `row` + 8 * ((i / 2) % 2), key `col` + 8 * (i / 4) + i % 2, where row = first row of the thread and
// col = first key of the tile + 2 * (lane % 4).
//   s:        raw scores in, unnormalised probabilities 2^(x - m) out (fp32)
//   row_max:  running max of x (log2 domain), -inf while a row has seen nothing
//   row_sum:  this thread's share of the running sum (the 4 threads of a row are summed at the end)
//   rescale:  factor 2^(m_old - m_new) the caller applies to its O accumulators
//   alibi_log2: ALiBi slope * log2(e) of this head (0: none): x -= alibi_log2 * |row + diag - key|
template <int N>
__device__ __forceinline__ void softmax_tile(float (&s)[N], float (&row_max)[2], float (&row_sum)[2],
                                             float (&rescale)[2], const PrefillParams& p, const Mask& mask,
                                             bool masked, int row, int col, float alibi_log2 = 0.0f) {
  // Scores -> log2 domain (see PrefillParams). Branches on the block-uniform softcap and mask
  // flags sit outside the element loops, so each loop is straight-line code. (Not tanh.approx: its
  // 2^-11 relative error times a softcap of ~30 would cost more than a bf16 rounding of a logit.)
  if (p.softcap > 0.0f) {
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = p.softcap_log2 * tanh_approx(s[i] * p.softcap_inv_scale);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] *= p.scale_log2;
  }
  // ALiBi: a block-uniform branch, one FMA a score (the bias is added after the softcap).
  if (alibi_log2 != 0.0f) {
    // Signed distance of element 0 from its row's diagonal (exact in fp32: |distance| < 2^24); the
    // others differ by the small constants of the accumulator layout.
    const float d0 = static_cast<float>(row + mask.diag - col);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      s[i] = fmaf(-alibi_log2, fabsf(d0 + static_cast<float>(8 * ((i >> 1) & 1) - (i >> 2) * 8 - (i & 1))), s[i]);
    }
  }
  if (masked) {
    int lo[2], hi[2];
    mask.row_bounds(row, &lo[0], &hi[0]);
    mask.row_bounds(row + 8, &lo[1], &hi[1]);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int j = col + (i >> 2) * 8 + (i & 1);
      if (j < lo[(i >> 1) & 1] || j > hi[(i >> 1) & 1]) s[i] = -INFINITY;
    }
  }
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < N; ++i) tile_max[(i >> 1) & 1] = fmaxf(tile_max[(i >> 1) & 1], s[i]);
  float m_use[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
    const float m_new = fmaxf(row_max[h], tile_max[h]);
    // A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps
    // 2^(-inf - m) = 0 rather than NaN.
    m_use[h] = m_new == -INFINITY ? 0.0f : m_new;
    rescale[h] = exp2_approx(row_max[h] - m_use[h]);
    row_max[h] = m_new;
    row_sum[h] *= rescale[h];
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    s[i] = exp2_approx(s[i] - m_use[(i >> 1) & 1]);
    row_sum[(i >> 1) & 1] += s[i];
  }
}

// End of the row: total the row sum over the 4 threads sharing the row; 1 / l (0 for a row that
// saw no key) and the natural-log LSE (-inf for such a row).
__device__ __forceinline__ void finish_rows(float (&row_max)[2], float (&row_sum)[2], float (&inv_sum)[2],
                                            float (&lse)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
    const bool empty = !(row_sum[h] > 0.0f);
    inv_sum[h] = empty ? 0.0f : 1.0f / row_sum[h];
    lse[h] = empty ? -INFINITY : (row_max[h] + __log2f(row_sum[h])) * kLn2;
  }
}

}  // namespace prefill
}  // namespace kvk
