// CPU emulation of the small part of the CUDA runtime that kernels/patch_gate_cuda.cu uses.
// Test-only (tests/test_ops_cuda_emulated.py): it runs the real kernel source on std::threads,
// one block at a time in a shuffled order, each CUDA thread an OS thread, __syncthreads a barrier.
// It checks indexing, synchronisation, the last-block ticket and the arithmetic order; it says
// nothing about the GPU memory model, coalescing or speed.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)

typedef void* cudaStream_t;
typedef int cudaError_t;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };

namespace emu {
inline thread_local dim3 threadIdx_;
inline dim3 blockIdx_, blockDim_, gridDim_;
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::unique_ptr<std::barrier<>> warp_barrier[32];
inline float shfl_buf[32][32];
inline uint64_t seed = 1;
// Ticket bookkeeping for atomicAdd on uint32 counters: per address, how many adds and the largest
// value returned in this launch. After the launch every counter must have been ticketed exactly
// gridDim.x times with tickets 0..gridDim.x-1 (one last block per scan), else protocol_error.
inline std::mutex ticket_mutex;
inline std::map<const void*, std::pair<unsigned, unsigned>> tickets;
inline int protocol_error = 0;

// Runs body() for every block (shuffled order, one block at a time) on blockDim.x threads that
// are created once per launch and step from block to block together.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  gridDim_ = grid;
  blockDim_ = block;
  const unsigned nthreads = block.x;
  std::vector<std::pair<unsigned, unsigned>> order;
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y);
  std::mt19937_64 rng(seed++);
  std::shuffle(order.begin(), order.end(), rng);
  block_barrier = std::make_unique<std::barrier<>>(nthreads);
  for (unsigned w = 0; w < (nthreads + 31) / 32; ++w)
    warp_barrier[w] = std::make_unique<std::barrier<>>(std::min(32u, nthreads - 32 * w));
  std::barrier<> between(nthreads);
  std::vector<std::thread> ts;
  ts.reserve(nthreads);
  for (unsigned t = 0; t < nthreads; ++t)
    ts.emplace_back([t, &body, &order, &between] {
      threadIdx_ = dim3(t, 0, 0);
      for (auto [bx, by] : order) {
        if (t == 0) blockIdx_ = dim3(bx, by, 0);
        between.arrive_and_wait();
        body();
        between.arrive_and_wait();
      }
    });
  for (auto& th : ts) th.join();
  for (const auto& [addr, t] : tickets)
    if (t.first != grid.x || t.second != grid.x - 1) protocol_error = 1;
  tickets.clear();
}
}  // namespace emu

#define threadIdx (emu::threadIdx_)
#define blockIdx (emu::blockIdx_)
#define blockDim (emu::blockDim_)
#define gridDim (emu::gridDim_)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  std::lock_guard<std::mutex> lock(emu::ticket_mutex);
  auto& t = emu::tickets[p];
  t.first += 1;
  t.second = std::max(t.second, old);
  return old;
}
template <typename T>
inline T __ldcg(const T* p) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return *static_cast<const volatile T*>(p);
}
inline float __shfl_down_sync(unsigned, float v, int delta) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  emu::shfl_buf[warp][lane] = v;
  emu::warp_barrier[warp]->arrive_and_wait();
  const float out = lane + delta < 32 ? emu::shfl_buf[warp][lane + delta] : v;
  emu::warp_barrier[warp]->arrive_and_wait();
  return out;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
using std::floor;
using std::fmax;
using std::fmin;

inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return 0; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
