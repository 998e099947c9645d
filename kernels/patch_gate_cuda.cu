#include <cuda_runtime.h>

extern "C" int medfedpure_cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}
