// pybind11 bindings of the CPU gate: numpy in, numpy out, no copies of contiguous inputs.
// Validation with friendly messages lives in medfedpure.ops; the checks here are the last line of
// defence for direct callers (they raise ValueError / TypeError too).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>

#include "patch_gate.h"

namespace py = pybind11;
using medfedpure::DType;

namespace {

DType dtype_of(const py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<float>())) return DType::kFloat32;
  if (a.dtype().kind() == 'f' && a.dtype().itemsize() == 2) return DType::kFloat16;
  throw py::type_error(std::string(name) + " must be float32 or float16, got " +
                       std::string(py::str(a.dtype())));
}

void require_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous (np.ascontiguousarray)");
}

// x / recon shapes against each other and the parameters; fills batch, sets and size of p.
void check_shapes(const py::array& x, const py::array& recon, medfedpure::GateParams& p) {
  require_c_contiguous(x, "x");
  require_c_contiguous(recon, "recon");
  if (x.ndim() != 3 || x.shape(1) != x.shape(2))
    throw py::value_error("x must have shape [B, S, S]");
  if (recon.ndim() != 4 || recon.shape(0) != x.shape(0) || recon.shape(2) != x.shape(1) ||
      recon.shape(3) != x.shape(2))
    throw py::value_error("recon must have shape [B, K, S, S] matching x [B, S, S]");
  p.batch = static_cast<int32_t>(x.shape(0));
  p.sets = static_cast<int32_t>(recon.shape(1));
  p.size = static_cast<int32_t>(x.shape(1));
}

void check_visible(const py::array& visible, const medfedpure::GateParams& p) {
  require_c_contiguous(visible, "visible");
  if (visible.ndim() != 2 || visible.itemsize() != 1 || visible.shape(0) != p.sets)
    throw py::value_error("visible must be a bool/uint8 array of shape [K, Np]");
  const py::ssize_t side = p.size / p.patch, np = side * side;
  if (visible.shape(1) != np)
    throw py::value_error("visible has " + std::to_string(visible.shape(1)) +
                          " patches per set, expected Np = (S/patch)^2 = " + std::to_string(np));
}

// Runs the kernel on checked inputs; new output arrays (score, flag, t_star, patch_err).
py::tuple run(const py::array& x, const py::array& recon, const py::array& visible,
              const medfedpure::GateParams& p, int num_threads, bool simd) {
  const DType xd = dtype_of(x, "x"), rd = dtype_of(recon, "recon");
  const py::ssize_t side = p.size / p.patch, np = side * side;
  py::array_t<float> score(p.batch);
  py::array_t<bool> flag(p.batch);
  py::array_t<int32_t> t_star(p.batch);
  py::array_t<float> patch_err({static_cast<py::ssize_t>(p.batch), np});
  medfedpure::GateOutputs out{score.mutable_data(), reinterpret_cast<uint8_t*>(flag.mutable_data()),
                              t_star.mutable_data(), patch_err.mutable_data(), nullptr};
  {
    py::gil_scoped_release release;
    medfedpure::patch_gate_cpu(x.data(), xd, recon.data(), rd,
                               static_cast<const uint8_t*>(visible.data()), p, out, num_threads,
                               simd);
  }
  return py::make_tuple(score, flag, t_star, patch_err);
}

medfedpure::GateParams make_params(int patch, int stat, int topk, bool norm_pix, double tau,
                                   double tau_high, int t_min, int t_max, bool floor) {
  medfedpure::GateParams p{};
  p.patch = patch;
  p.stat = static_cast<medfedpure::GateStat>(stat);
  p.topk = topk;
  p.norm_pix = norm_pix;
  p.tau = static_cast<float>(tau);
  p.tau_high = static_cast<float>(tau_high);
  p.t_min = t_min;
  p.t_max = t_max;
  p.floor = floor;
  return p;
}

py::tuple patch_gate(const py::array& x, const py::array& recon, const py::array& visible,
                     int patch, int stat, int topk, bool norm_pix, double tau, double tau_high,
                     int t_min, int t_max, bool floor, int num_threads, bool simd) {
  medfedpure::GateParams p = make_params(patch, stat, topk, norm_pix, tau, tau_high, t_min, t_max, floor);
  check_shapes(x, recon, p);
  if (const char* msg = medfedpure::check_params(p)) throw py::value_error(msg);
  check_visible(visible, p);
  return run(x, recon, visible, p, num_threads, simd);
}

