// The fused patch gate: one operation, one signature for the CPU and the CUDA implementation.
//
// Semantics: docs/design.md, "Gate semantics"; the oracle is medfedpure.gate.patch_gate_reference, which
// mirrors the arithmetic below step for step so that all three implementations agree BIT FOR BIT
// on patch errors and scores (and therefore exactly on flags and t*, ties at tau included):
//
//   * every operation is a single IEEE-754 float32 operation, rounded to nearest (no FMA
//     contraction: the CPU build uses -ffp-contract=off, the CUDA code the __f*_rn intrinsics);
//   * a patch sum runs row by row: row partial = ((d(r,0)^2 + d(r,1)^2) + ...) left to right,
//     patch sum = ((row 0 + row 1) + row 2) + ... top to bottom;
//   * norm_pix target: mean = sum(x)/P^2, var = sum((x-mean)^2)/P^2 (population, two-pass, same
//     patch-sum order), target = (x - mean) / sqrtf(var + 1e-6f);
//   * e[b,p] = (((m_k0 + m_k1) + ...) over the hiding sets k in increasing k) / n_hiding,
//     m_k = patch sum of (recon[b,k] - target)^2 / P^2;
//   * score = lane32_sum(v) / n with v = e (stat mean, n = Np) or v = e with the non-selected
//     patches set to 0 (stat topk, n = topk; selection = the topk largest e, ties broken by the
//     lower patch index). lane32_sum: partial[j] = sequential sum of v[j], v[j+32], v[j+64], ...;
//     then partial[j] += partial[j+w] for w = 16, 8, 4, 2, 1; the result is partial[0]
//     (exactly a warp's shuffle-down reduction);
//   * decision (gate_decide below): see its comment.
//
// stat hfratio (pixel-space MAE only: norm_pix is refused; P >= 3). z = x as float32; per patch:
//   * a(r,j) = (z(r,j) - 2*z(r,j+1)) + z(r,j+2)                  r in [0,P), j in [0,P-2)
//     l(i,j) = ((a(i,j) - 2*a(i+1,j)) + a(i+2,j)) / 4            i, j in [0,P-2)
//     h = patch sum of l^2 (row partials left to right, rows top to bottom) / (P-2)^2
//   * g(i,j) = (((z(i,j) - z(i,j+1)) - z(i+1,j)) + z(i+1,j+1)) / 2   i, j in [0,P-1)
//     d = patch sum of g^2 (same order) / (P-1)^2
//   * e[b,p] = h / (d + 1e-6f)                                  -> patch_err
//   * w[p] = (((r_k0 + r_k1) + ...) over the hiding sets in increasing k) / n_hiding,
//     r_k = patch sum of recon[b,k] (same order) / P^2          (the MAE's tissue level)
//   * m = topk, or max(1, Np / 2) when topk == 0; selected = the m patches of largest w (rank by
//     #larger + #equal with a lower index < m, as for topk);
//   * lo, hi = the ((m-1)/2)-th and (m/2)-th smallest e among the selected (0-based);
//     score = lo when m is odd, else (lo + hi) / 2. Exact for finite values; a NaN in the
//     selection voids the contract for that scan (order statistics of NaN are undefined).
//
// stat nyqratio (pixel-space MAE only; P >= 8): as hfratio with h replaced by the 7th-order
// binomial difference n = (1, -7, 21, -35, 35, -21, 7, -1) along rows, then along columns:
//   * a(r,j) = ((((((z(r,j) - 7*z(r,j+1)) + 21*z(r,j+2)) - 35*z(r,j+3)) + 35*z(r,j+4))
//               - 21*z(r,j+5)) + 7*z(r,j+6)) - z(r,j+7),  then / 128     r in [0,P), j in [0,P-7)
//     q(i,j) = the same 8 taps down rows i..i+7 of a, then / 128         i, j in [0,P-7)
//     h = patch sum of q^2 (same order) / (P-7)^2;  d, e, w, m, selection and median as hfratio.
//
// gate_reduce (gate_reduce_cpu / gate_reduce_cuda): the same score and decision on per-patch values a
// model computed elsewhere (the attack detector's patch logits): e[b,p] = scores[b,p] as float32
// (float16 exactly converted; any sign), then score (stat mean or topk, as above: the lane32 sum over
// the Np values, non-selected ones 0 for topk) and gate_decide. GateParams: batch, stat, topk and the
// decision fields are read; sets, size, patch and norm_pix are not. A NaN voids the contract for its scan.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MFP_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define MFP_HD inline
#endif

