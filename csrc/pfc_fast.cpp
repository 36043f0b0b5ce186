// The Python module pfc_fast._C and the registration of the operator schemas (csrc/schemas.h).
//
// The kernels live in csrc/<op family>/: <family>_cpu.cpp (always built, and once more for AVX2 +
// FMA as <family>_cpu_avx2.cpp; the variant is registered here, csrc/common/cpu_isa.h) and
// <family>_cuda.cu (built with WITH_CUDA, registered by that file with TORCH_LIBRARY_IMPL). Fake
// (meta) kernels for torch.compile are registered in Python (pfc_fast/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <torch/version.h>

#include "common/cpu_isa.h"
#include "schemas.h"

namespace {
// The CPU kernels' variant: the best this CPU supports (csrc/common/cpu_isa.h), or a lower one where
// PFC_FAST_CPU_KERNELS asks for it (baseline, avx2 or avx512; checked in pfc_fast/_ops.py).
int chosen_level() {
  static const int level = [] {
    int best = pfc_fast::cpu_level();
    const char* asked = std::getenv("PFC_FAST_CPU_KERNELS");
    if (asked == nullptr) return best;
    const std::string name(asked);
    const int wanted = name == "baseline" ? 0 : name == "avx2" ? 1 : 2;
    return std::min(best, wanted);
  }();
  return level;
}

// Which CPU kernels run here: "native" (built with -march=native), "avx512", "avx2" or "baseline".
const char* cpu_kernels() {
#if PFC_NATIVE
  return "native";
#elif defined(PFC_CPU_VARIANTS)
  static const char* const names[] = {"baseline", "avx2", "avx512"};
  return names[chosen_level()];
#else
  return "baseline";
#endif
}
}  // namespace

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
  PyModule_AddStringConstant(module, "cpu_kernels", cpu_kernels());
  PyModule_AddIntConstant(module, "torch_version_major", TORCH_VERSION_MAJOR);
  PyModule_AddIntConstant(module, "torch_version_minor", TORCH_VERSION_MINOR);
  PyModule_AddIntConstant(module, "torch_version_patch", TORCH_VERSION_PATCH);
  return module;
}
}

TORCH_LIBRARY(pfc_fast, m) { pfc_fast::define_ops(m); }

TORCH_LIBRARY_IMPL(pfc_fast, CPU, m) {
#ifdef PFC_CPU_VARIANTS
  const int level = chosen_level();
  if (level == 2) {
    pfc_fast::avx512::register_nc_cpu(m);
    pfc_fast::avx512::register_sinkhorn_cpu(m);
    return;
  }
  if (level == 1) {
    pfc_fast::avx2::register_nc_cpu(m);
    pfc_fast::avx2::register_sinkhorn_cpu(m);
    return;
  }
#endif
  pfc_fast::baseline::register_nc_cpu(m);
  pfc_fast::baseline::register_sinkhorn_cpu(m);
}
