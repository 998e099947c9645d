// The fused patch gate on the CPU. Arithmetic order: see patch_gate.h (it is the contract that the
// numpy oracle and the CUDA kernel follow too).
//
// Work split. The unit of work is one strip (one row of patches, P image rows) of one scan: the
// strips of all scans are handed out from one atomic counter to the calling thread and to the
// helpers of a persistent pool, so a small batch is split across patches as well as across scans,
// and a helper that is not scheduled in time simply gets no strips (the caller takes them). Each
// strip writes its patches' e (and, for hfratio, its tissue levels w); once every strip is done
// the caller computes the per-scan scores, flags and t*, which need all patches of a scan. The pool
// times calls of one work shape alone and with helpers and uses the faster way (Pool::run): on a
// machine whose other cores are busy, the caller alone.
//
// Vectorisation (x86-64 with AVX2, chosen at run time). The contract sums every patch row left to
// right, which is a chain of dependent additions per row; the AVX2 path runs 8 such chains at once,
// one per SIMD lane: it loads 8 rows of a patch (8 columns at a time), computes the per-pixel term
// (squared difference, squared deviation, or the value itself) in the natural layout, transposes
// the 8 x 8 block in registers so that vector j holds column j of the 8 rows, and adds the column
// vectors in increasing j. Every lane therefore performs exactly the scalar sequence of float32
// operations (no FMA: the target enables AVX2 and F16C only, and the build uses -ffp-contract=off),
// and results stay bit-identical to the scalar path and the oracle. The rows of a patch are then
// added top to bottom in scalar code. The scalar path is kept for other CPUs (and for tests).
// The sums over the mask sets (float32 recon, P % 8 == 0) take a row-sequential path instead, one
// patch per lane: see "row-sequential path" below.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MFP_HAVE_AVX2_PATH 1
#include <immintrin.h>
#define MFP_AVX2 __attribute__((target("avx2,f16c")))
#else
#define MFP_HAVE_AVX2_PATH 0
#endif

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

// lane32_sum (patch_gate.h): 32 strided sequential partial sums, then a halving tree.
float lane32_sum(const float* v, int64_t n) {
  float part[32] = {0.0f};
  for (int64_t i = 0; i < n; ++i) part[i & 31] = part[i & 31] + v[i];
  for (int w = 16; w >= 1; w >>= 1)
    for (int j = 0; j < w; ++j) part[j] = part[j] + part[j + w];
  return part[0];
}

