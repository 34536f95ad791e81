// Torch glue of the prefill kernels: torch.ops.kvkernels_C.prefill, plus two host-only ops that
// expose the kernels' planning logic to CPU tests:
//   prefill_plan(path, head_dim, batch, num_heads, max_seqlen_q) -> [block_m, block_n, threads,
//       smem_bytes, grid_x, grid_y, grid_z]
//   prefill_mask_plan(seqlen_q, seqlen_k, window_left, window_right, block_m, block_n)
//       -> (tile codes [m_blocks * k_tiles]: 0 skipped, 1 loaded whole, 2 loaded and masked per
//           element; row bounds [seqlen_q * 2]: first and last key each query row sees)
//
// The public API (kvkernels/api.py) validates arguments first and kvkernels/cuda/prefill.py picks
// the path and allocates out and lse; this op checks the metadata the kernels rely on (device,
// dtype, shapes, 16-byte alignment) so a raw call with bad metadata raises instead of touching
// memory. Nothing here allocates or synchronises (cu_seqlens values are never read on the host):
// the op is CUDA-graph capturable and runs on the current stream of q's device.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "kernels/prefill_config.h"
#include "kernels/prefill_mask.h"
#include "launch/prefill.h"
#include "ops/checks.h"
#include "ops/device.h"

namespace kvk {
namespace {

using at::Tensor;

constexpr char kOp[] = "prefill: ";  // prefix of the messages of the shared checks (ops/checks.h)

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridYZ = 65535;

// TMA tensor maps need a non-zero stride along every dimension that is stepped along.
bool tma_strides_ok(const Tensor& t) {
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) == 0) return false;
  return true;
}

void check_cu_seqlens(const char* name, const Tensor& cu, const Tensor& q) {
  check_device(kOp, name, cu, q);
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) >= 1 && cu.stride(0) == 1, "prefill: ",
              name, " must be a contiguous int32 [batch + 1] tensor, got ", cu.scalar_type(), " ", cu.sizes());
}

// A window at least as long as both sequences together changes nothing: -1 keeps the kernels'
// int32 index arithmetic small.
int64_t clamp_window(int64_t window, int64_t total) { return window < 0 || window >= total ? -1 : window; }

int device_major(const Tensor& t) {
  int major = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device());
  TORCH_CHECK(err == cudaSuccess, "prefill: cannot query the device: ", cudaGetErrorString(err));
  return major;
}

