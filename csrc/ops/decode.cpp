// Torch glue of the decode kernels: torch.ops.kvkernels_C.decode.
//
// The public API (kvkernels/api.py) validates arguments first and kvkernels/cuda/decode.py plans the
// splits and allocates out, lse and the split workspace from shapes; this op only checks the
// metadata the kernels rely on (device, dtype, shape, 16-byte alignment, that the splits cover the
// attended positions), so a raw call with bad metadata raises instead of touching memory. Nothing
// here allocates or synchronises: the op is CUDA-graph capturable and runs on the current stream of
// q's device. Values of cache_seqlens and block_table are not read on the host: lengths are clamped
// to the cache's capacity and invalid page indices skipped in the kernel.
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

constexpr char kOp[] = "decode: ";  // prefix of the messages of the shared checks (ops/checks.h)

// q [B, Hq, D] fp16/bf16; k_cache/v_cache [B, S_max, Hkv, D] or, with block_table [B, max_pages] int32,
// [num_pages, page_size, Hkv, D], q's dtype, float8_e4m3fn or float8_e5m2; cache_seqlens [B] int32;
// k_scale/v_scale fp32 [Hkv] (fp8 only). Writes out [B, Hq, D] (q's dtype) and lse [B, Hq] fp32;
// with num_splits > 1 uses workspace_out [num_splits, B, Hq, D] and workspace_lse [num_splits, B, Hq]
// fp32 (contiguous). Split s covers attended positions [start + s * split_tokens, ...) where start is
// the window's first position; num_splits * split_tokens must cover min(capacity, window_left + 1).
void decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
            const std::optional<Tensor>& block_table, const std::optional<Tensor>& k_scale,
            const std::optional<Tensor>& v_scale, Tensor& out, Tensor& lse, Tensor& workspace_out,
            Tensor& workspace_lse, double softmax_scale, int64_t window_left, double softcap, int64_t num_splits,
            int64_t split_tokens, const std::optional<Tensor>& alibi_slopes) {
  TORCH_CHECK(q.dim() == 3, "decode: q must be [B, Hq, D], got ", q.sizes());
  check_device(kOp, "q", q, q);
  check_device(kOp, "out", out, q);
  check_device(kOp, "lse", lse, q);
  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  DecodeParams p{};
  const DecodeDType q_dtype = decode_dtype_of(kOp, "q", q, /*allow_fp8=*/false);
  const DecodeDType cache_dtype =
      decode_set_cache(kOp, q, k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale, batch, hq, d, p);
  const bool paged = block_table.has_value();
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.sizes() == q.sizes(), "decode: out must be ",
              q.scalar_type(), " ", q.sizes(), ", got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == batch && lse.size(1) == hq,
              "decode: lse must be float32 [B, Hq] = [", batch, ", ", hq, "], got ", lse.scalar_type(), " ",
              lse.sizes());
  check_vector_layout(kOp, "q", q);
  check_vector_layout(kOp, "out", out);

  const int64_t capacity = p.capacity;
  TORCH_CHECK(window_left >= -1, "decode: window_left must be >= -1, got ", window_left);
  const int64_t window = window_left >= capacity ? -1 : window_left;  // a window as long as the cache is none
  const int64_t attended = window >= 0 ? window + 1 : capacity;
  TORCH_CHECK(num_splits >= 1 && split_tokens >= 1 && split_tokens < kDecodeMaxCapacity,
              "decode: num_splits and split_tokens must be >= 1, got ", num_splits, ", ", split_tokens);
  TORCH_CHECK(num_splits * split_tokens >= attended, "decode: ", num_splits, " splits of ", split_tokens,
              " tokens do not cover the ", attended, " positions a sequence may attend");
  TORCH_CHECK(batch * k_cache.size(2) * num_splits <= INT32_MAX, "decode: too many blocks (B * Hkv * num_splits)");
  decode_set_workspace(kOp, q, workspace_out, workspace_lse, num_splits, batch, hq, d, p);
  if (batch == 0 || hq == 0) return;

  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.out_stride_b = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.lse_stride_b = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = static_cast<int>(window);
  p.num_splits = static_cast<int>(num_splits);
  p.split_tokens = static_cast<int>(split_tokens);
  set_alibi(kOp, alibi_slopes, q, batch, hq, p.alibi_slopes, p.alibi_stride_b);

  const OpsLaunchContext ctx(q);
  const cudaError_t err = launch_decode(p, q_dtype, cache_dtype, paged, ctx.stream());
  TORCH_CHECK(err == cudaSuccess, "kvkernels decode launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace kvk

TORCH_LIBRARY_FRAGMENT(KVK_OPS_NAMESPACE, m) {
  m.def("decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
        "Tensor? k_scale, Tensor? v_scale, Tensor(a!) out, Tensor(b!) lse, Tensor(c!) workspace_out, "
        "Tensor(d!) workspace_lse, float softmax_scale, int window_left, float softcap, int num_splits, "
        "int split_tokens, Tensor? alibi_slopes=None) -> ()");
}

TORCH_LIBRARY_IMPL(KVK_OPS_NAMESPACE, KVK_OPS_DISPATCH, m) { m.impl("decode", &kvk::decode); }