// Per-thread buffers, sized on first use and reused by every later call on the same thread.
struct Scratch {
  std::vector<float> x_buf, recon_buf, target, sums, acc, mean, inv_std, a, lap2, dia2;
  std::vector<float> order, sel;
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

template <class T>
void ensure(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// One call's inputs, shared by all workers.
struct Ctx {
  const void* x;
  DType xd;
  const void* recon;
  DType rd;
  const uint8_t* visible;
  const int32_t* n_hiding;  // [Np] number of sets hiding each patch
  const GateParams* p;
  GateOutputs out;
  float* w;  // [B, Np] hfratio tissue levels
  int64_t S, P, K, side, np;
};

// ---------------------------------------------------------------------------------------------
// scalar path: one strip (row of patches pr) of scan b
// ---------------------------------------------------------------------------------------------

// Rows [row0, row0 + rows) of an S-wide image as float32: a direct pointer for float32 data, a
// converted copy in `buf` for float16.
const float* rows_as_float(const void* img, DType dtype, int64_t offset, int64_t count,
                           std::vector<float>& buf) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(img) + offset;
  ensure(buf, static_cast<size_t>(count));
  const uint16_t* h = static_cast<const uint16_t*>(img) + offset;
  for (int64_t i = 0; i < count; ++i) buf[i] = half_to_float(h[i]);
  return buf.data();
}

// nyqratio's 8 taps (-1)^t C(7, t) over v[0], v[step], ..., v[7 step] in the contract's order, then / 128.
inline float nyq_taps(const float* v, int64_t step) {
  float acc = v[0];
  acc = acc - 7.0f * v[step];
  acc = acc + 21.0f * v[2 * step];
  acc = acc - 35.0f * v[3 * step];
  acc = acc + 35.0f * v[4 * step];
  acc = acc - 21.0f * v[5 * step];
  acc = acc + 7.0f * v[6 * step];
  acc = acc - v[7 * step];
  return acc / 128.0f;
}

// nyqratio's h of one patch z (row stride S): the 8-tap filter along rows into a [P][P-7], then down
// the columns of a; patch sum of q^2 (row partials left to right, rows top to bottom) / (P-7)^2.
float nyq_h(const float* z, int64_t S, int64_t P, float* a) {
  const int64_t P7 = P - 7;
  for (int64_t r = 0; r < P; ++r)
    for (int64_t j = 0; j < P7; ++j) a[r * P7 + j] = nyq_taps(z + r * S + j, 1);
  float hs = 0.0f;
  for (int64_t i = 0; i < P7; ++i) {
    float acc = 0.0f;
    for (int64_t j = 0; j < P7; ++j) {
      const float q = nyq_taps(a + i * P7 + j, P7);
      const float sq = q * q;
      acc = acc + sq;
    }
    hs = hs + acc;
  }
  return hs / static_cast<float>(P7 * P7);
}

// hfratio's h of one patch z (row stride S): a = the [1,-2,1] rows into a [P][P-2], l = [1,-2,1] down
// its columns / 4; patch sum of l^2 / (P-2)^2.
float lap_h(const float* z, int64_t S, int64_t P, float* a) {
  const int64_t P2 = P - 2;
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
  return hs / static_cast<float>(P2 * P2);
}

// hfratio / nyqratio: e of the strip's patches -> patch_err, their tissue levels -> ctx.w.
void hfratio_strip_scalar(const Ctx& c, int64_t b, int64_t pr, Scratch& s) {
  const int64_t S = c.S, P = c.P, K = c.K, side = c.side, np = c.np;
  const int64_t strip = P * S, P2 = P - 2, P1 = P - 1;
  const float p2 = static_cast<float>(P * P);
  const float nd = static_cast<float>(P1 * P1);
  float* err = c.out.patch_err + b * np;
  ensure(s.sums, side);
  ensure(s.acc, side);
  ensure(s.a, P * P2);
  float* a = s.a.data();

  const float* xs = rows_as_float(c.x, c.xd, b * S * S + pr * strip, strip, s.x_buf);
  const bool nyq = c.p->stat == GateStat::kNyqRatio;
  for (int64_t pc = 0; pc < side; ++pc) {
    const float* z = xs + pc * P;  // z(r, c) = z[r * S + c]
    const float h = nyq ? nyq_h(z, S, P, a) : lap_h(z, S, P, a);
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
    const float d = ds / nd;
    err[pr * side + pc] = h / (d + 1e-6f);
  }

  // tissue level w: mean over the hiding sets of the patch mean of recon[b, k]
  std::fill(s.acc.begin(), s.acc.begin() + side, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const uint8_t* vis = c.visible + k * np + pr * side;
    bool any_hidden = false;
    for (int64_t pc = 0; pc < side; ++pc) any_hidden |= (vis[pc] == 0);
    if (!any_hidden) continue;
    const float* rs = rows_as_float(c.recon, c.rd, (b * K + k) * S * S + pr * strip, strip, s.recon_buf);
    std::fill(s.sums.begin(), s.sums.begin() + side, 0.0f);
    for (int64_t r = 0; r < P; ++r)
      for (int64_t pc = 0; pc < side; ++pc) {
        if (vis[pc]) continue;
        const float* rp = rs + r * S + pc * P;
        float acc = 0.0f;
        for (int64_t cc = 0; cc < P; ++cc) acc = acc + rp[cc];
        s.sums[pc] = s.sums[pc] + acc;
      }
    for (int64_t pc = 0; pc < side; ++pc)
      if (!vis[pc]) s.acc[pc] = s.acc[pc] + s.sums[pc] / p2;
  }
  for (int64_t pc = 0; pc < side; ++pc)
    c.w[b * np + pr * side + pc] = s.acc[pc] / static_cast<float>(c.n_hiding[pr * side + pc]);
}

// mean / topk: e of the strip's patches -> patch_err.
void err_strip_scalar(const Ctx& c, int64_t b, int64_t pr, Scratch& s) {
  const int64_t S = c.S, P = c.P, K = c.K, side = c.side, np = c.np;
  const int64_t strip = P * S;  // elements in one row of patches
  const float p2 = static_cast<float>(P * P);
  float* err = c.out.patch_err + b * np;
  ensure(s.sums, side);
  ensure(s.acc, side);
  ensure(s.mean, side);
  ensure(s.inv_std, side);

  const float* xs = rows_as_float(c.x, c.xd, b * S * S + pr * strip, strip, s.x_buf);
  const float* tg = xs;
  if (c.p->norm_pix) {
    ensure(s.target, strip);
    float* t = s.target.data();
    // mean: patch sum of x in the prescribed order, then / P^2
    std::fill(s.sums.begin(), s.sums.begin() + side, 0.0f);
    for (int64_t r = 0; r < P; ++r)
      for (int64_t pc = 0; pc < side; ++pc) {
        const float* row = xs + r * S + pc * P;
        float acc = 0.0f;
        for (int64_t cc = 0; cc < P; ++cc) acc = acc + row[cc];
        s.sums[pc] = s.sums[pc] + acc;
      }
    for (int64_t pc = 0; pc < side; ++pc) s.mean[pc] = s.sums[pc] / p2;
    // population variance, second pass
    std::fill(s.sums.begin(), s.sums.begin() + side, 0.0f);
    for (int64_t r = 0; r < P; ++r)
      for (int64_t pc = 0; pc < side; ++pc) {
        const float* row = xs + r * S + pc * P;
        const float m = s.mean[pc];
        float acc = 0.0f;
        for (int64_t cc = 0; cc < P; ++cc) {
          const float dv = row[cc] - m;
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
        for (int64_t cc = 0; cc < P; ++cc) {
          const int64_t i = r * S + pc * P + cc;
          t[i] = (xs[i] - m) / sd;
        }
      }
    tg = t;
  }

  std::fill(s.acc.begin(), s.acc.begin() + side, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const uint8_t* vis = c.visible + k * np + pr * side;
    bool any_hidden = false;
    for (int64_t pc = 0; pc < side; ++pc) any_hidden |= (vis[pc] == 0);
    if (!any_hidden) continue;
    const float* rs = rows_as_float(c.recon, c.rd, (b * K + k) * S * S + pr * strip, strip, s.recon_buf);
    std::fill(s.sums.begin(), s.sums.begin() + side, 0.0f);
    for (int64_t r = 0; r < P; ++r) {
      const float* rrow = rs + r * S;
      const float* trow = tg + r * S;
      for (int64_t pc = 0; pc < side; ++pc) {
        if (vis[pc]) continue;
        const float* rp = rrow + pc * P;
        const float* tp = trow + pc * P;
        float acc = 0.0f;
        for (int64_t cc = 0; cc < P; ++cc) {
          const float d = rp[cc] - tp[cc];
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
    err[pr * side + pc] = s.acc[pc] / static_cast<float>(c.n_hiding[pr * side + pc]);
}

// ---------------------------------------------------------------------------------------------
// AVX2 path: the same strip, 8 row chains per instruction
// ---------------------------------------------------------------------------------------------
#if MFP_HAVE_AVX2_PATH

constexpr int64_t kPad = 8;  // extra columns (and rows) of the padded strip buffers

// r[j] <- column j of the 8 x 8 block whose row i is r[i] (lane i of r[j] = old lane j of r[i]).
MFP_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// The per-pixel term of a row sum. Kind 0: a; kind 1: (a - b)^2 with b a second image; kind 2:
// (a - m)^2 with m one value.
enum TermKind { kValue = 0, kSqDiff = 1, kSqDev = 2 };

// Lane i = the left-to-right sum over columns [0, len) of the term on row i of 8 rows (rows i*lda
// apart). Reads 8 rows x round_up(len, 8) columns of a (and of b).
template <int Kind>
MFP_AVX2 inline __m256 rowsum8(const float* a, int64_t lda, const float* b, int64_t ldb, float m,
                               int64_t len) {
  __m256 acc = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  for (int64_t c0 = 0; c0 < len; c0 += 8) {
    __m256 v[8];
    for (int i = 0; i < 8; ++i) {
      const __m256 x = _mm256_loadu_ps(a + i * lda + c0);
      if (Kind == kValue) {
        v[i] = x;
      } else {
        const __m256 d = _mm256_sub_ps(x, Kind == kSqDiff ? _mm256_loadu_ps(b + i * ldb + c0) : mv);
        v[i] = _mm256_mul_ps(d, d);
      }
    }
    transpose8(v);
    const int64_t n = std::min<int64_t>(8, len - c0);
    for (int64_t j = 0; j < n; ++j) acc = _mm256_add_ps(acc, v[j]);
  }
  return acc;
}

// Patch sum of the term over rows [0, rows) and columns [0, len): row partials left to right (8
// rows per rowsum8), then rows top to bottom. Reads round_up(rows, 8) rows.
template <int Kind>
MFP_AVX2 inline float patch_sum(const float* a, int64_t lda, const float* b, int64_t ldb, float m,
                                int64_t rows, int64_t len) {
  float total = 0.0f;
  alignas(32) float part[8];
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    _mm256_store_ps(part, rowsum8<Kind>(a + r0 * lda, lda, b + r0 * ldb, ldb, m, len));
    const int64_t n = std::min<int64_t>(8, rows - r0);
    for (int64_t i = 0; i < n; ++i) total = total + part[i];
  }
  return total;
}

// Rows [0, rows) of an S-wide strip starting at element `offset` of img, as float32 with a leading
// dimension *ld. float32 data is read in place when `direct` (the caller's reads stay inside the
// strip: P % 8 == 0); otherwise it is copied (float16 converted exactly with F16C) into buf, whose
// rows are S + kPad wide and which has kPad extra rows, all readable.
MFP_AVX2 const float* strip_avx2(const void* img, DType dtype, int64_t offset, int64_t rows, int64_t S,
                                 bool direct, std::vector<float>& buf, int64_t* ld) {
  if (dtype == DType::kFloat32 && direct) {
    *ld = S;
    return static_cast<const float*>(img) + offset;
  }
  const int64_t w = S + kPad;
  if (buf.size() < static_cast<size_t>(w * (rows + kPad))) buf.assign(w * (rows + kPad), 0.0f);
  float* out = buf.data();
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * w;
    if (dtype == DType::kFloat32) {
      std::memcpy(o, static_cast<const float*>(img) + offset + r * S, S * sizeof(float));
    } else {
      const uint16_t* h = static_cast<const uint16_t*>(img) + offset + r * S;
      int64_t i = 0;
      for (; i + 8 <= S; i += 8)
        _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
      for (; i < S; ++i) o[i] = half_to_float(h[i]);
    }
  }
  *ld = w;
  return out;
}

// Asks for the `bytes` bytes at `p` to be brought into the cache while the current strip is
// computed: the strips of one scan's K + 1 images lie far apart, and a strip is read patch by patch
// (8 rows at a time), which the hardware prefetchers do not follow well.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// The strip of image `img` (0 = x, 1 + k = recon set k) that follows (img, b, pr) in the order the
// strips of one worker are visited (images of one strip, then the next strip).
inline void prefetch_next(const Ctx& c, int64_t img, int64_t b, int64_t pr) {
  const int64_t S = c.S, P = c.P, K = c.K;
  int64_t nb = b, npr = pr, nimg = img + 1;
  if (nimg > K) {
    nimg = 0;
    if (++npr == c.side) {
      npr = 0;
      if (++nb == c.p->batch) return;
    }
  }
  const int64_t off = npr * P * S;
  if (nimg == 0) {
    const int64_t es = c.xd == DType::kFloat32 ? 4 : 2;
    prefetch(static_cast<const char*>(c.x) + (nb * S * S + off) * es, P * S * es);
    return;
  }
  // recon set k: only the rows of the patches it hides (the others are never read)
  const int64_t es = c.rd == DType::kFloat32 ? 4 : 2;
  const char* base = static_cast<const char*>(c.recon) + ((nb * K + nimg - 1) * S * S + off) * es;
  const uint8_t* vis = c.visible + (nimg - 1) * c.np + npr * c.side;
  for (int64_t pc = 0; pc < c.side; ++pc) {
    if (vis[pc]) continue;
    for (int64_t r = 0; r < P; ++r) prefetch(base + (r * S + pc * P) * es, P * es);
  }
}

// ---------------------------------------------------------------------------------------------
// row-sequential path for the mask-set sums (float32 recon, P % 8 == 0)
// ---------------------------------------------------------------------------------------------
//
// The per-set loops of the strip kernels read recon set by set, patch by patch (8 rows at a time,
// each row S floats from the next), and transpose full 8 x 8 blocks (24 shuffles, 8 of them
// lane-crossing). When the inputs come from memory rather than the cache (the usual case: the MAE
// that produced recon ran just before and evicted them), that access order is what costs. The path
// below reads a strip row after row instead, all sets in step (the target row once for them), so
// the hardware prefetchers see K + 1 plain sequential streams; and it loads blocks
// "half-combined": vector i (i < 4) holds 4 columns of one item (a row, or a patch) in its low 128
// bits and of item i + 4 in its high 128 bits (one 128-bit load plus one insert from memory, no
// shuffle), so that an in-lane 4 x 4 transpose (8 shuffles, none lane-crossing) leaves column c + j
// of items 0..7 in vector j, lane i = item i. Every lane performs the scalar contract's sequence of
// float32 operations, so results stay bit-identical.

// [p[0..4) | p[4 ld .. 4 ld + 4)]: columns [0, 4) of items 0 and 4 (items ld floats apart).
MFP_AVX2 inline __m256 load_hc(const float* p, int64_t ld) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm_loadu_ps(p + 4 * ld), 1);
}

// In-lane 4 x 4 transpose of the two 128-bit halves of v[0..4).
MFP_AVX2 inline void transpose4_inlane(__m256 v[4]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  v[0] = _mm256_shuffle_ps(t0, t2, 0x44);
  v[1] = _mm256_shuffle_ps(t0, t2, 0xEE);
  v[2] = _mm256_shuffle_ps(t1, t3, 0x44);
  v[3] = _mm256_shuffle_ps(t1, t3, 0xEE);
}

// tot[n] = patch sum over one P x P patch of (r[n] - t)^2 (Sq) or of r[n] (not Sq), n < N, in the
// contract's order: row partials left to right (lane = row of 8), rows top to bottom. P % 8 == 0.
// For the patches of a strip beyond its last full group of 8 (see strip_sets_rows).
template <int N, bool Sq>
MFP_AVX2 inline void patch_sums_fused(const float* t, int64_t ldt, const float* const* r, int64_t ldr,
                                      int64_t P, float* tot) {
  for (int n = 0; n < N; ++n) tot[n] = 0.0f;
  alignas(32) float part[N][8];
  for (int64_t r0 = 0; r0 < P; r0 += 8) {
    __m256 acc[N];
    for (int n = 0; n < N; ++n) acc[n] = _mm256_setzero_ps();
    const float* tb = t + r0 * ldt;
    for (int64_t c0 = 0; c0 < P; c0 += 4) {
      __m256 tv[4];
      if (Sq)
        for (int i = 0; i < 4; ++i) tv[i] = load_hc(tb + i * ldt + c0, ldt);
      for (int n = 0; n < N; ++n) {
        const float* rb = r[n] + r0 * ldr + c0;
        __m256 v[4];
        for (int i = 0; i < 4; ++i) {
          const __m256 a = load_hc(rb + i * ldr, ldr);
          if (Sq) {
            const __m256 d = _mm256_sub_ps(a, tv[i]);
            v[i] = _mm256_mul_ps(d, d);
          } else {
            v[i] = a;
          }
        }
        transpose4_inlane(v);
        for (int j = 0; j < 4; ++j) acc[n] = _mm256_add_ps(acc[n], v[j]);
      }
    }
    for (int n = 0; n < N; ++n) _mm256_store_ps(part[n], acc[n]);
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < 8; ++i) tot[n] = tot[n] + part[n][i];
  }
}

template <bool Sq>
MFP_AVX2 inline void patch_sums_fused_n(int n, const float* t, int64_t ldt, const float* const* r,
                                        int64_t ldr, int64_t P, float* tot) {
  switch (n) {
    case 1: patch_sums_fused<1, Sq>(t, ldt, r, ldr, P, tot); break;
    case 2: patch_sums_fused<2, Sq>(t, ldt, r, ldr, P, tot); break;
    case 3: patch_sums_fused<3, Sq>(t, ldt, r, ldr, P, tot); break;
    default: patch_sums_fused<4, Sq>(t, ldt, r, ldr, P, tot); break;
  }
}

// Lane = patch: for 8 patches p0..p0+7 of one image row, vector i (i < 4) is loaded half-combined as
// [patch p0+i | patch p0+4+i] at columns [c, c+4) of each patch; after the in-lane transpose vector
// j holds column c+j of the 8 patches, lane i = patch p0+i. Each lane adds its patch row's terms
// left to right, then the row partials of the patch top to bottom (one vector add per row): the
// contract's order. Mask sets are applied as lane blends after the sums: a set's visible patches
// are computed (their reads keep the streams sequential) but never added.

// rowacc[n] = row partials (lane = patch) of the 8 patches at row pointer t / r[n] (the first patch's
// first column), n < N.
template <int N, bool Sq>
MFP_AVX2 inline void rowsum_patches(const float* t, const float* const* r, int64_t P, __m256* rowacc) {
  for (int n = 0; n < N; ++n) rowacc[n] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < P; c0 += 4) {
    __m256 tv[4];
    if (Sq)
      for (int i = 0; i < 4; ++i) tv[i] = load_hc(t + i * P + c0, P);
    for (int n = 0; n < N; ++n) {
      __m256 v[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 a = load_hc(r[n] + i * P + c0, P);
        if (Sq) {
          const __m256 d = _mm256_sub_ps(a, tv[i]);
          v[i] = _mm256_mul_ps(d, d);
        } else {
          v[i] = a;
        }
      }
      transpose4_inlane(v);
      for (int j = 0; j < 4; ++j) rowacc[n] = _mm256_add_ps(rowacc[n], v[j]);
    }
  }
}

