// The Python module kvkernels._C and the torch op namespace torch.ops.kvkernels_C.
//
// Importing kvkernels._C loads this library, whose static initialisers register the raw ops
// (TORCH_LIBRARY_FRAGMENT in csrc/ops/<op>.cpp); the module itself has no Python functions, so
// Python.h is all it needs (no pybind11). The ops are reached as torch.ops.kvkernels_C.<name>,
// which torch.compile and torch.library understand.
#include <Python.h>

#include <torch/library.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Raw CUDA ops of kvkernels, registered as torch.ops.kvkernels_C.*",  // doc
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// Defines the namespace once; every op file adds its schemas with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(kvkernels_C, m) {}
