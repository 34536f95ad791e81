// Where the raw ops run, for the torch glue (csrc/ops/*.cpp), which builds twice:
//   kvkernels._C    the GPU: CUDA tensors, ops torch.ops.kvkernels_C.*, the current CUDA stream
//   kvkernels._emu  the CPU emulator (KVK_EMULATE, csrc/emu/): CPU tensors, ops
//                   torch.ops.kvkernels_emu.*, the launchers run the kernels on the host
// Torch headers: included by the glue only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cuda_runtime_api.h>

#if defined(KVK_EMULATE)

#include "emu/runtime.h"

#define KVK_OPS_NAMESPACE kvkernels_emu  // TORCH_LIBRARY namespace of the ops
#define KVK_OPS_DISPATCH CPU             // dispatch key of their implementations

namespace kvk {

constexpr c10::DeviceType kOpsDevice = c10::DeviceType::CPU;
constexpr const char* kOpsDeviceName = "CPU (the CUDA emulator)";

// The launch context of an op: the emulator has no streams (a launch runs to completion).
class OpsLaunchContext {
 public:
  explicit OpsLaunchContext(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
};

// The device an op's kernel needs, by compute capability (80 or 90): the emulator plays an sm_80
// device, or an sm_90a one (its limits and its answers to cudaDeviceGetAttribute) inside this scope.
class OpsArchScope {
 public:
  explicit OpsArchScope(int arch) : scope_(arch) {}

 private:
  emu::EmulatedArch scope_;
};

}  // namespace kvk

#else

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define KVK_OPS_NAMESPACE kvkernels_C
#define KVK_OPS_DISPATCH CUDA

namespace kvk {

constexpr c10::DeviceType kOpsDevice = c10::DeviceType::CUDA;
constexpr const char* kOpsDeviceName = "CUDA";

// The tensor's device made current, and its current stream (graph capture records on it).
class OpsLaunchContext {
 public:
  explicit OpsLaunchContext(const at::Tensor& t) : guard_(t.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }

 private:
  c10::cuda::CUDAGuard guard_;
};

// On a GPU the device is what it is (the op checks its compute capability).
class OpsArchScope {
 public:
  explicit OpsArchScope(int) {}
};

}  // namespace kvk

#endif