// tot[(g * N + n) * 8 + i] = patch sum (lane i = patch g*8 + i of the strip) over the P rows of the
// strip of set n, for the first `groups` groups of 8 patches. r: the strip of the first set, sets
// `set_stride` floats apart; t: the strip's target rows (ldt apart; unused when not Sq).
template <int N, bool Sq>
MFP_AVX2 void strip_rows_sets(const float* t, int64_t ldt, const float* r, int64_t set_stride, int64_t S,
                              int64_t P, int64_t groups, float* tot) {
  std::fill(tot, tot + groups * N * 8, 0.0f);
  for (int64_t row = 0; row < P; ++row) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* rp[N];
      for (int n = 0; n < N; ++n) rp[n] = r + n * set_stride + row * S + g * 8 * P;
      __m256 ra[N];
      rowsum_patches<N, Sq>(Sq ? t + row * ldt + g * 8 * P : rp[0], rp, P, ra);
      for (int n = 0; n < N; ++n) {
        float* tp = tot + (g * N + n) * 8;
        _mm256_storeu_ps(tp, _mm256_add_ps(_mm256_loadu_ps(tp), ra[n]));
      }
    }
  }
}

// acc[pc] = ((m_k0 + m_k1) + ...) over the sets k hiding patch (pr, pc) of scan b, increasing k,
// m_k = patch sum of (recon[b, k] - t)^2 (Sq) or of recon[b, k] (not Sq), / P^2; t: the strip's
// target rows, ldt apart (x, or the norm_pix target). The full groups of 8 patches by rows, lane =
// patch; the last side % 8 patches of the strip per patch. acc: [side].
template <bool Sq>
MFP_AVX2 void strip_sets_rows(const Ctx& c, int64_t b, int64_t pr, const float* t, int64_t ldt, float* acc,
                              Scratch& s) {
  const int64_t S = c.S, P = c.P, K = c.K, side = c.side, np = c.np;
  const int64_t groups = side / 8;
  const __m256 p2 = _mm256_set1_ps(static_cast<float>(P * P));
  const float* recon = static_cast<const float*>(c.recon) + (b * K) * S * S + pr * P * S;
  ensure(s.sums, static_cast<size_t>(groups * 4 * 8));
  float* tot = s.sums.data();
  for (int64_t g = 0; g < groups; ++g) _mm256_storeu_ps(acc + g * 8, _mm256_setzero_ps());
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    const int n = static_cast<int>(std::min<int64_t>(4, K - k0));
    const float* r = recon + k0 * S * S;
    switch (n) {
      case 1: strip_rows_sets<1, Sq>(t, ldt, r, S * S, S, P, groups, tot); break;
      case 2: strip_rows_sets<2, Sq>(t, ldt, r, S * S, S, P, groups, tot); break;
      case 3: strip_rows_sets<3, Sq>(t, ldt, r, S * S, S, P, groups, tot); break;
      default: strip_rows_sets<4, Sq>(t, ldt, r, S * S, S, P, groups, tot); break;
    }
    for (int j = 0; j < n; ++j) {
      const uint8_t* vis = c.visible + (k0 + j) * np + pr * side;
      for (int64_t g = 0; g < groups; ++g) {
        // lanes of the patches this set hides: all ones
        const __m128i v8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(vis + g * 8));
        const __m256 hidden =
            _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(v8), _mm256_setzero_si256()));
        const __m256 a = _mm256_loadu_ps(acc + g * 8);
        const __m256 m = _mm256_div_ps(_mm256_loadu_ps(tot + (g * n + j) * 8), p2);
        _mm256_storeu_ps(acc + g * 8, _mm256_blendv_ps(a, _mm256_add_ps(a, m), hidden));
      }
    }
  }
  if (groups * 8 < side) {
    // the last side % 8 patches: per patch, lane = row
    const float pf = static_cast<float>(P * P);
    const float* rr[4];
    float tt[4];
    for (int64_t pc = groups * 8; pc < side; ++pc) {
      float a = 0.0f;
      int n = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (c.visible[k * np + pr * side + pc]) continue;
        rr[n++] = recon + k * S * S + pc * P;
        if (n == 4) {
          patch_sums_fused_n<Sq>(n, Sq ? t + pc * P : rr[0], Sq ? ldt : S, rr, S, P, tt);
          for (int i = 0; i < n; ++i) a = a + tt[i] / pf;
          n = 0;
        }
      }
      if (n > 0) {
        patch_sums_fused_n<Sq>(n, Sq ? t + pc * P : rr[0], Sq ? ldt : S, rr, S, P, tt);
        for (int i = 0; i < n; ++i) a = a + tt[i] / pf;
      }
      acc[pc] = a;
    }
  }
}

