// Argument checks shared by the torch glue of decode (csrc/ops/decode.cpp) and cache attention
// (csrc/ops/cache_attention.cpp), which fill the same parameter block (kernels/decode_params.h) and
// take the same cache arguments. Torch headers: included by the glue .cpp files only.
//
// `op` starts every message ("decode: ", "cache_attention: "), so a raw-op call with bad metadata
// names the op that refused it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernels/decode_params.h"
#include "ops/checks.h"

namespace kvk {

// Positions are int32 in the kernel, with a tile of slack past the capacity.
constexpr int64_t kDecodeMaxCapacity = int64_t{1} << 30;

inline DecodeDType decode_dtype_of(const char* op, const char* name, const at::Tensor& t, bool allow_fp8) {
  switch (t.scalar_type()) {
    case at::kHalf: return DecodeDType::kHalf;
    case at::kBFloat16: return DecodeDType::kBFloat16;
    case at::kFloat8_e4m3fn:
      if (allow_fp8) return DecodeDType::kFloat8E4M3;
      break;
    case at::kFloat8_e5m2:
      if (allow_fp8) return DecodeDType::kFloat8E5M2;
      break;
    default: break;
  }
  TORCH_CHECK(false, op, name, " must be float16 or bfloat16", allow_fp8 ? ", float8_e4m3fn or float8_e5m2" : "",
              ", got ", t.scalar_type());
  return DecodeDType::kHalf;  // unreachable
}

// k_scale / v_scale: fp32 [Hkv] (stride 0 for one scale per tensor), value = stored * scale. Required
// with an fp8 cache; optional with a 16-bit one (vLLM passes scales for every cache), absent = 1.
inline void decode_set_scale(const char* op, const char* name, const std::optional<at::Tensor>& scale, bool fp8,
                             const at::Tensor& q, int64_t hkv, const float*& ptr, int64_t& stride) {
  ptr = nullptr;
  stride = 0;
  if (!fp8 && !scale.has_value()) return;
  TORCH_CHECK(scale.has_value(), op, name, " is required with an fp8 cache (fp32 [Hkv])");
  const at::Tensor& s = *scale;
  check_device(op, name, s, q);
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == hkv, op, name,
              " must be float32 [Hkv = ", hkv, "] (stride 0 for one scale per tensor), got ", s.scalar_type(), " ",
              s.sizes());
  ptr = s.data_ptr<float>();
  stride = s.stride(0);
}

