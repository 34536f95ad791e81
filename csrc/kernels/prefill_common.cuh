// Pieces shared by the prefill kernels of both paths: PTX wrappers for the sm_80 instructions
// (cp.async, ldmatrix, mma.sync, ex2, rcp), the per-sequence view of a launch, and the online
// softmax of one key tile (the causal / window mask itself is prefill_mask.h). CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/prefill_mask.h"
#include "kernels/prefill_params.h"

namespace kvk {
namespace prefill {

// ------------------------------------------------------------------------------ PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy that bypasses L1 (.cg: K/V tiles are read once per block).
// valid == false writes 16 zero bytes and reads nothing (src-size 0), which is how rows past the
// end of a sequence become zeros instead of whatever follows in memory.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// D (16x8 fp32) += A (16x16, row) * B (16x8, col), fp16 or bf16 inputs.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x with the hardware approximation (rel. error ~2^-22, far below the fp16/bf16 rounding of P);
// 2^-inf = +0, which is how masked scores become probability 0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// tanh(x) = 1 - 2 / (e^(2x) + 1) from the two approximate MUFU ops. Absolute error ~1e-7
// (e^(2x) -> inf gives 1, -> 0 gives -1): times a softcap of ~50 that stays far below the fp16 /
// bf16 rounding of a logit, and it is a handful of instructions where libdevice's tanhf is ~40.
__device__ __forceinline__ float tanh_approx(float x) {
  const float e = exp2_approx(x * 2.8853900817779268f);  // 2 * log2(e)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(e + 1.0f));
  return 1.0f - 2.0f * r;
}

// Two fp32 -> one register of two 16-bit values (round to nearest even); lo in bits 0..15.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
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
template <int N>
__device__ __forceinline__ void softmax_tile(float (&s)[N], float (&row_max)[2], float (&row_sum)[2],
                                             float (&rescale)[2], const PrefillParams& p, const Mask& mask,
                                             bool masked, int row, int col) {
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