namespace medfedpure {

// Element types of x and recon. Values match medfedpure.ops._DTYPE_CODES.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1 };

// The score statistic. Values match medfedpure.ops.STATS. A new statistic gets a value here,
// a branch in patch_gate_cpu.cpp, patch_gate_cuda.cu and patch_gate_reference, and the same tests.
enum class GateStat : int32_t { kMean = 0, kTopK = 1, kHfRatio = 2, kNyqRatio = 3 };

// The statistics scored as the median of per-patch spectral ratios over the m tissue patches.
MFP_HD bool is_spectral(GateStat s) { return s == GateStat::kHfRatio || s == GateStat::kNyqRatio; }

struct GateParams {
  int32_t batch;     // B >= 1
  int32_t sets;      // K >= 1 mask sets
  int32_t size;      // S: scans are S x S
  int32_t patch;     // P: divides S; Np = (S / P)^2 patches in row-major order
  GateStat stat;
  int32_t topk;      // 1 <= topk <= Np for kTopK; m in [0, Np] for kHfRatio / kNyqRatio (0 = Np / 2)
  bool norm_pix;     // normalise each target patch (MAE normalised-pixel target)
  float tau;         // flag threshold (float32)
  float tau_high;    // > tau: score at which t* reaches t_max
  int32_t t_min;     // 0 <= t_min <= t_max
  int32_t t_max;
  bool floor;        // unflagged scans get t_min instead of 0
};

// Outputs (host pointers for the CPU version, device pointers for the CUDA version).
struct GateOutputs {
  float* score;      // [B]
  uint8_t* flag;     // [B] 0 / 1
  int32_t* t_star;   // [B]
  float* patch_err;  // [B, Np]: e (the spectral ratios for kHfRatio / kNyqRatio)
  float* work;       // [B, Np] scratch, needed by the CUDA version for the spectral stats only (else unused;
                     // may be nullptr); the CPU version never uses it
};

// m of stats hfratio and nyqratio: the number of tissue patches whose median is the score.
MFP_HD int32_t hfratio_m(const GateParams& p, int32_t np) {
  return p.topk > 0 ? p.topk : (np / 2 > 0 ? np / 2 : 1);
}

// Decision from a float32 score, identical on host and device:
//   flag = score >= tau (float32 comparison);
//   unflagged: t* = floor ? t_min : 0;
//   flagged:   frac = clip((score - tau) / (tau_high - tau), 0, 1) in float64 from the float32 values,
//              v = t_min + (t_max - t_min) * frac in float64 (no FMA),
//              t* = floor(v + 0.5)   (round half up; v >= 0, so this is round half away from zero).
MFP_HD void gate_decide(float score, const GateParams& p, uint8_t* flag, int32_t* t_star) {
  const bool flagged = score >= p.tau;
  *flag = flagged ? 1 : 0;
  if (!flagged) {
    *t_star = p.floor ? p.t_min : 0;
    return;
  }
#if defined(__CUDA_ARCH__)
  double frac = __ddiv_rn(__dsub_rn(static_cast<double>(score), static_cast<double>(p.tau)),
                          __dsub_rn(static_cast<double>(p.tau_high), static_cast<double>(p.tau)));
  frac = fmin(fmax(frac, 0.0), 1.0);
  const double v = __dadd_rn(static_cast<double>(p.t_min),
                             __dmul_rn(static_cast<double>(p.t_max - p.t_min), frac));
  *t_star = static_cast<int32_t>(floor(__dadd_rn(v, 0.5)));
#else
  double frac = (static_cast<double>(score) - static_cast<double>(p.tau)) /
                (static_cast<double>(p.tau_high) - static_cast<double>(p.tau));
  frac = std::fmin(std::fmax(frac, 0.0), 1.0);
  const double span = static_cast<double>(p.t_max - p.t_min);
  const double scaled = span * frac;
  const double v = static_cast<double>(p.t_min) + scaled;
  *t_star = static_cast<int32_t>(std::floor(v + 0.5));
#endif
}

// CPU: x [B,S,S] and recon [B,K,S,S] C-contiguous of the given dtypes (float16 as IEEE half bits),
// visible [K,Np] uint8 (nonzero = shown to the encoder). Every patch must be hidden by some set.
// num_threads <= 0 picks a count from the work size. Throws std::invalid_argument on bad params.
// simd = false forces the scalar path (same results; the vector path is used only where the CPU
// has it, see patch_gate_cpu_simd_available).
void patch_gate_cpu(const void* x, DType x_dtype, const void* recon, DType recon_dtype,
                    const uint8_t* visible, const GateParams& params, const GateOutputs& out,
                    int num_threads);
void patch_gate_cpu(const void* x, DType x_dtype, const void* recon, DType recon_dtype,
                    const uint8_t* visible, const GateParams& params, const GateOutputs& out,
                    int num_threads, bool simd);
bool patch_gate_cpu_simd_available();

// CUDA: the same with device pointers, enqueued as ONE kernel launch on `stream` (a cudaStream_t;
// nullptr = legacy default stream). `counters` is a device array of B uint32 that must be zero
// before the launch and is zero again when the kernel completes (the last block of each scan resets
// it); use one counters buffer per stream. Never synchronises; returns the cudaError_t of the
// launch (0 = enqueued), or -1 when params exceed the kernel's limits (see patch_gate_cuda.cu).
int patch_gate_cuda(const void* x, DType x_dtype, const void* recon, DType recon_dtype,
                    const uint8_t* visible, const GateParams& params, const GateOutputs& out,
                    uint32_t* counters, void* stream);

// gate_reduce: scores [B, np] C-contiguous of the given dtype; out.score, out.flag, out.t_star are
// written (patch_err and work are not used). CPU: throws std::invalid_argument on bad params. CUDA:
// one launch of B blocks on `stream`, never synchronises; returns the cudaError_t of the launch, or -1
// when np exceeds the kernel's limits (np <= 32 * 1024 for topk, np <= 12288 shared floats).
void gate_reduce_cpu(const void* scores, DType dtype, int64_t np, const GateParams& params,
                     const GateOutputs& out);
int gate_reduce_cuda(const void* scores, DType dtype, int32_t np, const GateParams& params,
                     const GateOutputs& out, void* stream);

// The decision fields (tau, tau_high, t_min, t_max) of params; nullptr when fine.
inline const char* check_decision(const GateParams& p) {
  if (!(p.tau == p.tau) || !(p.tau_high == p.tau_high)) return "tau and tau_high must not be NaN";
  if (!(p.tau_high > p.tau)) return "tau_high must be > tau (after rounding both to float32)";
  if (p.t_min < 0 || p.t_min > p.t_max) return "need 0 <= t_min <= t_max";
  return nullptr;
}

// gate_reduce's params for np patch values per scan; nullptr when fine.
inline const char* check_reduce_params(const GateParams& p, int64_t np) {
  if (p.batch < 1) return "batch must be >= 1";
  if (np < 1) return "need at least one patch value per scan";
  if (p.stat != GateStat::kMean && p.stat != GateStat::kTopK) return "gate_reduce: stat must be mean or topk";
  if (p.stat == GateStat::kTopK && (p.topk < 1 || p.topk > np)) return "topk must be in [1, Np]";
  return check_decision(p);
}

// Validates params (shapes, ranges, thresholds); returns nullptr when fine, else a message that
// names the problem. Shared by both modules (the Python layer checks the same things first).
inline const char* check_params(const GateParams& p) {
  if (p.batch < 1) return "batch must be >= 1";
  if (p.sets < 1) return "recon must have K >= 1 mask sets";
  if (p.patch < 1 || p.size < 1) return "size and patch must be >= 1";
  if (p.size % p.patch != 0) return "patch must divide the scan size S";
  const int64_t side = p.size / p.patch;
  const int64_t np = side * side;
  if (p.stat != GateStat::kMean && p.stat != GateStat::kTopK && !is_spectral(p.stat))
    return "unknown stat code";
  if (p.stat == GateStat::kTopK && (p.topk < 1 || p.topk > np)) return "topk must be in [1, Np]";
  if (p.stat == GateStat::kHfRatio) {
    if (p.topk < 0 || p.topk > np) return "hfratio: topk (m) must be in [0, Np]";
    if (p.patch < 3) return "hfratio needs patch >= 3 (3x3 corner-band filter)";
    if (p.norm_pix) return "hfratio needs a pixel-space MAE (norm_pix must be false)";
  }
  if (p.stat == GateStat::kNyqRatio) {
    if (p.topk < 0 || p.topk > np) return "nyqratio: topk (m) must be in [0, Np]";
    if (p.patch < 8) return "nyqratio needs patch >= 8 (8-tap corner-band filter)";
    if (p.norm_pix) return "nyqratio needs a pixel-space MAE (norm_pix must be false)";
  }
  return check_decision(p);
}

}  // namespace medfedpure