MFP_AVX2 void err_strip_avx2(const Ctx& c, int64_t b, int64_t pr, Scratch& s) {
  const int64_t S = c.S, P = c.P, K = c.K, side = c.side, np = c.np;
  const float p2 = static_cast<float>(P * P);
  const bool direct = P % 8 == 0;
  float* err = c.out.patch_err + b * np;
  ensure(s.acc, side);

  int64_t ldx = 0;
  prefetch_next(c, 0, b, pr);
  const float* xs = strip_avx2(c.x, c.xd, b * S * S + pr * P * S, P, S, direct, s.x_buf, &ldx);
  const float* tg = xs;
  int64_t ldt = ldx;
  if (c.p->norm_pix) {
    ldt = S + kPad;
    if (s.target.size() < static_cast<size_t>(ldt * (P + kPad))) s.target.assign(ldt * (P + kPad), 0.0f);
    float* t = s.target.data();
    for (int64_t pc = 0; pc < side; ++pc) {
      const float* xp = xs + pc * P;
      const float mean = patch_sum<kValue>(xp, ldx, xp, ldx, 0.0f, P, P) / p2;
      const float var = patch_sum<kSqDev>(xp, ldx, xp, ldx, mean, P, P) / p2;
      const float sd = std::sqrt(var + 1e-6f);
      for (int64_t r = 0; r < P; ++r) {
        const float* __restrict__ xr = xp + r * ldx;
        float* __restrict__ tr = t + r * ldt + pc * P;
        for (int64_t cc = 0; cc < P; ++cc) tr[cc] = (xr[cc] - mean) / sd;
      }
    }
    tg = t;
  }

  float* acc = s.acc.data();
  if (c.rd == DType::kFloat32 && direct) {
    strip_sets_rows<true>(c, b, pr, tg, ldt, acc, s);
  } else {
    std::fill(acc, acc + side, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t* vis = c.visible + k * np + pr * side;
      bool any_hidden = false;
      for (int64_t pc = 0; pc < side; ++pc) any_hidden |= (vis[pc] == 0);
      if (!any_hidden) continue;
      prefetch_next(c, 1 + k, b, pr);
      int64_t ldr = 0;
      const float* rs =
          strip_avx2(c.recon, c.rd, (b * K + k) * S * S + pr * P * S, P, S, direct, s.recon_buf, &ldr);
      for (int64_t pc = 0; pc < side; ++pc) {
        if (vis[pc]) continue;
        const float sum = patch_sum<kSqDiff>(rs + pc * P, ldr, tg + pc * P, ldt, 0.0f, P, P);
        acc[pc] = acc[pc] + sum / p2;
      }
    }
  }
  for (int64_t pc = 0; pc < side; ++pc)
    err[pr * side + pc] = acc[pc] / static_cast<float>(c.n_hiding[pr * side + pc]);
}

