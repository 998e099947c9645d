// pybind11 bindings of the CUDA gate. Everything is passed as raw device pointers and a raw
// cudaStream_t (integers), so buffers from torch, CuPy, cuda-python or TensorRT all work; shape and
// dtype validation happens in medfedpure.ops. Nothing here synchronises the device. The module links
// the CUDA runtime statically, so it imports without a driver (calls then return error 35).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "patch_gate.h"

namespace py = pybind11;

namespace medfedpure {
int empty_launch(void* stream);
int cuda_runtime_version();
const char* cuda_error_string(int code);
}  // namespace medfedpure

namespace {

int patch_gate(uintptr_t x, int x_dtype, uintptr_t recon, int recon_dtype, uintptr_t visible,
               int batch, int sets, int size, int patch, int stat, int topk, bool norm_pix,
               double tau, double tau_high, int t_min, int t_max, bool floor, uintptr_t score,
               uintptr_t flag, uintptr_t t_star, uintptr_t patch_err, uintptr_t counters,
               uintptr_t stream, uintptr_t work) {
  medfedpure::GateParams p{};
  p.batch = batch;
  p.sets = sets;
  p.size = size;
  p.patch = patch;
  p.stat = static_cast<medfedpure::GateStat>(stat);
  p.topk = topk;
  p.norm_pix = norm_pix;
  p.tau = static_cast<float>(tau);
  p.tau_high = static_cast<float>(tau_high);
  p.t_min = t_min;
  p.t_max = t_max;
  p.floor = floor;
  if (const char* msg = medfedpure::check_params(p)) throw py::value_error(msg);
  if (x_dtype < 0 || x_dtype > 1 || recon_dtype < 0 || recon_dtype > 1)
    throw py::value_error("dtype codes: 0 = float32, 1 = float16");
  medfedpure::GateOutputs out{reinterpret_cast<float*>(score), reinterpret_cast<uint8_t*>(flag),
                              reinterpret_cast<int32_t*>(t_star),
                              reinterpret_cast<float*>(patch_err), reinterpret_cast<float*>(work)};
  return medfedpure::patch_gate_cuda(
      reinterpret_cast<const void*>(x), static_cast<medfedpure::DType>(x_dtype),
      reinterpret_cast<const void*>(recon), static_cast<medfedpure::DType>(recon_dtype),
      reinterpret_cast<const uint8_t*>(visible), p, out, reinterpret_cast<uint32_t*>(counters),
      reinterpret_cast<void*>(stream));
}

int gate_reduce(uintptr_t scores, int dtype, int batch, int np, int stat, int topk, double tau,
                double tau_high, int t_min, int t_max, bool floor, uintptr_t score, uintptr_t flag,
                uintptr_t t_star, uintptr_t stream) {
  medfedpure::GateParams p{};
  p.batch = batch;
  p.stat = static_cast<medfedpure::GateStat>(stat);
  p.topk = topk;
  p.tau = static_cast<float>(tau);
  p.tau_high = static_cast<float>(tau_high);
  p.t_min = t_min;
  p.t_max = t_max;
  p.floor = floor;
  if (const char* msg = medfedpure::check_reduce_params(p, np)) throw py::value_error(msg);
  if (dtype < 0 || dtype > 1) throw py::value_error("dtype codes: 0 = float32, 1 = float16");
  medfedpure::GateOutputs out{reinterpret_cast<float*>(score), reinterpret_cast<uint8_t*>(flag),
                              reinterpret_cast<int32_t*>(t_star), nullptr, nullptr};
  return medfedpure::gate_reduce_cuda(reinterpret_cast<const void*>(scores), static_cast<medfedpure::DType>(dtype),
                                      np, p, out, reinterpret_cast<void*>(stream));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "medfedpure CUDA kernels: the fused patch gate as one launch (medfedpure.ops.patch_gate)";
  m.def("patch_gate", &patch_gate, py::arg("x"), py::arg("x_dtype"), py::arg("recon"),
        py::arg("recon_dtype"), py::arg("visible"), py::arg("batch"),
        py::arg("sets"), py::arg("size"), py::arg("patch"), py::arg("stat"), py::arg("topk"),
        py::arg("norm_pix"), py::arg("tau"), py::arg("tau_high"), py::arg("t_min"),
        py::arg("t_max"), py::arg("floor"), py::arg("score"), py::arg("flag"), py::arg("t_star"),
        py::arg("patch_err"), py::arg("counters"), py::arg("stream"), py::arg("work") = 0,
        "Enqueue the gate on `stream` (arguments may be positional: keyword parsing costs host "
        "time per launch). Device pointers: x [B,S,S], recon [B,K,S,S] (dtype code 0 = "
        "float32, 1 = float16), visible [K,Np] uint8, score [B] f32, flag [B] u8, t_star [B] i32, "
        "patch_err [B,Np] f32, counters [B] u32 (zero before, zero after), work [B,Np] f32 scratch "
        "(stats 2 = hfratio and 3 = nyqratio only; else 0). Returns the cudaError_t of the launch (0 = enqueued) or "
        "-1 when the sizes exceed the kernel's limits (shared memory: max(K S + 2 S/P, Np) floats, "
        "hfratio max(K S + (2P-3) S/P, 3 Np), nyqratio max(K S + (2P-8) S/P, 3 Np), <= 12288; topk: "
        "Np <= 32 threads; B <= 65535) or hfratio / nyqratio has no work buffer.");
  m.def("gate_reduce", &gate_reduce, py::arg("scores"), py::arg("dtype"), py::arg("batch"), py::arg("np"),
        py::arg("stat"), py::arg("topk"), py::arg("tau"), py::arg("tau_high"), py::arg("t_min"), py::arg("t_max"),
        py::arg("floor"), py::arg("score"), py::arg("flag"), py::arg("t_star"), py::arg("stream"),
        "Enqueue gate_reduce on `stream`: device pointers scores [B,Np] (dtype code 0 = float32, 1 = float16), "
        "score [B] f32, flag [B] u8, t_star [B] i32; stat 0 = mean, 1 = topk. Returns the cudaError_t of the "
        "launch (0 = enqueued) or -1 when Np exceeds the kernel's limits (Np <= 12288; topk: Np <= 32 * 1024).");
  m.def("empty_launch", [](uintptr_t stream) { return medfedpure::empty_launch(reinterpret_cast<void*>(stream)); },
        py::arg("stream"), "Launch an empty kernel <<<1,1>>> on `stream` (the timing floor).");
  m.def("runtime_version", &medfedpure::cuda_runtime_version);
  m.def("error_string", &medfedpure::cuda_error_string, py::arg("code"));
  m.attr("STAT_MEAN") = static_cast<int>(medfedpure::GateStat::kMean);
  m.attr("STAT_TOPK") = static_cast<int>(medfedpure::GateStat::kTopK);
  m.attr("STAT_HFRATIO") = static_cast<int>(medfedpure::GateStat::kHfRatio);
  m.attr("STAT_NYQRATIO") = static_cast<int>(medfedpure::GateStat::kNyqRatio);
}