// The cache pair, the lengths and the block table of `batch` sequences, checked against q (dtype,
// head dim d, device, layout). Fills the cache fields of `p` (pointers, strides, paging, capacity,
// dims) and returns the cache's dtype.
inline DecodeDType decode_set_cache(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                    const std::optional<at::Tensor>& block_table,
                                    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                                    int64_t batch, int64_t hq, int64_t d, DecodeParams& p) {
  TORCH_CHECK(k_cache.dim() == 4, op, "k_cache must be 4-D, got ", k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, "k_cache and v_cache shapes differ: ", k_cache.sizes(), " vs ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), op, "k_cache and v_cache dtypes differ");
  check_device(op, "k_cache", k_cache, q);
  check_device(op, "v_cache", v_cache, q);
  check_device(op, "cache_seqlens", cache_seqlens, q);
  const DecodeDType q_dtype = decode_dtype_of(op, "q", q, /*allow_fp8=*/false);
  const DecodeDType cache_dtype = decode_dtype_of(op, "k_cache", k_cache, /*allow_fp8=*/true);
  const bool fp8 = decode_dtype_is_fp8(cache_dtype);
  TORCH_CHECK(fp8 || cache_dtype == q_dtype, op, "the cache must have q's dtype ", q.scalar_type(),
              ", float8_e4m3fn or float8_e5m2, got ", k_cache.scalar_type());
  const int64_t hkv = k_cache.size(2);
  TORCH_CHECK(d == 64 || d == 128 || d == 256, op, "head dim ", d, " is not one of 64, 128, 256");
  TORCH_CHECK(k_cache.size(3) == d, op, "k_cache head dim ", k_cache.size(3), " != q's ", d);
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, op, "Hq = ", hq, " is not a multiple of Hkv = ", hkv);
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch,
              op, "cache_seqlens must be int32 [B = ", batch, "], got ", cache_seqlens.scalar_type(), " ",
              cache_seqlens.sizes());
  check_vector_layout(op, "k_cache", k_cache);
  check_vector_layout(op, "v_cache", v_cache);

  int64_t capacity;
  if (block_table.has_value()) {
    const at::Tensor& bt = *block_table;
    check_device(op, "block_table", bt, q);
    TORCH_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.size(0) == batch, op,
                "block_table must be int32 [B = ", batch, ", max_pages], got ", bt.scalar_type(), " ", bt.sizes());
    capacity = bt.size(1) * k_cache.size(1);
    p.block_table = bt.data_ptr<int32_t>();
    p.bt_stride_b = bt.stride(0);
    p.bt_stride_page = bt.stride(1);
    p.page_size = static_cast<int>(k_cache.size(1));
    p.num_pages = static_cast<int>(std::min<int64_t>(k_cache.size(0), INT32_MAX));
    p.max_pages = static_cast<int>(bt.size(1));
  } else {
    TORCH_CHECK(k_cache.size(0) == batch, op, "a contiguous cache must be [B = ", batch, ", S_max, Hkv, D], got ",
                k_cache.sizes());
    capacity = k_cache.size(1);
    p.page_size = static_cast<int>(std::max<int64_t>(capacity, 1));
    p.num_pages = static_cast<int>(batch);
    p.max_pages = 1;
  }
  TORCH_CHECK(capacity < kDecodeMaxCapacity, op, "a cache of ", capacity, " positions per sequence is too large");
  p.capacity = static_cast<int>(capacity);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.seqlens = cache_seqlens.data_ptr<int32_t>();
  p.seqlens_stride = cache_seqlens.stride(0);
  decode_set_scale(op, "k_scale", k_scale, fp8, q, hkv, p.k_scale, p.k_scale_stride);
  decode_set_scale(op, "v_scale", v_scale, fp8, q, hkv, p.v_scale, p.v_scale_stride);
  p.k_stride_page = k_cache.stride(0);
  p.k_stride_row = k_cache.stride(1);
  p.k_stride_head = k_cache.stride(2);
  p.v_stride_page = v_cache.stride(0);
  p.v_stride_row = v_cache.stride(1);
  p.v_stride_head = v_cache.stride(2);
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(hq);
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  return cache_dtype;
}

// The split workspace [num_splits, rows, Hq, D] + [num_splits, rows, Hq] fp32 (rows: decode B, cache
// attention the query tokens), checked and set when num_splits > 1.
inline void decode_set_workspace(const char* op, const at::Tensor& q, const at::Tensor& workspace_out,
                                 const at::Tensor& workspace_lse, int64_t num_splits, int64_t rows, int64_t hq,
                                 int64_t d, DecodeParams& p) {
  if (num_splits <= 1) return;
  check_device(op, "workspace_out", workspace_out, q);
  check_device(op, "workspace_lse", workspace_lse, q);
  TORCH_CHECK(workspace_out.scalar_type() == at::kFloat && workspace_out.is_contiguous() &&
                  workspace_out.sizes() == at::IntArrayRef({num_splits, rows, hq, d}),
              op, "workspace_out must be contiguous float32 [", num_splits, ", ", rows, ", ", hq, ", ", d, "], got ",
              workspace_out.scalar_type(), " ", workspace_out.sizes());
  TORCH_CHECK(workspace_lse.scalar_type() == at::kFloat && workspace_lse.is_contiguous() &&
                  workspace_lse.sizes() == at::IntArrayRef({num_splits, rows, hq}),
              op, "workspace_lse must be contiguous float32 [", num_splits, ", ", rows, ", ", hq, "], got ",
              workspace_lse.scalar_type(), " ", workspace_lse.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(workspace_out.data_ptr()) % 16 == 0, op,
              "workspace_out must start at a 16-byte aligned address");
  p.ws_out = workspace_out.data_ptr<float>();
  p.ws_lse = workspace_lse.data_ptr<float>();
}

}  // namespace kvk
