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
#include "ops/device.h"

namespace kvk {
namespace {

using at::Tensor;

constexpr char kOp[] = "decode: ";  // prefix of the messages of the shared checks (ops/checks.h)

// Positions are int32 in the kernel, with a tile of slack past the capacity.
constexpr int64_t kMaxCapacity = int64_t{1} << 30;

DecodeDType dtype_of(const char* name, const Tensor& t, bool allow_fp8) {
  switch (t.scalar_type()) {
    case at::kHalf: return DecodeDType::kHalf;
    case at::kBFloat16: return DecodeDType::kBFloat16;
    case at::kFloat8_e4m3fn:
      if (allow_fp8) return DecodeDType::kFloat8E4M3;
      break;
    default: break;
  }
  TORCH_CHECK(false, "decode: ", name, " must be float16 or bfloat16", allow_fp8 ? " or float8_e4m3fn" : "",
              ", got ", t.scalar_type());
  return DecodeDType::kHalf;  // unreachable
}

void set_scale(const char* name, const std::optional<Tensor>& scale, bool fp8, const Tensor& q, int64_t hkv,
               const float*& ptr, int64_t& stride) {
  ptr = nullptr;
  stride = 0;
  if (!fp8) {
    TORCH_CHECK(!scale.has_value(), "decode: ", name, " is only used with a float8_e4m3fn cache");
    return;
  }
  TORCH_CHECK(scale.has_value(), "decode: ", name, " is required with a float8_e4m3fn cache (fp32 [Hkv])");
  const Tensor& s = *scale;
  check_device(kOp, name, s, q);
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == hkv, "decode: ", name,
              " must be float32 [Hkv = ", hkv, "] (stride 0 for one scale per tensor), got ", s.scalar_type(), " ",
              s.sizes());
  ptr = s.data_ptr<float>();
  stride = s.stride(0);
}

// q [B, Hq, D] fp16/bf16; k_cache/v_cache [B, S_max, Hkv, D] or, with block_table [B, max_pages] int32,
// [num_pages, page_size, Hkv, D], q's dtype or float8_e4m3fn; cache_seqlens [B] int32;
// k_scale/v_scale fp32 [Hkv] (fp8 only). Writes out [B, Hq, D] (q's dtype) and lse [B, Hq] fp32;
// with num_splits > 1 uses workspace_out [num_splits, B, Hq, D] and workspace_lse [num_splits, B, Hq]
// fp32 (contiguous). Split s covers attended positions [start + s * split_tokens, ...) where start is
// the window's first position; num_splits * split_tokens must cover min(capacity, window_left + 1).
void decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
            const std::optional<Tensor>& block_table, const std::optional<Tensor>& k_scale,
            const std::optional<Tensor>& v_scale, Tensor& out, Tensor& lse, Tensor& workspace_out,
            Tensor& workspace_lse, double softmax_scale, int64_t window_left, double softcap, int64_t num_splits,
            int64_t split_tokens) {
  TORCH_CHECK(q.dim() == 3, "decode: q must be [B, Hq, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4, "decode: k_cache must be 4-D, got ", k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "decode: k_cache and v_cache shapes differ: ", k_cache.sizes(),
              " vs ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "decode: k_cache and v_cache dtypes differ");
  check_device(kOp, "q", q, q);
  check_device(kOp, "k_cache", k_cache, q);
  check_device(kOp, "v_cache", v_cache, q);
  check_device(kOp, "cache_seqlens", cache_seqlens, q);
  check_device(kOp, "out", out, q);
  check_device(kOp, "lse", lse, q);

  const DecodeDType q_dtype = dtype_of("q", q, /*allow_fp8=*/false);
  const DecodeDType cache_dtype = dtype_of("k_cache", k_cache, /*allow_fp8=*/true);
  const bool fp8 = cache_dtype == DecodeDType::kFloat8E4M3;
  TORCH_CHECK(fp8 || cache_dtype == q_dtype, "decode: the cache must have q's dtype ", q.scalar_type(),
              " or float8_e4m3fn, got ", k_cache.scalar_type());

  const int64_t batch = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = k_cache.size(2);
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "decode: head dim ", d, " is not one of 64, 128, 256");
  TORCH_CHECK(k_cache.size(3) == d, "decode: k_cache head dim ", k_cache.size(3), " != q's ", d);
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, "decode: Hq = ", hq, " is not a multiple of Hkv = ", hkv);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch,
              "decode: cache_seqlens must be int32 [B = ", batch, "], got ", cache_seqlens.scalar_type(), " ",
              cache_seqlens.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.sizes() == q.sizes(), "decode: out must be ",
              q.scalar_type(), " ", q.sizes(), ", got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == batch && lse.size(1) == hq,
              "decode: lse must be float32 [B, Hq] = [", batch, ", ", hq, "], got ", lse.scalar_type(), " ",
              lse.sizes());
  check_vector_layout(kOp, "q", q);
  check_vector_layout(kOp, "out", out);
  check_vector_layout(kOp, "k_cache", k_cache);
  check_vector_layout(kOp, "v_cache", v_cache);

  DecodeParams p{};
  const bool paged = block_table.has_value();
  int64_t capacity;
  if (paged) {
    const Tensor& bt = *block_table;
    check_device(kOp, "block_table", bt, q);
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == batch,
                "decode: block_table must be int32 [B = ", batch, ", max_pages], got ", bt.scalar_type(), " ",
                bt.sizes());
    capacity = bt.size(1) * k_cache.size(1);
    p.block_table = bt.data_ptr<int32_t>();
    p.bt_stride_b = bt.stride(0);
    p.bt_stride_page = bt.stride(1);
    p.page_size = static_cast<int>(k_cache.size(1));
    p.num_pages = static_cast<int>(std::min<int64_t>(k_cache.size(0), INT32_MAX));
    p.max_pages = static_cast<int>(bt.size(1));
  } else {
    TORCH_CHECK(k_cache.size(0) == batch, "decode: a contiguous cache must be [B = ", batch,
                ", S_max, Hkv, D], got ", k_cache.sizes());
    capacity = k_cache.size(1);
    p.page_size = static_cast<int>(std::max<int64_t>(capacity, 1));
    p.num_pages = static_cast<int>(batch);
    p.max_pages = 1;
  }
  TORCH_CHECK(capacity < kMaxCapacity, "decode: a cache of ", capacity, " positions per sequence is too large");
  TORCH_CHECK(window_left >= -1, "decode: window_left must be >= -1, got ", window_left);
  const int64_t window = window_left >= capacity ? -1 : window_left;  // a window as long as the cache is none
  const int64_t attended = window >= 0 ? window + 1 : capacity;
  TORCH_CHECK(num_splits >= 1 && split_tokens >= 1 && split_tokens < kMaxCapacity,
              "decode: num_splits and split_tokens must be >= 1, got ", num_splits, ", ", split_tokens);
  TORCH_CHECK(num_splits * split_tokens >= attended, "decode: ", num_splits, " splits of ", split_tokens,
              " tokens do not cover the ", attended, " positions a sequence may attend");
  TORCH_CHECK(batch * hkv * num_splits <= INT32_MAX, "decode: too many blocks (B * Hkv * num_splits)");
  if (num_splits > 1) {
    check_device(kOp, "workspace_out", workspace_out, q);
    check_device(kOp, "workspace_lse", workspace_lse, q);
    TORCH_CHECK(workspace_out.scalar_type() == at::kFloat && workspace_out.is_contiguous() &&
                    workspace_out.sizes() == at::IntArrayRef({num_splits, batch, hq, d}),
                "decode: workspace_out must be contiguous float32 [", num_splits, ", ", batch, ", ", hq, ", ", d,
                "], got ", workspace_out.scalar_type(), " ", workspace_out.sizes());
    TORCH_CHECK(workspace_lse.scalar_type() == at::kFloat && workspace_lse.is_contiguous() &&
                    workspace_lse.sizes() == at::IntArrayRef({num_splits, batch, hq}),
                "decode: workspace_lse must be contiguous float32 [", num_splits, ", ", batch, ", ", hq, "], got ",
                workspace_lse.scalar_type(), " ", workspace_lse.sizes());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(workspace_out.data_ptr()) % 16 == 0,
                "decode: workspace_out must start at a 16-byte aligned address");
    p.ws_out = workspace_out.data_ptr<float>();
    p.ws_lse = workspace_lse.data_ptr<float>();
  }
  if (batch == 0 || hq == 0) return;

  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.seqlens = cache_seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_scale("k_scale", k_scale, fp8, q, hkv, p.k_scale, p.k_scale_stride);
  set_scale("v_scale", v_scale, fp8, q, hkv, p.v_scale, p.v_scale_stride);
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_page = k_cache.stride(0);
  p.k_stride_row = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_page = v_cache.stride(0);
  p.v_stride_row = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.out_stride_b = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.lse_stride_b = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  p.seqlens_stride = cache_seqlens.stride(0);
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(hq);
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  p.capacity = static_cast<int>(capacity);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = static_cast<int>(window);
  p.num_splits = static_cast<int>(num_splits);
  p.split_tokens = static_cast<int>(split_tokens);

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
        "int split_tokens) -> ()");
}

TORCH_LIBRARY_IMPL(KVK_OPS_NAMESPACE, KVK_OPS_DISPATCH, m) { m.impl("decode", &kvk::decode); }
