// Makes edm_fast._C importable as a Python module (`import edm_fast._C`). Importing it runs the
// static TORCH_LIBRARY registration in ops.cpp; everything is then reached through
// torch.ops.edm_fast / torch.classes.edm_fast. Not part of the CMake (libtorch-only) build.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "edm_fast C++ ops (registered with torch.library)", -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