// The gate's score and decision on per-patch values computed elsewhere (patch_gate.h, gate_reduce).
py::tuple gate_reduce(const py::array& scores, int stat, int topk, double tau, double tau_high, int t_min,
                      int t_max, bool floor) {
  require_c_contiguous(scores, "scores");
  if (scores.ndim() != 2) throw py::value_error("scores must have shape [B, Np]");
  const DType dt = dtype_of(scores, "scores");
  medfedpure::GateParams p = make_params(1, stat, topk, false, tau, tau_high, t_min, t_max, floor);
  p.batch = static_cast<int32_t>(scores.shape(0));
  const int64_t np = scores.shape(1);
  if (const char* msg = medfedpure::check_reduce_params(p, np)) throw py::value_error(msg);
  py::array_t<float> score(p.batch);
  py::array_t<bool> flag(p.batch);
  py::array_t<int32_t> t_star(p.batch);
  medfedpure::GateOutputs out{score.mutable_data(), reinterpret_cast<uint8_t*>(flag.mutable_data()),
                              t_star.mutable_data(), nullptr, nullptr};
  {
    py::gil_scoped_release release;
    medfedpure::gate_reduce_cpu(scores.data(), dt, np, p, out);
  }
  return py::make_tuple(score, flag, t_star);
}

// One gate configuration (mask sets and parameters) fixed once, then called per batch with
// positional (x, recon, num_threads): what a serving loop repeats, without re-parsing keyword
// arguments or re-checking the mask sets.
class Prepared {
 public:
  Prepared(const py::array& visible, int patch, int stat, int topk, bool norm_pix, double tau,
           double tau_high, int t_min, int t_max, bool floor)
      : p_(make_params(patch, stat, topk, norm_pix, tau, tau_high, t_min, t_max, floor)) {
    require_c_contiguous(visible, "visible");
    if (visible.ndim() != 2 || visible.itemsize() != 1)
      throw py::value_error("visible must be a bool/uint8 array of shape [K, Np]");
    visible_ = py::array_t<uint8_t>({visible.shape(0), visible.shape(1)});
    std::memcpy(visible_.mutable_data(), visible.data(), static_cast<size_t>(visible.size()));
  }

  py::tuple operator()(const py::array& x, const py::array& recon, int num_threads) const {
    medfedpure::GateParams p = p_;
    check_shapes(x, recon, p);
    if (const char* msg = medfedpure::check_params(p)) throw py::value_error(msg);
    check_visible(visible_, p);
    return run(x, recon, visible_, p, num_threads, true);
  }

 private:
  medfedpure::GateParams p_;
  py::array_t<uint8_t> visible_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "medfedpure CPU kernels: the fused patch gate (see medfedpure.ops.patch_gate)";
  m.def("patch_gate", &patch_gate, py::arg("x"), py::arg("recon"), py::arg("visible"),
        py::kw_only(), py::arg("patch"), py::arg("stat"), py::arg("topk"), py::arg("norm_pix"),
        py::arg("tau"), py::arg("tau_high"), py::arg("t_min"), py::arg("t_max"), py::arg("floor"),
        py::arg("num_threads") = 0, py::arg("simd") = true,
        "x [B,S,S], recon [B,K,S,S] float32/float16 C-contiguous, visible [K,Np] bool; stat code "
        "0 = mean, 1 = topk, 2 = hfratio, 3 = nyqratio (topk = m, 0 = Np/2; patch_err = the ratios e). Returns (score [B] f32, flag [B] bool, t_star [B] i32, patch_err "
        "[B,Np] f32). num_threads <= 0: chosen from the work size; simd=False forces the scalar path "
        "(same results).");
  m.def("gate_reduce", &gate_reduce, py::arg("scores"), py::kw_only(), py::arg("stat"), py::arg("topk"),
        py::arg("tau"), py::arg("tau_high"), py::arg("t_min"), py::arg("t_max"), py::arg("floor"),
        "scores [B,Np] float32/float16 C-contiguous (per-patch values computed elsewhere, e.g. the attack "
        "detector's logits); stat code 0 = mean, 1 = topk. Returns (score [B] f32, flag [B] bool, "
        "t_star [B] i32), the same reduction and decision as patch_gate.");
  py::class_<Prepared>(m, "Prepared",
                       "patch_gate with visible [K, Np] and the parameters fixed (same keywords); "
                       "call as prepared(x, recon, num_threads) -> the same tuple.")
      .def(py::init<const py::array&, int, int, int, bool, double, double, int, int, bool>(),
           py::arg("visible"), py::kw_only(), py::arg("patch"), py::arg("stat"), py::arg("topk"),
           py::arg("norm_pix"), py::arg("tau"), py::arg("tau_high"), py::arg("t_min"),
           py::arg("t_max"), py::arg("floor"))
      .def("__call__", &Prepared::operator(), py::arg("x"), py::arg("recon"),
           py::arg("num_threads") = 0);
  m.attr("STAT_MEAN") = static_cast<int>(medfedpure::GateStat::kMean);
  m.attr("STAT_TOPK") = static_cast<int>(medfedpure::GateStat::kTopK);
  m.attr("SIMD") = medfedpure::patch_gate_cpu_simd_available();  // the AVX2 path is used
  m.attr("STAT_HFRATIO") = static_cast<int>(medfedpure::GateStat::kHfRatio);
  m.attr("STAT_NYQRATIO") = static_cast<int>(medfedpure::GateStat::kNyqRatio);
}
