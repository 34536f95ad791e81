// Arguments of one prefill (flash-attention forward) launch, shared by the host launchers and
// the kernels. Plain C++ (no CUDA, no torch): the torch glue includes it too.
//
// Dense and varlen calls use the same fields. Dense: batch strides are real, cu_seqlens_* are
// nullptr and every sequence has seqlen_q / seqlen_k rows. Varlen: batch strides are 0, sequence b
// owns rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q/out and [cu_seqlens_k[b], ...) of k/v, and
// seqlen_q / seqlen_k are the longest sequence (they only size the grid).
//
// Strides are in elements; the last (head-dim) stride is 1.
#pragma once

#include <cstdint>

namespace kvk {

struct PrefillParams {
  const void* q;  // dense [B, Sq, Hq, D]   varlen [Tq, Hq, D]    (fp16 / bf16)
  const void* k;  // dense [B, Sk, Hkv, D]  varlen [Tk, Hkv, D]
  const void* v;  // like k
  void* out;      // like q
  float* lse;     // dense [B, Hq, Sq]      varlen [Hq, Tq]       natural log, -inf on empty rows

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;  // lse row stride is 1

  const int32_t* cu_seqlens_q;  // [B + 1] prefix sums of query lengths, or nullptr (dense)
  const int32_t* cu_seqlens_k;  // [B + 1] prefix sums of key lengths, or nullptr (dense)

  int batch;
  int num_heads;     // Hq
  int num_kv_heads;  // Hkv, Hq % Hkv == 0 (GQA: query head h reads kv head h / (Hq / Hkv))
  int head_dim;      // D
  int seqlen_q;      // dense Sq; varlen max_seqlen_q
  int seqlen_k;      // dense Sk; varlen max_seqlen_k
  int total_q;       // rows of q (dense B * Sq, varlen Tq): extent of the sm_90 tensor maps
  int total_k;       // rows of k/v

  // Scores live in the log2 domain: x = s * softmax_scale * log2(e), or with a softcap
  // x = softcap * log2(e) * tanh(s * softmax_scale / softcap).
  float scale_log2;         // softmax_scale * log2(e)
  float softcap;            // 0 = off
  float softcap_log2;       // softcap * log2(e)
  float softcap_inv_scale;  // softmax_scale / softcap

  // Query i (0-based in its sequence) sees key j iff
  //   j in [i + Sk - Sq - window_left, i + Sk - Sq + window_right]  (-1 = unbounded side).
  // Causal is window_right = 0 (bottom-right aligned).
  int window_left;
  int window_right;

  // ALiBi (FlashAttention's alibi_slopes): the score of query i and key j gets
  //   -slope * |i + Sk - Sq - j|  (natural-log units, after the softcap, not scaled),
  // slope = alibi_slopes[b * alibi_batch_stride + head]. nullptr = none (path 80 only).
  const float* alibi_slopes;  // fp32 [B, Hq], head stride 1, or nullptr
  int64_t alibi_batch_stride; // 0: one slope per head for every sequence
  float alibi_pre;            // 1 / softmax_scale: the bias joins the raw scores (path 80, no softcap)
};

}  // namespace kvk
