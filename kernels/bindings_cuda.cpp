#include <pybind11/pybind11.h>

extern "C" int medfedpure_cuda_runtime_version();

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "medfedpure CUDA kernels";
  m.def("runtime_version", &medfedpure_cuda_runtime_version);
}