// q   dense [B, Sq, Hq, D] / varlen [Tq, Hq, D], fp16 or bf16
// k/v dense [B, Sk, Hkv, D] / varlen [Tk, Hkv, D], q's dtype
// cu_seqlens_q/k int32 [B + 1] (varlen) or None (dense)
// out like q (written); lse fp32 dense [B, Hq, Sq] / varlen [Hq, Tq] (written), row stride 1
// path: 80 (mma.sync kernel, any sm_80+ device) or 90 (wgmma/TMA kernel, compute capability 9.0)
void prefill_op(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& cu_seqlens_q,
             const std::optional<Tensor>& cu_seqlens_k, const Tensor& out, const Tensor& lse, int64_t max_seqlen_q,
             int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
             int64_t path, const std::optional<Tensor>& alibi_slopes) {
  const bool varlen = q.dim() == 3;
  TORCH_CHECK(q.dim() == 3 || q.dim() == 4, "prefill: q must be [B, Sq, Hq, D] or [Tq, Hq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == q.dim() && v.sizes() == k.sizes(), "prefill: k and v must be ", q.dim(),
              "-D and of one shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(cu_seqlens_q.has_value() == varlen && cu_seqlens_k.has_value() == varlen,
              "prefill: cu_seqlens_q/k are required with 3-D (varlen) q and not allowed with 4-D q");
  check_device(kOp, "k", k, q);
  check_device(kOp, "v", v, q);
  check_device(kOp, "out", out, q);
  check_device(kOp, "lse", lse, q);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "prefill: q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "prefill: k, v and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes(), "prefill: out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "prefill: lse must be float32, got ", lse.scalar_type());

  const int64_t d = q.size(-1), hq = q.size(-2), hkv = k.size(-2);
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "prefill: head dim must be 64, 128 or 256, got ", d);
  TORCH_CHECK(k.size(-1) == d, "prefill: k/v head dim ", k.size(-1), " differs from q's ", d);
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, "prefill: Hq = ", hq, " must be a multiple of Hkv = ", hkv);
  TORCH_CHECK(hq <= kMaxGridYZ, "prefill: at most ", kMaxGridYZ, " query heads, got ", hq);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"q", q}, {"k", k}, {"v", v}, {"out", out}})
    check_vector_layout(kOp, name, t);
  TORCH_CHECK(lse.size(-1) <= 1 || lse.stride(-1) == 1, "prefill: lse must be contiguous in its last dimension");

  PrefillParams p{};
  int64_t batch, total_q, total_k;
  if (varlen) {
    const Tensor& cq = *cu_seqlens_q;
    const Tensor& ck = *cu_seqlens_k;
    check_cu_seqlens("cu_seqlens_q", cq, q);
    check_cu_seqlens("cu_seqlens_k", ck, q);
    TORCH_CHECK(cq.size(0) == ck.size(0), "prefill: cu_seqlens_q and cu_seqlens_k must have one length");
    batch = cq.size(0) - 1;
    total_q = q.size(0);
    total_k = k.size(0);
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == hq && lse.size(1) == total_q, "prefill: lse must be [Hq, Tq] = [",
                hq, ", ", total_q, "], got ", lse.sizes());
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= total_q && max_seqlen_k >= 0 && max_seqlen_k <= total_k,
                "prefill: max_seqlen_q/k must lie in [0, Tq] / [0, Tk], got ", max_seqlen_q, " / ", max_seqlen_k);
    p.cu_seqlens_q = cq.data_ptr<int32_t>();
    p.cu_seqlens_k = ck.data_ptr<int32_t>();
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = p.lse_batch_stride = 0;
    p.q_row_stride = q.stride(0);
    p.q_head_stride = q.stride(1);
    p.k_row_stride = k.stride(0);
    p.k_head_stride = k.stride(1);
    p.v_row_stride = v.stride(0);
    p.v_head_stride = v.stride(1);
    p.o_row_stride = out.stride(0);
    p.o_head_stride = out.stride(1);
    p.lse_head_stride = lse.stride(0);
  } else {
    batch = q.size(0);
    TORCH_CHECK(k.size(0) == batch, "prefill: k must have batch ", batch, ", got ", k.size(0));
    max_seqlen_q = q.size(1);
    max_seqlen_k = k.size(1);
    total_q = batch * max_seqlen_q;
    total_k = batch * max_seqlen_k;
    TORCH_CHECK(lse.dim() == 3 && lse.size(0) == batch && lse.size(1) == hq && lse.size(2) == max_seqlen_q,
                "prefill: lse must be [B, Hq, Sq] = [", batch, ", ", hq, ", ", max_seqlen_q, "], got ", lse.sizes());
    p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
    p.q_batch_stride = q.stride(0);
    p.q_row_stride = q.stride(1);
    p.q_head_stride = q.stride(2);
    p.k_batch_stride = k.stride(0);
    p.k_row_stride = k.stride(1);
    p.k_head_stride = k.stride(2);
    p.v_batch_stride = v.stride(0);
    p.v_row_stride = v.stride(1);
    p.v_head_stride = v.stride(2);
    p.o_batch_stride = out.stride(0);
    p.o_row_stride = out.stride(1);
    p.o_head_stride = out.stride(2);
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
  }
  TORCH_CHECK(batch <= kMaxGridYZ, "prefill: at most ", kMaxGridYZ, " sequences per call, got ", batch);
  TORCH_CHECK(total_q + total_k <= kIntMax / 2, "prefill: ", total_q, " + ", total_k,
              " tokens is too many for one call");
  if (batch == 0 || max_seqlen_q == 0 || hq == 0) return;  // no query rows

  TORCH_CHECK(path == prefill::kPathSm80 || path == prefill::kPathSm90, "prefill: path must be 80 or 90, got ",
              path);
  const OpsArchScope arch(path == prefill::kPathSm90 ? 90 : 80);  // the emulator plays that device
  const int major = device_major(q);
  TORCH_CHECK(major >= 8, "prefill: the CUDA kernels need compute capability 8.0 or newer, got ", major, ".x");
  if (path == prefill::kPathSm90) {
    TORCH_CHECK(major == 9, "prefill: path 90 (wgmma/TMA) needs compute capability 9.0, got ", major, ".x");
    TORCH_CHECK(tma_strides_ok(q) && tma_strides_ok(k) && tma_strides_ok(v),
                "prefill: path 90 (TMA) needs non-zero strides; use path 80");
    // No key rows: nothing for TMA to describe; every row is empty either way.
    if (total_k == 0 || max_seqlen_k == 0) path = prefill::kPathSm80;
  }

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(hq);
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(d);
  p.seqlen_q = static_cast<int>(max_seqlen_q);
  p.seqlen_k = static_cast<int>(max_seqlen_k);
  p.total_q = static_cast<int>(total_q);
  p.total_k = static_cast<int>(total_k);
  constexpr double kLog2e = 1.4426950408889634;
  p.scale_log2 = static_cast<float>(softmax_scale * kLog2e);
  p.softcap = static_cast<float>(softcap > 0.0 ? softcap : 0.0);
  p.softcap_log2 = static_cast<float>(softcap > 0.0 ? softcap * kLog2e : 0.0);
  p.softcap_inv_scale = static_cast<float>(softcap > 0.0 ? softmax_scale / softcap : 0.0);
  p.window_left = static_cast<int>(clamp_window(window_left, total_q + total_k));
  p.window_right = static_cast<int>(clamp_window(window_right, total_q + total_k));
  set_alibi("prefill: ", alibi_slopes, q, batch, hq, p.alibi_slopes, p.alibi_batch_stride);
  TORCH_CHECK(p.alibi_slopes == nullptr || path == prefill::kPathSm80,
              "prefill: alibi_slopes needs path 80 (the sm_90a kernel has no ALiBi)");
  TORCH_CHECK(p.alibi_slopes == nullptr || (softmax_scale != 0.0 && !(softcap > 0.0 && d == 256)),
              "prefill: alibi_slopes needs softmax_scale != 0, and no softcap at head dim 256");
  p.alibi_pre = p.alibi_slopes != nullptr ? static_cast<float>(1.0 / softmax_scale) : 0.0f;

  const OpsLaunchContext ctx(q);
  const cudaError_t err = prefill_launch(static_cast<int>(path), q.scalar_type() == at::kBFloat16, p, ctx.stream());
  TORCH_CHECK(err == cudaSuccess, "kvkernels prefill launch failed: ", cudaGetErrorString(err));
}

