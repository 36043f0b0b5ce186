// The Python module pfc_fast._simt: the CUDA kernels of pfc_fast run on CPU tensors by the SIMT
// layer (csrc/simt/simt.h), as the operators pfc_fast_simt::* with the schemas of pfc_fast::*
// (csrc/schemas.h), and the layer's controls:
//   set_block_order_seed(seed)  seeds the shuffled order in which launches run their blocks
//   stats()                     {"launches", "blocks", "threads", "switches"} since the import
//   multiprocessors             the SMs the emulated device reports (an H200's 132)
//   asan                        1 when built with AddressSanitizer (PFC_FAST_SIMT_ASAN=1)
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"
#include "simt.h"

namespace {

PyObject* set_block_order_seed(PyObject*, PyObject* arg) {
  const unsigned long long seed = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  pfc_simt::set_block_order_seed(seed);
  Py_RETURN_NONE;
}

PyObject* stats(PyObject*, PyObject*) {
  const pfc_simt::Stats s = pfc_simt::stats();
  return Py_BuildValue("{sKsKsKsK}", "launches", static_cast<unsigned long long>(s.launches), "blocks",
                       static_cast<unsigned long long>(s.blocks), "threads", static_cast<unsigned long long>(s.threads),
                       "switches", static_cast<unsigned long long>(s.switches));
}

PyMethodDef methods[] = {
    {"set_block_order_seed", set_block_order_seed, METH_O,
     "set_block_order_seed(seed: int) -> None: seeds the shuffled order of the blocks of every launch"},
    {"stats", stats, METH_NOARGS, "stats() -> dict: launches, blocks, threads and fiber switches so far"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__simt(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_simt", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyModule_AddIntConstant(module, "multiprocessors", pfc_simt::kMultiprocessors);
#ifdef PFC_SIMT_ASAN
  PyModule_AddIntConstant(module, "asan", 1);
#else
  PyModule_AddIntConstant(module, "asan", 0);
#endif
  return module;
}
}

TORCH_LIBRARY(pfc_fast_simt, m) { pfc_fast::define_ops(m); }
