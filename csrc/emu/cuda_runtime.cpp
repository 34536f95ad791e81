// The CUDA runtime API calls the launchers make, answered by the emulator: one device, compute
// capability 8.0 (the instructions emu/ptx.h emulates), errors kept per host thread like the real
// runtime's last error.
#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdlib>
#include <string>

#include "emu/device.h"
#include "emu/tma.h"

#include <cstring>

namespace kvk {
namespace emu {
namespace {

thread_local cudaError_t g_last_error = cudaSuccess;
thread_local std::string g_last_message;

}  // namespace

void set_last_error(cudaError_t err, const char* message) {
  g_last_error = err;
  g_last_message = message;
}

// The demangled symbol of a kernel (kvk::decode::kvk_decode_kernel<__half, __half, 128, true>),
// or the launch expression when the symbol is not exported.
std::string kernel_name(const void* kernel, const char* expr) {
  Dl_info info;
  if (dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    if (status == 0 && demangled) {
      std::string name(demangled);
      free(demangled);
      return name;
    }
    return info.dli_sname;
  }
  return expr;
}

}  // namespace emu
}  // namespace kvk

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t err = kvk::emu::g_last_error;
  kvk::emu::g_last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError(void) { return kvk::emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulator)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulator)";
    case cudaErrorNotSupported: return "operation not supported by the emulator";
    default: return "error (emulator)";
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

// The emulator is one device, whatever the index: the glue asks with a CPU tensor's (-1).
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = kvk::emu::emulated_arch() / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = kvk::emu::emulated_arch() == 90 ? 132 : 108; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kvk::emu::emulated_smem_optin(); return cudaSuccess;
    default: return cudaErrorNotSupported;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorNotSupported;
  if (value < 0 || value > kvk::emu::emulated_smem_optin()) return cudaErrorInvalidValue;
  kvk::emu::set_max_dynamic_smem(func, value);
  return cudaSuccess;
}

}  // extern "C"

// The one driver entry point the kernels' launchers ask for is the TMA tensor-map encoder of the
// sm_90a prefill: the emulator's own (emu/tma.h), which checks the driver's argument rules.
extern "C" cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** ptr, unsigned int, unsigned long long,
                                                        cudaDriverEntryPointQueryResult* status) {
  if (symbol && strcmp(symbol, "cuTensorMapEncodeTiled") == 0) {
    *ptr = reinterpret_cast<void*>(&kvk::emu::tensor_map_encode_tiled);
    if (status) *status = cudaDriverEntryPointSuccess;
    return cudaSuccess;
  }
  *ptr = nullptr;
  if (status) *status = cudaDriverEntryPointSymbolNotFound;
  return cudaErrorNotSupported;
}