std::vector<int64_t> prefill_plan_op(int64_t path, int64_t head_dim, int64_t batch, int64_t num_heads,
                                     int64_t max_seqlen_q) {
  PrefillLaunchPlan plan{};
  TORCH_CHECK(prefill_plan(static_cast<int>(path), static_cast<int>(head_dim), static_cast<int>(batch),
                           static_cast<int>(num_heads), static_cast<int>(max_seqlen_q), &plan),
              "prefill_plan: no kernel for path ", path, " and head dim ", head_dim);
  return {plan.block_m, plan.block_n, plan.threads, plan.smem_bytes, plan.grid_x, plan.grid_y, plan.grid_z};
}

std::tuple<std::vector<int64_t>, std::vector<int64_t>> prefill_mask_plan(int64_t seqlen_q, int64_t seqlen_k,
                                                                         int64_t window_left, int64_t window_right,
                                                                         int64_t block_m, int64_t block_n) {
  TORCH_CHECK(seqlen_q >= 0 && seqlen_k >= 0 && seqlen_q + seqlen_k <= (int64_t{1} << 20) && block_m > 0 &&
                  block_n > 0,
              "prefill_mask_plan: sizes out of range");
  const prefill::Mask mask{static_cast<int>(seqlen_k), static_cast<int>(seqlen_k - seqlen_q),
                           static_cast<int>(clamp_window(window_left, seqlen_q + seqlen_k)),
                           static_cast<int>(clamp_window(window_right, seqlen_q + seqlen_k))};
  const int64_t m_blocks = (seqlen_q + block_m - 1) / block_m;
  const int64_t k_tiles = (seqlen_k + block_n - 1) / block_n;
  std::vector<int64_t> tiles(m_blocks * k_tiles, 0);
  for (int64_t mb = 0; mb < m_blocks; ++mb) {
    const int m_first = static_cast<int>(mb * block_m);
    const int m_last = static_cast<int>(std::min(seqlen_q, (mb + 1) * block_m) - 1);
    int tile_begin, n_tiles;
    mask.tile_range(m_first, m_last, static_cast<int>(block_n), &tile_begin, &n_tiles);
    for (int t = tile_begin; t < tile_begin + n_tiles; ++t) {
      TORCH_CHECK(t >= 0 && t < k_tiles, "prefill_mask_plan: tile ", t, " outside [0, ", k_tiles, ")");
      tiles[mb * k_tiles + t] = mask.needs_mask(m_first, m_last, t * static_cast<int>(block_n),
                                                static_cast<int>(block_n))
                                    ? 2
                                    : 1;
    }
  }
  std::vector<int64_t> bounds(2 * seqlen_q);
  for (int64_t i = 0; i < seqlen_q; ++i) {
    int lo, hi;
    mask.row_bounds(static_cast<int>(i), &lo, &hi);
    bounds[2 * i] = lo;
    bounds[2 * i + 1] = hi;
  }
  return {tiles, bounds};
}

}  // namespace
}  // namespace kvk

TORCH_LIBRARY_FRAGMENT(KVK_OPS_NAMESPACE, m) {
  m.def("prefill(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor(a!) out, "
        "Tensor(b!) lse, int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, "
        "int window_right, float softcap, int path, Tensor? alibi_slopes=None) -> ()");
  m.def("prefill_plan(int path, int head_dim, int batch, int num_heads, int max_seqlen_q) -> int[]",
        &kvk::prefill_plan_op);
  m.def("prefill_mask_plan(int seqlen_q, int seqlen_k, int window_left, int window_right, int block_m, "
        "int block_n) -> (int[], int[])",
        &kvk::prefill_mask_plan);
}

TORCH_LIBRARY_IMPL(KVK_OPS_NAMESPACE, KVK_OPS_DISPATCH, m) { m.impl("prefill", &kvk::prefill_op); }