MFP_AVX2 void hfratio_strip_avx2(const Ctx& c, int64_t b, int64_t pr, Scratch& s) {
  const int64_t S = c.S, P = c.P, K = c.K, side = c.side, np = c.np;
  const int64_t P2 = P - 2, P1 = P - 1, ld = S + kPad;
  const float p2 = static_cast<float>(P * P);
  const float nh = static_cast<float>(P2 * P2), nd = static_cast<float>(P1 * P1);
  const bool direct = P % 8 == 0;
  float* err = c.out.patch_err + b * np;
  ensure(s.acc, side);
  const size_t bufn = static_cast<size_t>(ld * (P + kPad));
  if (s.a.size() < bufn) s.a.assign(bufn, 0.0f);
  if (s.lap2.size() < bufn) s.lap2.assign(bufn, 0.0f);
  if (s.dia2.size() < bufn) s.dia2.assign(bufn, 0.0f);

  // Whole strip rows at once: column col of a / l^2 / g^2 belongs to the patch of column col; each
  // patch reads only its own columns [pc*P, pc*P + P-2) or [pc*P, pc*P + P-1), whose values equal
  // the per-patch definitions of patch_gate.h (same z, same operations).
  int64_t ldx = 0;
  prefetch_next(c, 0, b, pr);
  const float* z = strip_avx2(c.x, c.xd, b * S * S + pr * P * S, P, S, direct, s.x_buf, &ldx);
  float* __restrict__ a = s.a.data();
  float* __restrict__ lap2 = s.lap2.data();
  float* __restrict__ dia2 = s.dia2.data();
  for (int64_t r = 0; r < P; ++r) {
    const float* __restrict__ zr = z + r * ldx;
    float* __restrict__ ar = a + r * ld;
    for (int64_t j = 0; j < S - 2; ++j) {
      const float t = zr[j] - 2.0f * zr[j + 1];
      ar[j] = t + zr[j + 2];
    }
  }
  for (int64_t i = 0; i < P2; ++i) {
    const float* __restrict__ a0 = a + i * ld;
    const float* __restrict__ a1 = a0 + ld;
    const float* __restrict__ a2 = a1 + ld;
    float* __restrict__ o = lap2 + i * ld;
    for (int64_t j = 0; j < S - 2; ++j) {
      const float t = a0[j] - 2.0f * a1[j];
      const float l = (t + a2[j]) / 4.0f;
      o[j] = l * l;
    }
  }
  for (int64_t i = 0; i < P1; ++i) {
    const float* __restrict__ z0 = z + i * ldx;
    const float* __restrict__ z1 = z0 + ldx;
    float* __restrict__ o = dia2 + i * ld;
    for (int64_t j = 0; j < S - 1; ++j) {
      const float t = (z0[j] - z0[j + 1]) - z1[j];
      const float g = (t + z1[j + 1]) / 2.0f;
      o[j] = g * g;
    }
  }
  for (int64_t pc = 0; pc < side; ++pc) {
    const float hs = patch_sum<kValue>(lap2 + pc * P, ld, lap2, ld, 0.0f, P2, P2);
    const float ds = patch_sum<kValue>(dia2 + pc * P, ld, dia2, ld, 0.0f, P1, P1);
    const float h = hs / nh, d = ds / nd;
    err[pr * side + pc] = h / (d + 1e-6f);
  }

  // tissue level w: mean over the hiding sets of the patch mean of recon[b, k]
  float* acc = s.acc.data();
  if (c.rd == DType::kFloat32 && direct) {
    strip_sets_rows<false>(c, b, pr, nullptr, 0, acc, s);
  } else {
    std::fill(acc, acc + side, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t* vis = c.visible + k * np + pr * side;
      bool any_hidden = false;
      for (int64_t pc = 0; pc < side; ++pc) any_hidden |= (vis[pc] == 0);
      if (!any_hidden) continue;
      prefetch_next(c, 1 + k, b, pr);
      int64_t ldr = 0;
      const float* rs =
          strip_avx2(c.recon, c.rd, (b * K + k) * S * S + pr * P * S, P, S, direct, s.recon_buf, &ldr);
      for (int64_t pc = 0; pc < side; ++pc) {
        if (vis[pc]) continue;
        const float sum = patch_sum<kValue>(rs + pc * P, ldr, rs, ldr, 0.0f, P, P);
        acc[pc] = acc[pc] + sum / p2;
      }
    }
  }
  for (int64_t pc = 0; pc < side; ++pc)
    c.w[b * np + pr * side + pc] = acc[pc] / static_cast<float>(c.n_hiding[pr * side + pc]);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#else
bool cpu_has_avx2() { return false; }
#endif

void run_strip(const Ctx& c, bool simd, int64_t b, int64_t pr, Scratch& s) {
  const bool hf = is_spectral(c.p->stat);
#if MFP_HAVE_AVX2_PATH
  if (simd && c.p->stat != GateStat::kNyqRatio) {  // nyqratio: the scalar path only
    if (hf)
      hfratio_strip_avx2(c, b, pr, s);
    else
      err_strip_avx2(c, b, pr, s);
    return;
  }
#else
  (void)simd;
#endif
  if (hf)
    hfratio_strip_scalar(c, b, pr, s);
  else
    err_strip_scalar(c, b, pr, s);
}

// ---------------------------------------------------------------------------------------------
// per-scan score and decision (all strips of scan b done)
// ---------------------------------------------------------------------------------------------

// Score of stats mean / topk from the Np patch values e (patch_gate.h): the topk largest, ties broken by
// the lower patch index, the others counting as 0, through the lane32 sum; or the mean of all.
float reduce_mean_topk(const float* err, int64_t np, const GateParams& p, Scratch& s) {
  if (p.stat != GateStat::kTopK) return lane32_sum(err, np) / static_cast<float>(np);
  s.order.assign(err, err + np);
  const int64_t k = p.topk;
  std::nth_element(s.order.begin(), s.order.begin() + (k - 1), s.order.end(),
                   [](float a, float v) { return a > v; });
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
  return lane32_sum(s.sel.data(), np) / static_cast<float>(k);
}

void finish_scan(const Ctx& c, int64_t b, Scratch& s) {
  const GateParams& p = *c.p;
  const int64_t np = c.np;
  const float* err = c.out.patch_err + b * np;
  float score;
  if (is_spectral(p.stat)) {
    // The m patches of largest w (ties: lower index), their e in s.sel; then the median.
    const float* w = c.w + b * np;
    const int64_t m = hfratio_m(p, static_cast<int32_t>(np));
    s.order.assign(w, w + np);
    std::nth_element(s.order.begin(), s.order.begin() + (m - 1), s.order.end(),
                     [](float u, float v) { return u > v; });
    const float kth = s.order[m - 1];
    int64_t greater = 0;
    for (int64_t i = 0; i < np; ++i) greater += w[i] > kth;
    int64_t ties_left = m - greater;
    s.sel.clear();
    for (int64_t i = 0; i < np; ++i) {
      bool take = w[i] > kth;
      if (!take && w[i] == kth && ties_left > 0) {
        take = true;
        --ties_left;
      }
      if (take) s.sel.push_back(err[i]);
    }
    const int64_t mid = (m - 1) / 2;
    std::nth_element(s.sel.begin(), s.sel.begin() + mid, s.sel.end());
    const float lo = s.sel[mid];
    score = lo;
    if (m % 2 == 0) {
      const float hi = *std::min_element(s.sel.begin() + mid + 1, s.sel.end());
      score = (lo + hi) / 2.0f;
    }
  } else {
    score = reduce_mean_topk(err, np, p, s);
  }
  c.out.score[b] = score;
  gate_decide(score, p, c.out.flag + b, c.out.t_star + b);
}

// ---------------------------------------------------------------------------------------------
// persistent worker pool: one job at a time, items claimed from an atomic counter
// ---------------------------------------------------------------------------------------------

class Pool {
 public:
  // Runs fn(i) for i in [0, n) on the calling thread and up to `helpers` pool threads; returns when
  // all n are done and no pool thread touches the job any more. A caller that finds the pool busy
  // (another thread's job) runs everything itself.
  //
  // Helpers pay only where other cores are free: on a machine whose cores are busy (other
  // processes, or the spin-waiting worker threads of a library that ran just before) a woken
  // helper starts late, shares memory bandwidth, or is preempted while it holds an item, and the
  // call ends up slower than the caller alone. So the pool times both ways for the configuration
  // `key` (the caller's work shape; a new key starts afresh): one call alone, one with helpers,
  // then the faster of the two running estimates, trying the other way every kExplore-th call so
  // that the choice follows the machine's load. Results never depend on the choice.
  template <class Fn>
  void run(int64_t n, int helpers, uint64_t key, Fn&& fn) {
    std::unique_lock<std::mutex> busy(job_mu_, std::try_to_lock);
    if (!busy.owns_lock() || helpers <= 0 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    if (key != key_) {
      key_ = key;
      t_alone_ = t_helped_ = -1.0;
      calls_ = 0;
    }
    bool help = t_alone_ >= 0.0 && (t_helped_ < 0.0 || t_helped_ < t_alone_);
    if (t_alone_ >= 0.0 && t_helped_ >= 0.0 && ++calls_ % kExplore == 0) help = !help;
    using Clock = std::chrono::steady_clock;
    const Clock::time_point start = Clock::now();
    if (!help) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      record(t_alone_, std::chrono::duration<double>(Clock::now() - start).count());
      return;
    }
    auto body = [&fn](int64_t i) { fn(i); };
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int>(threads_.size()) < helpers) {
        threads_.emplace_back([this] { loop(); });
        threads_.back().detach();
      }
      job_ = body;
      n_ = n;
      next_.store(0, std::memory_order_relaxed);
      done_.store(0, std::memory_order_relaxed);
      seats_ = helpers;
      open_ = true;
      ++gen_;
    }
    cv_.notify_all();
    work();
    // Wait for the items that helpers took: block (do not spin or yield) so that on a busy machine
    // a helper that holds an item gets this core. Helpers leave the job under mu_, so the wake-up
    // cannot be missed.
    std::unique_lock<std::mutex> lk(mu_);
    open_ = false;  // helpers that wake from now on skip this job
    done_cv_.wait(lk, [&] { return inside_ == 0 && done_.load(std::memory_order_acquire) == n; });
    job_ = nullptr;
    lk.unlock();
    record(t_helped_, std::chrono::duration<double>(Clock::now() - start).count());
  }

 private:
  void work() {
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_) return;
      job_(i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // Running estimate of a call's seconds: the first sample, then a quarter of the way towards each
  // new one, capped at 4x the estimate (a call preempted for a whole time slice moves it little).
  static void record(double& est, double t) {
    est = est < 0.0 ? t : est + 0.25 * (std::min(t, 4.0 * est) - est);
  }
  static constexpr int kExplore = 64;

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_ != seen; });
        seen = gen_;
        if (!open_ || seats_ <= 0) continue;
        --seats_;
        ++inside_;
      }
      work();
      bool last;
      {
        std::lock_guard<std::mutex> lk(mu_);
        last = --inside_ == 0;
      }
      if (last) done_cv_.notify_one();
    }
  }

  std::mutex job_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  std::function<void(int64_t)> job_;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0}, done_{0};
  // Timing of the current configuration (guarded by job_mu_): its key, the running estimates of a
  // call alone and with helpers (seconds; < 0 = none yet), calls since both were known.
  uint64_t key_ = 0;
  double t_alone_ = -1.0, t_helped_ = -1.0;
  uint64_t calls_ = 0;
  int inside_ = 0;  // helpers working on the current job (guarded by mu_)
  int seats_ = 0;
  bool open_ = false;
  uint64_t gen_ = 0;
};

