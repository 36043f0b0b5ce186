// The Python module pfc_fast._C and the registration of the operator schemas (csrc/schemas.h).
//
// The kernels live in csrc/<op family>/: <family>_cpu.cpp (always built) and <family>_cuda.cu
// (built with WITH_CUDA); each file registers its implementations with TORCH_LIBRARY_IMPL. Fake
// (meta) kernels for torch.compile are registered in Python (pfc_fast/_ops.py).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include "schemas.h"

extern "C" {
// Importing pfc_fast._C loads this shared library, which runs the static registrations below.
// The module carries the build flags read by pfc_fast.build_info().
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(module, "with_openmp", 1);
#else
  PyModule_AddIntConstant(module, "with_openmp", 0);
#endif
  PyModule_AddIntConstant(module, "native", PFC_NATIVE);  // built with -march=native (setup.py)
  PyModule_AddIntConstant(module, "torch_version_major", TORCH_VERSION_MAJOR);
  PyModule_AddIntConstant(module, "torch_version_minor", TORCH_VERSION_MINOR);
  PyModule_AddIntConstant(module, "torch_version_patch", TORCH_VERSION_PATCH);
  return module;
}
}

TORCH_LIBRARY(pfc_fast, m) { pfc_fast::define_ops(m); }
