// The fused patch gate on the CPU. Arithmetic order: see patch_gate.h (it is the contract that the
// numpy oracle and the CUDA kernel follow too). Scans are independent, so the batch is split
// across std::threads; inside a scan the loops walk image rows left to right (contiguous loads)
// while each patch keeps its own running sums, which keeps the prescribed per-patch order.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "patch_gate.h"

namespace medfedpure {
namespace {

// IEEE binary16 bits -> float32 (exact; subnormals, inf and NaN included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Rows [row0, row0 + rows) of an S-wide image as float32: a direct pointer for float32 data, a
// converted copy in `buf` for float16.
const float* rows_as_float(const void* img, DType dtype, int64_t offset, int64_t count,
                           std::vector<float>& buf) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(img) + offset;
  const uint16_t* h = static_cast<const uint16_t*>(img) + offset;
  for (int64_t i = 0; i < count; ++i) buf[i] = half_to_float(h[i]);
  return buf.data();
}

// lane32_sum (patch_gate.h): 32 strided sequential partial sums, then a halving tree.
float lane32_sum(const float* v, int64_t n) {
  float part[32] = {0.0f};
  for (int64_t i = 0; i < n; ++i) part[i & 31] = part[i & 31] + v[i];
  for (int w = 16; w >= 1; w >>= 1)
    for (int j = 0; j < w; ++j) part[j] = part[j] + part[j + w];
  return part[0];
}

struct Scratch {
  std::vector<float> target, recon_buf, x_buf, sums, acc, mean, inv_std, sel;
  std::vector<float> order, w, a;
};

// stat hfratio for scan b (patch_gate.h spells out the order): e -> patch_err, w -> s.w, then the
// median of e over the m patches of largest w.
void hfratio_one_scan(const void* x, DType xd, const void* recon, DType rd, const uint8_t* visible,
                      const std::vector<int32_t>& n_hiding, const GateParams& p, int64_t b,
                      const GateOutputs& out, Scratch& s) {
  const int64_t S = p.size, P = p.patch, K = p.sets, side = S / P, np = side * side;
  const int64_t strip = P * S, P2 = P - 2, P1 = P - 1;
  const float p2 = static_cast<float>(P * P);
  const float nh = static_cast<float>(P2 * P2), nd = static_cast<float>(P1 * P1);
  float* err = out.patch_err + b * np;
  s.x_buf.resize(strip);
  s.recon_buf.resize(strip);
  s.sums.resize(side);
  s.acc.resize(side);
  s.w.resize(np);
  s.a.resize(P * P2);
  float* a = s.a.data();

  for (int64_t pr = 0; pr < side; ++pr) {
    const float* xs = rows_as_float(x, xd, b * S * S + pr * strip, strip, s.x_buf);
    for (int64_t pc = 0; pc < side; ++pc) {
      const float* z = xs + pc * P;  // z(r, c) = z[r * S + c]
      for (int64_t r = 0; r < P; ++r)
        for (int64_t j = 0; j < P2; ++j) {
          const float* zr = z + r * S + j;
          const float t = zr[0] - 2.0f * zr[1];
          a[r * P2 + j] = t + zr[2];
        }
      float hs = 0.0f;
      for (int64_t i = 0; i < P2; ++i) {
        float acc = 0.0f;
        for (int64_t j = 0; j < P2; ++j) {
          const float t = a[i * P2 + j] - 2.0f * a[(i + 1) * P2 + j];
          const float l = (t + a[(i + 2) * P2 + j]) / 4.0f;
          const float sq = l * l;
          acc = acc + sq;
        }
        hs = hs + acc;
      }
      float ds = 0.0f;
      for (int64_t i = 0; i < P1; ++i) {
        const float* z0 = z + i * S;
        const float* z1 = z0 + S;
        float acc = 0.0f;
        for (int64_t j = 0; j < P1; ++j) {
          const float t = (z0[j] - z0[j + 1]) - z1[j];
          const float g = (t + z1[j + 1]) / 2.0f;
          const float sq = g * g;
          acc = acc + sq;
        }
        ds = ds + acc;
      }
      const float h = hs / nh, d = ds / nd;
      err[pr * side + pc] = h / (d + 1e-6f);
    }

    // tissue level w: mean over the hiding sets of the patch mean of recon[b, k]
    std::fill(s.acc.begin(), s.acc.end(), 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t* vis = visible + k * np + pr * side;
      bool any_hidden = false;
      for (int64_t pc = 0; pc < side; ++pc) any_hidden |= (vis[pc] == 0);
      if (!any_hidden) continue;
      const float* rs =
          rows_as_float(recon, rd, (b * K + k) * S * S + pr * strip, strip, s.recon_buf);
      std::fill(s.sums.begin(), s.sums.end(), 0.0f);
      for (int64_t r = 0; r < P; ++r)
        for (int64_t pc = 0; pc < side; ++pc) {
          if (vis[pc]) continue;
          const float* rp = rs + r * S + pc * P;
          float acc = 0.0f;
          for (int64_t c = 0; c < P; ++c) acc = acc + rp[c];
          s.sums[pc] = s.sums[pc] + acc;
        }
      for (int64_t pc = 0; pc < side; ++pc)
        if (!vis[pc]) s.acc[pc] = s.acc[pc] + s.sums[pc] / p2;
    }
    for (int64_t pc = 0; pc < side; ++pc)
      s.w[pr * side + pc] = s.acc[pc] / static_cast<float>(n_hiding[pr * side + pc]);
  }

  // The m patches of largest w (ties: lower index), their e in s.sel; then the median.
  const int64_t m = hfratio_m(p, static_cast<int32_t>(np));
  s.order.assign(s.w.begin(), s.w.end());
  std::nth_element(s.order.begin(), s.order.begin() + (m - 1), s.order.end(),
                   [](float u, float v) { return u > v; });
  const float kth = s.order[m - 1];
  int64_t greater = 0;
  for (int64_t i = 0; i < np; ++i) greater += s.w[i] > kth;
  int64_t ties_left = m - greater;
  s.sel.clear();
  for (int64_t i = 0; i < np; ++i) {
    bool take = s.w[i] > kth;
    if (!take && s.w[i] == kth && ties_left > 0) {
      take = true;
      --ties_left;
    }
    if (take) s.sel.push_back(err[i]);
  }
  const int64_t mid = (m - 1) / 2;
  std::nth_element(s.sel.begin(), s.sel.begin() + mid, s.sel.end());
  const float lo = s.sel[mid];
  float score = lo;
  if (m % 2 == 0) {
    const float hi = *std::min_element(s.sel.begin() + mid + 1, s.sel.end());
    score = (lo + hi) / 2.0f;
  }
  out.score[b] = score;
  gate_decide(score, p, out.flag + b, out.t_star + b);
}

void gate_one_scan(const void* x, DType xd, const void* recon, DType rd, const uint8_t* visible,
                   const std::vector<int32_t>& n_hiding, const GateParams& p, int64_t b,
                   const GateOutputs& out, Scratch& s) {
  if (p.stat == GateStat::kHfRatio) {
    hfratio_one_scan(x, xd, recon, rd, visible, n_hiding, p, b, out, s);
    return;
  }
  const int64_t S = p.size, P = p.patch, K = p.sets, side = S / P, np = side * side;
  const int64_t strip = P * S;  // elements in one row of patches
  const float p2 = static_cast<float>(P * P);
  float* err = out.patch_err + b * np;
  s.target.resize(strip);
  s.recon_buf.resize(strip);
  s.x_buf.resize(strip);
  s.sums.resize(side);
  s.acc.resize(side);
  s.mean.resize(side);
  s.inv_std.resize(side);

  for (int64_t pr = 0; pr < side; ++pr) {
    const float* xs = rows_as_float(x, xd, b * S * S + pr * strip, strip, s.x_buf);
    float* tg = s.target.data();
    if (p.norm_pix) {
      // mean: patch sum of x in the prescribed order, then / P^2
      std::fill(s.sums.begin(), s.sums.end(), 0.0f);
      for (int64_t r = 0; r < P; ++r)
        for (int64_t pc = 0; pc < side; ++pc) {
          const float* row = xs + r * S + pc * P;
          float acc = 0.0f;
          for (int64_t c = 0; c < P; ++c) acc = acc + row[c];
          s.sums[pc] = s.sums[pc] + acc;
        }
      for (int64_t pc = 0; pc < side; ++pc) s.mean[pc] = s.sums[pc] / p2;
      // population variance, second pass
      std::fill(s.sums.begin(), s.sums.end(), 0.0f);
      for (int64_t r = 0; r < P; ++r)
        for (int64_t pc = 0; pc < side; ++pc) {
          const float* row = xs + r * S + pc * P;
          const float m = s.mean[pc];
          float acc = 0.0f;
          for (int64_t c = 0; c < P; ++c) {
            const float dv = row[c] - m;
            const float sq = dv * dv;
            acc = acc + sq;
          }
          s.sums[pc] = s.sums[pc] + acc;
        }
      for (int64_t pc = 0; pc < side; ++pc)
        s.inv_std[pc] = std::sqrt(s.sums[pc] / p2 + 1e-6f);  // holds the std (divided by below)
      for (int64_t r = 0; r < P; ++r)
        for (int64_t pc = 0; pc < side; ++pc) {
          const float m = s.mean[pc], sd = s.inv_std[pc];
          for (int64_t c = 0; c < P; ++c) {
            const int64_t i = r * S + pc * P + c;
            tg[i] = (xs[i] - m) / sd;
          }
        }
    } else {
      std::copy(xs, xs + strip, tg);
    }

    std::fill(s.acc.begin(), s.acc.end(), 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t* vis = visible + k * np + pr * side;
      bool any_hidden = false;
      for (int64_t pc = 0; pc < side; ++pc) any_hidden |= (vis[pc] == 0);
      if (!any_hidden) continue;
      const float* rs =
          rows_as_float(recon, rd, (b * K + k) * S * S + pr * strip, strip, s.recon_buf);
      std::fill(s.sums.begin(), s.sums.end(), 0.0f);
      for (int64_t r = 0; r < P; ++r) {
        const float* rrow = rs + r * S;
        const float* trow = tg + r * S;
        for (int64_t pc = 0; pc < side; ++pc) {
          if (vis[pc]) continue;
          const float* rp = rrow + pc * P;
          const float* tp = trow + pc * P;
          float acc = 0.0f;
          for (int64_t c = 0; c < P; ++c) {
            const float d = rp[c] - tp[c];
            const float sq = d * d;
            acc = acc + sq;
          }
          s.sums[pc] = s.sums[pc] + acc;
        }
      }
      for (int64_t pc = 0; pc < side; ++pc)
        if (!vis[pc]) s.acc[pc] = s.acc[pc] + s.sums[pc] / p2;
    }
    for (int64_t pc = 0; pc < side; ++pc)
      err[pr * side + pc] = s.acc[pc] / static_cast<float>(n_hiding[pr * side + pc]);
  }

  float score;
  if (p.stat == GateStat::kTopK) {
    // The topk largest e, ties broken by the lower patch index; the others count as 0.
    s.order.assign(err, err + np);
    const int64_t k = p.topk;
    std::nth_element(s.order.begin(), s.order.begin() + (k - 1), s.order.end(),
                     [](float a, float c) { return a > c; });
    const float kth = s.order[k - 1];
    int64_t greater = 0;
    for (int64_t i = 0; i < np; ++i) greater += err[i] > kth;
    int64_t ties_left = k - greater;
    s.sel.resize(np);
    for (int64_t i = 0; i < np; ++i) {
      bool take = err[i] > kth;
      if (!take && err[i] == kth && ties_left > 0) {
        take = true;
        --ties_left;
      }
      s.sel[i] = take ? err[i] : 0.0f;
    }
    score = lane32_sum(s.sel.data(), np) / static_cast<float>(k);
  } else {
    score = lane32_sum(err, np) / static_cast<float>(np);
  }
  out.score[b] = score;
  gate_decide(score, p, out.flag + b, out.t_star + b);
}

}  // namespace

