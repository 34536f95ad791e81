// Metadata checks shared by the torch glue of the ops (csrc/ops/<op>.cpp). Torch headers: included
// by the glue .cpp files only, never by kernel or launch files.
//
// `prefix` starts every error message ("decode: ", "prefill: ", or "" for none), so a raw-op call
// with bad metadata names the op that refused it.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "ops/device.h"

namespace kvk {

// t lives on `like`'s device, of the kind this build runs on (CUDA; the CPU for the emulator):
// every tensor of a launch is on one device, the one its guard selects.
inline void check_device(const char* prefix, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().type() == kOpsDevice, prefix, name, " must be a ", kOpsDeviceName, " tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == like.device(), prefix, name, " is on ", t.device(), ", expected ", like.device());
}

// The kernels move 16-byte vectors (plain loads, cp.async, TMA): the last dimension is contiguous,
// the start 16-byte aligned, and every other stride (of a dimension longer than 1, whose stride is
// never used otherwise) keeps that alignment. An empty tensor is never read or written: anything goes.
inline void check_vector_layout(const char* prefix, const char* name, const at::Tensor& t) {
  if (t.numel() == 0) return;
  TORCH_CHECK(t.size(-1) == 1 || t.stride(-1) == 1, prefix, name,
              " must be contiguous in its last dimension, got strides ", t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, prefix, name,
              " must start at a 16-byte aligned address");
  const int64_t elem = t.element_size();
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) == 1 || (t.stride(d) * elem) % 16 == 0, prefix, name, ": stride ", t.stride(d), " of dim ",
                d, " is not a multiple of 16 bytes");
  }
}

// alibi_slopes: fp32 [B, Hq] (batch stride may be 0: one slope per head), head stride 1, on q's device.
// Absent: nullptr (the kernels add no bias).
inline void set_alibi(const char* prefix, const std::optional<at::Tensor>& slopes, const at::Tensor& q, int64_t batch,
                      int64_t hq, const float*& ptr, int64_t& batch_stride) {
  ptr = nullptr;
  batch_stride = 0;
  if (!slopes.has_value()) return;
  const at::Tensor& s = *slopes;
  check_device(prefix, "alibi_slopes", s, q);
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == batch && s.size(1) == hq, prefix,
              "alibi_slopes must be float32 [B, Hq] = [", batch, ", ", hq, "] (batch stride 0 for one slope per head), "
              "got ", s.scalar_type(), " ", s.sizes());
  TORCH_CHECK(hq <= 1 || s.stride(1) == 1, prefix, "alibi_slopes must be contiguous along heads, got strides ",
              s.strides());
  ptr = s.data_ptr<float>();
  batch_stride = batch > 1 ? s.stride(0) : 0;
}

}  // namespace kvk
