// The Python module kvkernels._emu and the op namespace torch.ops.kvkernels_emu: the CUDA kernels
// of csrc/kernels, built as host C++ against the emulator (KVK_EMULATE), taking CPU tensors. The
// same torch glue as kvkernels._C (csrc/ops/*.cpp) registers the ops; see csrc/ops/module.cpp.
#include <Python.h>

#include <torch/library.h>

extern "C" {
PyMODINIT_FUNC PyInit__emu(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_emu",  // name
      "The CUDA kernels run by the CPU emulator, registered as torch.ops.kvkernels_emu.*",  // doc
      -1,      // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(kvkernels_emu, m) {}