void patch_gate_cpu(const void* x, DType x_dtype, const void* recon, DType recon_dtype,
                    const uint8_t* visible, const GateParams& params, const GateOutputs& out,
                    int num_threads) {
  if (const char* msg = check_params(params)) throw std::invalid_argument(msg);
  const int64_t side = params.size / params.patch, np = side * side;
  std::vector<int32_t> n_hiding(np, 0);
  for (int64_t k = 0; k < params.sets; ++k)
    for (int64_t i = 0; i < np; ++i) n_hiding[i] += visible[k * np + i] == 0;
  for (int64_t i = 0; i < np; ++i)
    if (n_hiding[i] == 0)
      throw std::invalid_argument("patch " + std::to_string(i) +
                                  " is visible in every mask set: each patch must be hidden by at "
                                  "least one set (visible[k, p] False for some k)");

  const int64_t B = params.batch;
  if (num_threads <= 0) {
    // One thread per ~4 M pixel-sets of work, so that thread start-up
    // never matters. On a loaded 2-core box a second thread only waits for a core, so the common
    // batch sizes run on one thread (benchmarks/RESULTS.md, "Gate and detector").
    const int64_t work = B * (params.sets + 1) * int64_t(params.size) * params.size;
    const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
    num_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(hw, work >> 22)));
  }
  num_threads = static_cast<int>(std::min<int64_t>(num_threads, B));

  auto run = [&](int64_t b0, int64_t b1) {
    Scratch s;
    for (int64_t b = b0; b < b1; ++b)
      gate_one_scan(x, x_dtype, recon, recon_dtype, visible, n_hiding, params, b, out, s);
  };
  if (num_threads <= 1) {
    run(0, B);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(num_threads - 1);
  const int64_t chunk = (B + num_threads - 1) / num_threads;
  for (int t = 1; t < num_threads; ++t) {
    const int64_t b0 = t * chunk, b1 = std::min(B, b0 + chunk);
    if (b0 < b1) pool.emplace_back(run, b0, b1);
  }
  run(0, std::min(B, chunk));
  for (auto& th : pool) th.join();
}

}  // namespace medfedpure
