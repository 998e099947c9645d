#include <pybind11/pybind11.h>
#include "patch_gate.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "medfedpure CPU kernels";
  m.def("build_info", &medfedpure::build_info);
}
