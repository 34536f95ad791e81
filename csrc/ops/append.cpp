// Torch glue of the append kernels: torch.ops.kvkernels_C.append_kv / append_kv_slots.
//
// The public API (kvkernels/api.py) validates arguments and values first; these checks are the
// cheap metadata ones the kernels rely on (device, dtype, shape, 16-byte alignment), so a raw-op
// call with bad metadata raises instead of touching memory. Nothing here allocates or
// synchronises: the ops are CUDA-graph capturable and run on the current stream of the caches'
// device.
#include <cstdint>
#include <limits>
#include <optional>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "launch/append.h"
#include "ops/checks.h"
#include "ops/device.h"

namespace kvk {
namespace {

using at::Tensor;

// The append messages name only the argument (the raw ops are append_kv and append_kv_slots).
constexpr char kOp[] = "";

bool is_fp8(const Tensor& cache) {
  return cache.scalar_type() == c10::ScalarType::Float8_e4m3fn || cache.scalar_type() == c10::ScalarType::Float8_e5m2;
}

AppendSource source_kind(const Tensor& src, const Tensor& cache) {
  if (src.scalar_type() == cache.scalar_type()) return AppendSource::kCopy;
  TORCH_CHECK(is_fp8(cache), "k/v dtype ", src.scalar_type(), " must equal the cache dtype ", cache.scalar_type(),
              " (only float8_e4m3fn and float8_e5m2 caches convert)");
  switch (src.scalar_type()) {
    case at::kHalf: return AppendSource::kHalfToFp8;
    case at::kBFloat16: return AppendSource::kBf16ToFp8;
    case at::kFloat: return AppendSource::kFloatToFp8;
    default: TORCH_CHECK(false, "an fp8 cache is written from float16, bfloat16 or float32, got ", src.scalar_type());
  }
  return AppendSource::kCopy;  // unreachable
}

void set_scale(const char* name, const std::optional<Tensor>& scale, bool quantize, const Tensor& cache,
               const float*& ptr, int64_t& stride) {
  ptr = nullptr;
  stride = 0;
  if (!quantize) {
    TORCH_CHECK(!scale.has_value(), name, " is only used with an fp8 (float8_e4m3fn or float8_e5m2) cache");
    return;
  }
  TORCH_CHECK(scale.has_value(), name, " is required with an fp8 cache (fp32 [Hkv])");
  const Tensor& s = *scale;
  check_device(kOp, name, s, cache);
  TORCH_CHECK(s.scalar_type() == at::kFloat, name, " must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == cache.size(2), name, " must have shape [Hkv = ", cache.size(2), "], got ",
              s.sizes());
  ptr = s.data_ptr<float>();
  stride = s.stride(0);
}

// The rotary tables (both or neither): [max_position, rotary_half] of k's dtype or fp32, last dim
// contiguous, 2 <= rotary_dim = 2 * rotary_half <= D. Sets p.rotary_* (rotary_cos nullptr: no rotary).
void set_rotary(AppendParams& p, const Tensor& k, const Tensor& k_cache, const std::optional<Tensor>& cos,
                const std::optional<Tensor>& sin, bool interleaved) {
  p.rotary_cos = p.rotary_sin = nullptr;
  TORCH_CHECK(cos.has_value() == sin.has_value(), "rotary_cos and rotary_sin go together");
  if (!cos.has_value()) return;
  const Tensor& c = *cos;
  const Tensor& s = *sin;
  check_device(kOp, "rotary_cos", c, k_cache);
  check_device(kOp, "rotary_sin", s, k_cache);
  TORCH_CHECK(k.scalar_type() == at::kHalf || k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kFloat,
              "the rotary embedding needs float16, bfloat16 or float32 keys, got ", k.scalar_type());
  TORCH_CHECK(c.scalar_type() == s.scalar_type() && c.sizes() == s.sizes(),
              "rotary_cos and rotary_sin must have the same shape and dtype");
  TORCH_CHECK(c.scalar_type() == k.scalar_type() || c.scalar_type() == at::kFloat, "rotary_cos/rotary_sin must be ",
              k.scalar_type(), " or float32, got ", c.scalar_type());
  TORCH_CHECK(c.dim() == 2 && c.size(1) >= 1 && 2 * c.size(1) <= k_cache.size(3),
              "rotary_cos/rotary_sin must be [max_position, rotary_dim / 2] with 2 <= rotary_dim <= D = ",
              k_cache.size(3), ", got ", c.sizes());
  TORCH_CHECK((c.size(1) == 1 || c.stride(1) == 1) && (s.size(1) == 1 || s.stride(1) == 1),
              "rotary_cos/rotary_sin must be contiguous in their last dimension");
  p.rotary_cos = c.data_ptr();
  p.rotary_sin = s.data_ptr();
  p.cos_stride = c.stride(0);
  p.sin_stride = s.stride(0);
  p.max_position = c.size(0);
  p.rotary_half = static_cast<int32_t>(c.size(1));
  p.rotary_interleaved = interleaved ? 1 : 0;
  p.rotary_cos_fp32 = c.scalar_type() == at::kFloat ? 1 : 0;
}

// Fills everything but the positions (sources, caches, scales, sizes) and returns the source kind.
// k/v are seen as [B, S_new, Hkv, D], or with token_rows (slots, ragged append_kv) [T, 1, Hkv, D].
AppendSource fill_common(AppendParams& p, const Tensor& k, const Tensor& v, const Tensor& k_cache,
                         const Tensor& v_cache, const std::optional<Tensor>& k_scale,
                         const std::optional<Tensor>& v_scale, bool token_rows,
                         const std::optional<Tensor>& rotary_cos, const std::optional<Tensor>& rotary_sin,
                         bool rotary_interleaved) {
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be 4-D [pages or B, page_size or S_max, Hkv, D], got ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ: ", k_cache.sizes(), " vs ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache dtypes differ");
  TORCH_CHECK(k.dim() == (token_rows ? 3 : 4), "k must be ", token_rows ? "[T, Hkv, D]" : "[B, S_new, Hkv, D]",
              ", got ", k.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v dtypes differ");
  TORCH_CHECK(k.size(-1) == k_cache.size(3) && k.size(-2) == k_cache.size(2), "k/v rows [Hkv, D] = ",
              k.sizes().slice(k.dim() - 2), " do not match the cache's ", k_cache.sizes().slice(2));
  check_device(kOp, "k", k, k_cache);
  check_device(kOp, "v", v, k_cache);
  check_device(kOp, "v_cache", v_cache, k_cache);

  AppendSource source = source_kind(k, k_cache);
  const bool quantize = source != AppendSource::kCopy;
  set_rotary(p, k, k_cache, rotary_cos, rotary_sin, rotary_interleaved);
  if (p.rotary_cos != nullptr && !quantize) {  // the rotary kernels compute on typed keys
    source = k.scalar_type() == at::kHalf ? AppendSource::kHalf
             : k.scalar_type() == at::kBFloat16 ? AppendSource::kBf16 : AppendSource::kFloat;
  }
  const bool copy = source == AppendSource::kCopy;
  const int64_t head_dim = k_cache.size(3);
  const int64_t row_bytes = head_dim * k_cache.element_size();
  TORCH_CHECK(row_bytes % 16 == 0, "head dim ", head_dim, " of ", k_cache.scalar_type(),
              " is not a whole number of 16-byte vectors");
  check_vector_layout(kOp, "k", k);
  check_vector_layout(kOp, "v", v);
  check_vector_layout(kOp, "k_cache", k_cache);
  check_vector_layout(kOp, "v_cache", v_cache);

  const int64_t batch = k.size(0);
  const int64_t seq_new = token_rows ? 1 : k.size(1);
  const int64_t heads = k_cache.size(2);
  const int64_t vecs = row_bytes / 16;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(batch * seq_new <= kIntMax && heads * vecs <= kIntMax, "append of ", batch * seq_new,
              " tokens x ", heads * vecs, " vectors is too large for one launch");

  // The copy kernel moves bytes: its strides are in bytes.
  const int64_t src_unit = copy ? k.element_size() : 1;
  const int64_t cache_unit = copy ? k_cache.element_size() : 1;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_stride_b = k.stride(0) * src_unit;
  p.v_stride_b = v.stride(0) * src_unit;
  p.k_stride_s = token_rows ? 0 : k.stride(1) * src_unit;
  p.v_stride_s = token_rows ? 0 : v.stride(1) * src_unit;
  p.k_stride_h = k.stride(-2) * src_unit;
  p.v_stride_h = v.stride(-2) * src_unit;
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.kc_stride_page = k_cache.stride(0) * cache_unit;
  p.kc_stride_row = k_cache.stride(1) * cache_unit;
  p.kc_stride_h = k_cache.stride(2) * cache_unit;
  p.vc_stride_page = v_cache.stride(0) * cache_unit;
  p.vc_stride_row = v_cache.stride(1) * cache_unit;
  p.vc_stride_h = v_cache.stride(2) * cache_unit;
  p.num_pages = k_cache.size(0);
  p.page_size = k_cache.size(1);
  set_scale("k_scale", k_scale, quantize, k_cache, p.k_scale, p.k_scale_stride);
  set_scale("v_scale", v_scale, quantize, k_cache, p.v_scale, p.v_scale_stride);
  p.fp8_e5m2 = k_cache.scalar_type() == c10::ScalarType::Float8_e5m2 ? 1 : 0;
  p.batch = static_cast<int32_t>(batch);
  p.seq_new = static_cast<int32_t>(seq_new);
  p.num_heads = static_cast<int32_t>(heads);
  p.vecs_per_head = static_cast<int32_t>(vecs);
  return source;
}

void launch(const AppendParams& p, AppendSource source, AppendMode mode, bool slot_int64, const Tensor& k_cache) {
  const OpsLaunchContext ctx(k_cache);
  const cudaError_t err = launch_append(p, source, mode, slot_int64, ctx.stream());
  TORCH_CHECK(err == cudaSuccess, "kvkernels append launch failed: ", cudaGetErrorString(err));
}

// k/v [B, S_new, Hkv, D], or ragged [T, Hkv, D] with cu_seqlens [B + 1] int32 (sequence b's tokens
// are rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1); caches [B, S_max, Hkv, D] or, with block_table
// [B, max_pages] int32, [num_pages, page_size, Hkv, D]; cache_seqlens [B] int32; k_scale/v_scale
// fp32 [Hkv] (fp8 caches: float8_e4m3fn or float8_e5m2). cu_seqlens values are not read here (that would synchronise): the kernel
// skips a token that falls in no sequence.
void append_kv(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache, const Tensor& cache_seqlens,
               const std::optional<Tensor>& block_table, const std::optional<Tensor>& k_scale,
               const std::optional<Tensor>& v_scale, const std::optional<Tensor>& cu_seqlens,
               const std::optional<Tensor>& rotary_cos, const std::optional<Tensor>& rotary_sin,
               bool rotary_interleaved) {
  AppendParams p{};
  const bool ragged = cu_seqlens.has_value();
  const AppendSource source = fill_common(p, k, v, k_cache, v_cache, k_scale, v_scale, /*token_rows=*/ragged,
                                          rotary_cos, rotary_sin, rotary_interleaved);
  int64_t batch = k.size(0);
  if (ragged) {
    const Tensor& cu = *cu_seqlens;
    check_device(kOp, "cu_seqlens", cu, k_cache);
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 1,
                "cu_seqlens must be int32 [B + 1], got ", cu.scalar_type(), " ", cu.sizes());
    batch = cu.size(0) - 1;
    TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "cu_seqlens: batch ", batch, " is too large");
    p.cu_seqlens = cu.data_ptr<int32_t>();
    p.cu_stride = cu.stride(0);
    p.batch = static_cast<int32_t>(batch);
    p.num_tokens = static_cast<int32_t>(k.size(0));  // < 2^31: fill_common checked
  }
  check_device(kOp, "cache_seqlens", cache_seqlens, k_cache);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == batch,
              "cache_seqlens must be int32 [B = ", batch, "], got ", cache_seqlens.scalar_type(), " ",
              cache_seqlens.sizes());
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.seqlens_stride = cache_seqlens.stride(0);
  AppendMode mode = AppendMode::kContiguous;
  if (block_table.has_value()) {
    const Tensor& bt = *block_table;
    check_device(kOp, "block_table", bt, k_cache);
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == batch,
                "block_table must be int32 [B = ", batch, ", max_pages], got ", bt.scalar_type(), " ", bt.sizes());
    mode = AppendMode::kPaged;
    p.block_table = bt.data_ptr<int32_t>();
    p.bt_stride_b = bt.stride(0);
    p.bt_stride_page = bt.stride(1);
    p.max_pages = bt.size(1);
  } else {
    TORCH_CHECK(k_cache.size(0) == batch, "a contiguous cache must have shape [B = ", batch,
                ", S_max, Hkv, D], got ", k_cache.sizes());
  }
  launch(p, source, mode, false, k_cache);
}