// The process's pool, created on first use and never destroyed (its threads are detached and
// blocked when idle). After a fork the child gets a fresh pool: the parent's threads do not exist
// there.
Pool& pool() {
  static std::mutex mu;
  static Pool* p = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lk(mu);
  const pid_t pid = getpid();
  if (p == nullptr || owner != pid) {
    p = new Pool();  // the old one (if any) belongs to the parent process: leaked on purpose
    owner = pid;
  }
  return *p;
}

}  // namespace

bool patch_gate_cpu_simd_available() { return cpu_has_avx2(); }

void gate_reduce_cpu(const void* scores, DType dtype, int64_t np, const GateParams& params,
                     const GateOutputs& out) {
  if (const char* msg = check_reduce_params(params, np)) throw std::invalid_argument(msg);
  Scratch& s = thread_scratch();
  for (int64_t b = 0; b < params.batch; ++b) {
    const float* e = rows_as_float(scores, dtype, b * np, np, s.x_buf);
    const float score = reduce_mean_topk(e, np, params, s);
    out.score[b] = score;
    gate_decide(score, params, out.flag + b, out.t_star + b);
  }
}

void patch_gate_cpu(const void* x, DType x_dtype, const void* recon, DType recon_dtype,
                    const uint8_t* visible, const GateParams& params, const GateOutputs& out,
                    int num_threads) {
  patch_gate_cpu(x, x_dtype, recon, recon_dtype, visible, params, out, num_threads, true);
}

