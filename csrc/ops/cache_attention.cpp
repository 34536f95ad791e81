// Torch glue of cache attention: torch.ops.kvkernels_C.cache_attention (the emulator's
// torch.ops.kvkernels_emu.cache_attention), the decode kernel template with several query tokens
// per sequence (csrc/kernels/decode.cuh, kCacheAttn).
//
// kvkernels/cuda/cache_attn.py validates nothing itself (kvkernels/api.py did), plans the splits
// and allocates out, lse and the split workspace from shapes; this op checks the metadata the
// kernels rely on (device, dtype, shape, 16-byte alignment, that the splits cover what a row tile
// may attend), so a raw call with bad metadata raises instead of touching memory. Nothing here
// allocates, synchronises or reads tensor values: cache_seqlens, cu_seqlens_q and block_table are
// read by the kernel only, which clamps lengths to the cache's capacity, query ranges to q's tokens
// and skips page indices outside the cache. The op is CUDA-graph capturable and runs on the current
// stream of q's device.
#include <algorithm>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "launch/decode.h"
#include "ops/checks.h"
#include "ops/decode_args.h"
#include "ops/device.h"

namespace kvk {
namespace {

using at::Tensor;

constexpr char kOp[] = "cache_attention: ";

// q dense [B, Sq, Hq, D] or, with cu_seqlens_q int32 [B + 1], ragged [Tq, Hq, D]; fp16/bf16.
// k_cache/v_cache, cache_seqlens int32 [B], block_table, k_scale/v_scale: as decode. max_seqlen_q:
// dense Sq; ragged at least every n_b (it sizes the grid; a smaller value leaves rows unwritten).
// Writes out like q (q's dtype) and lse [B, Hq, Sq] / [Hq, Tq] fp32; with num_splits > 1 uses
// workspace_out [num_splits, T, Hq, D] and workspace_lse [num_splits, T, Hq] fp32 (T = B * Sq or Tq).
// Split s of a row tile covers [start + s * split_tokens, ...) from the tile's first window
// position; num_splits * split_tokens must cover cache_attention_span (csrc/launch/decode.h).
void cache_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                     const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& block_table,
                     const std::optional<Tensor>& k_scale, const std::optional<Tensor>& v_scale, Tensor& out,
                     Tensor& lse, Tensor& workspace_out, Tensor& workspace_lse, int64_t max_seqlen_q, bool causal,
                     double softmax_scale, int64_t window_left, double softcap, int64_t num_splits,
                     int64_t split_tokens, const std::optional<Tensor>& alibi_slopes) {
  const bool ragged = cu_seqlens_q.has_value();
  TORCH_CHECK(q.dim() == (ragged ? 3 : 4), "cache_attention: q must be ",
              ragged ? "[Tq, Hq, D] with cu_seqlens_q" : "[B, Sq, Hq, D] without cu_seqlens_q", ", got ", q.sizes());
  check_device(kOp, "q", q, q);
  check_device(kOp, "out", out, q);
  check_device(kOp, "lse", lse, q);
  const int64_t batch = cache_seqlens.dim() == 1 ? cache_seqlens.size(0) : -1;
  const int64_t hq = q.size(-2), d = q.size(-1);
  const int64_t tokens = ragged ? q.size(0) : std::max<int64_t>(batch, 0) * q.size(1);
  TORCH_CHECK(ragged || q.size(0) == batch, "cache_attention: q has ", q.size(0), " sequences, cache_seqlens ",
              batch);
  if (ragged) {
    const Tensor& cu = *cu_seqlens_q;
    check_device(kOp, "cu_seqlens_q", cu, q);
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) == batch + 1,
                "cache_attention: cu_seqlens_q must be int32 [B + 1 = ", batch + 1, "], got ", cu.scalar_type(), " ",
                cu.sizes());
    TORCH_CHECK(max_seqlen_q >= 0, "cache_attention: max_seqlen_q must be >= 0, got ", max_seqlen_q);
  } else {
    TORCH_CHECK(max_seqlen_q == q.size(1), "cache_attention: max_seqlen_q must be Sq = ", q.size(1),
                " for a dense q, got ", max_seqlen_q);
  }
  // More rows per sequence than q has tokens only adds idle blocks: clamp (it stays an upper bound).
  const int64_t max_q = std::min(max_seqlen_q, tokens);
  TORCH_CHECK(tokens < INT32_MAX, "cache_attention: ", tokens, " query tokens are too many");

  DecodeParams p{};
  const DecodeDType q_dtype = decode_dtype_of(kOp, "q", q, /*allow_fp8=*/false);
  const DecodeDType cache_dtype =
      decode_set_cache(kOp, q, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, batch, hq, d, p);
  const bool paged = block_table.has_value();
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.sizes() == q.sizes(), "cache_attention: out must be ",
              q.scalar_type(), " ", q.sizes(), ", got ", out.scalar_type(), " ", out.sizes());
  const bool lse_ok = ragged ? lse.dim() == 2 && lse.size(0) == hq && lse.size(1) == tokens
                             : lse.dim() == 3 && lse.size(0) == batch && lse.size(1) == hq && lse.size(2) == q.size(1);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse_ok, "cache_attention: lse must be float32 ",
              ragged ? "[Hq, Tq]" : "[B, Hq, Sq]", ", got ", lse.scalar_type(), " ", lse.sizes());
  check_vector_layout(kOp, "q", q);
  check_vector_layout(kOp, "out", out);

  const int64_t capacity = p.capacity;
  TORCH_CHECK(window_left >= -1, "cache_attention: window_left must be >= -1, got ", window_left);
  // A window reaching back a whole cache's length hides nothing.
  const int64_t window = window_left >= capacity ? -1 : window_left;
  const int group = static_cast<int>(hq / p.num_kv_heads);
  const int64_t rows = std::max<int64_t>(max_q, 1) * group;
  const int per_block = decode_rows_per_block(static_cast<int>(d), rows);
  const int64_t attended = cache_attention_span(capacity, static_cast<int>(window), causal,
                                                static_cast<int>(std::max<int64_t>(max_q, 1)), group, per_block);
  TORCH_CHECK(num_splits >= 1 && split_tokens >= 1 && split_tokens < kDecodeMaxCapacity,
              "cache_attention: num_splits and split_tokens must be >= 1, got ", num_splits, ", ", split_tokens);
  TORCH_CHECK(num_splits * split_tokens >= attended, "cache_attention: ", num_splits, " splits of ", split_tokens,
              " tokens do not cover the ", attended, " positions a row tile may attend");
  TORCH_CHECK(batch * p.num_kv_heads * num_splits * ((rows + per_block - 1) / per_block) <= INT32_MAX,
              "cache_attention: too many blocks (B * Hkv * num_splits * row tiles)");
  decode_set_workspace(kOp, q, workspace_out, workspace_lse, num_splits, tokens, hq, d, p);
  if (batch == 0 || hq == 0 || tokens == 0 || max_q == 0) return;

  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.cu_seqlens_q = ragged ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  // Ragged tensors index tokens globally (cu[b] + i): batch strides 0.
  p.q_stride_b = ragged ? 0 : q.stride(0);
  p.q_stride_t = ragged ? q.stride(0) : q.stride(1);
  p.q_stride_h = q.stride(-2);
  p.out_stride_b = ragged ? 0 : out.stride(0);
  p.out_stride_t = ragged ? out.stride(0) : out.stride(1);
  p.out_stride_h = out.stride(-2);
  p.lse_stride_b = ragged ? 0 : lse.stride(0);
  p.lse_stride_h = ragged ? lse.stride(0) : lse.stride(1);
  p.lse_stride_t = ragged ? lse.stride(1) : lse.stride(2);
  p.num_tokens = static_cast<int>(tokens);
  p.tokens_per_seq = ragged ? static_cast<int>(tokens) : static_cast<int>(q.size(1));
  p.max_seqlen_q = static_cast<int>(max_q);
  p.causal = causal;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = static_cast<int>(window);
  p.num_splits = static_cast<int>(num_splits);
  p.split_tokens = static_cast<int>(split_tokens);
  set_alibi(kOp, alibi_slopes, q, batch, hq, p.alibi_slopes, p.alibi_stride_b);

  const OpsLaunchContext ctx(q);
  const cudaError_t err = launch_cache_attention(p, q_dtype, cache_dtype, paged, ctx.stream());
  TORCH_CHECK(err == cudaSuccess, "kvkernels cache_attention launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace kvk

TORCH_LIBRARY_FRAGMENT(KVK_OPS_NAMESPACE, m) {
  m.def("cache_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? cu_seqlens_q, "
        "Tensor? block_table, Tensor? k_scale, Tensor? v_scale, Tensor(a!) out, Tensor(b!) lse, "
        "Tensor(c!) workspace_out, Tensor(d!) workspace_lse, int max_seqlen_q, bool causal, float softmax_scale, "
        "int window_left, float softcap, int num_splits, int split_tokens, Tensor? alibi_slopes=None) -> ()");
}

TORCH_LIBRARY_IMPL(KVK_OPS_NAMESPACE, KVK_OPS_DISPATCH, m) { m.impl("cache_attention", &kvk::cache_attention); }
