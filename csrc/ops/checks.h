// Metadata checks shared by the torch glue of the ops (csrc/ops/<op>.cpp). Torch headers: included
// by the glue .cpp files only, never by kernel or launch files.
//
// `prefix` starts every error message ("decode: ", "prefill: ", or "" for none), so a raw-op call
// with bad metadata names the op that refused it.
#pragma once

#include <cstdint>

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

}  // namespace kvk