void patch_gate_cpu(const void* x, DType x_dtype, const void* recon, DType recon_dtype,
                    const uint8_t* visible, const GateParams& params, const GateOutputs& out,
                    int num_threads, bool simd) {
  if (const char* msg = check_params(params)) throw std::invalid_argument(msg);
  const int64_t side = params.size / params.patch, np = side * side;
  thread_local std::vector<int32_t> n_hiding;
  thread_local std::vector<float> w_buf;
  n_hiding.assign(np, 0);
  for (int64_t k = 0; k < params.sets; ++k)
    for (int64_t i = 0; i < np; ++i) n_hiding[i] += visible[k * np + i] == 0;
  for (int64_t i = 0; i < np; ++i)
    if (n_hiding[i] == 0)
      throw std::invalid_argument("patch " + std::to_string(i) +
                                  " is visible in every mask set: each patch must be hidden by at "
                                  "least one set (visible[k, p] False for some k)");

  const int64_t B = params.batch;
  float* w = nullptr;
  if (is_spectral(params.stat)) {
    if (w_buf.size() < static_cast<size_t>(B * np)) w_buf.resize(B * np);
    w = w_buf.data();
  }
  const Ctx ctx{x, x_dtype, recon, recon_dtype, visible, n_hiding.data(), &params, out, w,
                params.size, params.patch, params.sets, side, np};
  simd = simd && cpu_has_avx2();

  const int64_t items = B * side;  // one strip of one scan each
  const int64_t work = B * (params.sets + 1) * int64_t(params.size) * params.size;  // pixel-sets
  if (num_threads <= 0) {
    // Automatic: helpers only for large work (~1 M pixel-sets per thread): on a loaded machine a
    // helper may wait for a core.
    static const int64_t hw = std::max(1u, std::thread::hardware_concurrency());  // reads /sys: once
    num_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(hw, work >> 20)));
  }
  // A requested count is an upper bound: every thread gets at least ~64 K pixel-sets (a few
  // microseconds of vector work), less than that costs more in wake-up latency than it saves.
  num_threads = static_cast<int>(
      std::min<int64_t>({num_threads, items, 64, std::max<int64_t>(1, work >> 16)}));

  Scratch& s = thread_scratch();
  if (num_threads <= 1) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t pr = 0; pr < side; ++pr) run_strip(ctx, simd, b, pr, s);
  } else {
    auto strip = [&](int64_t i) { run_strip(ctx, simd, i / side, i % side, thread_scratch()); };
    // The work shape, as the pool's timing key: calls of one shape cost alike.
    uint64_t key = 1469598103934665603ull;
    for (const int64_t v : {B, int64_t(params.size), int64_t(params.patch), int64_t(params.sets),
                            int64_t(params.stat), int64_t(params.norm_pix), int64_t(x_dtype),
                            int64_t(recon_dtype), int64_t(simd), int64_t(num_threads)})
      key = (key ^ static_cast<uint64_t>(v)) * 1099511628211ull;
    pool().run(items, num_threads - 1, key, strip);
  }
  for (int64_t b = 0; b < B; ++b) finish_scan(ctx, b, s);
}

}  // namespace medfedpure