// k/v [T, Hkv, D]; caches [num_pages, page_size, Hkv, D]; slot_mapping [T] int32/int64; positions [T]
// int32/int64 (rotary only: token t's position).
void append_kv_slots(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping,
                     const std::optional<Tensor>& k_scale, const std::optional<Tensor>& v_scale,
                     const std::optional<Tensor>& positions, const std::optional<Tensor>& rotary_cos,
                     const std::optional<Tensor>& rotary_sin, bool rotary_interleaved) {
  AppendParams p{};
  const AppendSource source = fill_common(p, k, v, k_cache, v_cache, k_scale, v_scale, /*token_rows=*/true,
                                          rotary_cos, rotary_sin, rotary_interleaved);
  if (p.rotary_cos != nullptr) {
    TORCH_CHECK(positions.has_value(), "positions [T] is required with rotary_cos/rotary_sin");
    const Tensor& pos = *positions;
    check_device(kOp, "positions", pos, k_cache);
    TORCH_CHECK((pos.scalar_type() == at::kInt || pos.scalar_type() == at::kLong) && pos.dim() == 1 &&
                    pos.size(0) == k.size(0),
                "positions must be int32 or int64 [T = ", k.size(0), "], got ", pos.scalar_type(), " ", pos.sizes());
    p.positions = pos.data_ptr();
    p.positions_stride = pos.stride(0);
    p.positions_int64 = pos.scalar_type() == at::kLong ? 1 : 0;
  } else {
    TORCH_CHECK(!positions.has_value(), "positions is only used with rotary_cos/rotary_sin");
  }
  check_device(kOp, "slot_mapping", slot_mapping, k_cache);
  const bool int64 = slot_mapping.scalar_type() == at::kLong;
  TORCH_CHECK((int64 || slot_mapping.scalar_type() == at::kInt) && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == k.size(0),
              "slot_mapping must be int32 or int64 [T = ", k.size(0), "], got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  p.slot_mapping = slot_mapping.data_ptr();
  p.slot_stride = slot_mapping.stride(0);
  launch(p, source, AppendMode::kSlots, int64, k_cache);
}

}  // namespace
}  // namespace kvk

TORCH_LIBRARY_FRAGMENT(KVK_OPS_NAMESPACE, m) {
  m.def("append_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
        "Tensor? block_table, Tensor? k_scale, Tensor? v_scale, Tensor? cu_seqlens=None, "
        "Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=False) -> ()");
  m.def("append_kv_slots(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, "
        "Tensor? k_scale, Tensor? v_scale, Tensor? positions=None, Tensor? rotary_cos=None, "
        "Tensor? rotary_sin=None, bool rotary_interleaved=False) -> ()");
}

TORCH_LIBRARY_IMPL(KVK_OPS_NAMESPACE, KVK_OPS_DISPATCH, m) {
  m.impl("append_kv", &kvk::append_kv);
  m.impl("append_kv_slots", &kvk::append_kv_slots);
}
