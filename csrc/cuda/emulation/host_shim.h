// Host emulation of the CUDA execution model for csrc/cuda (see emulate.py):
// blocks run one after another, each as blockDim.x std::threads with a
// std::barrier for __syncthreads and per-warp barriers for shuffles. Shared
// memory is one buffer, filled with 0xff (NaN) before every block so that
// reads of unwritten shared memory show up.
#pragma once
// warp.cuh takes its host versions of the primitives (warp_emulation.h).
#define TAYLORSHIFT_EMULATION 1
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
using std::max;
using std::min;
namespace emu {
struct Idx {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Idx threadIdx_, blockIdx_;
inline Idx blockDim_, gridDim_;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline double shfl_buf[1024];
alignas(128) inline unsigned char smem[1 << 20];
// What the host code reads off the device; set_props changes it to reach
// other tile sizes and token splits.
struct Props {
  int major = 9;
  int multiProcessorCount = 2;
  size_t sharedMemPerBlockOptin = 232448;
};
inline Props props;
inline void sync() { block_barrier->arrive_and_wait(); }
template <typename V>
V shfl_xor(V v, int off) {
  const unsigned t = threadIdx_.x;
  shfl_buf[t] = static_cast<double>(v);
  warp_barriers[t / 32]->arrive_and_wait();
  V r = static_cast<V>(shfl_buf[t ^ off]);
  warp_barriers[t / 32]->arrive_and_wait();
  return r;
}
template <typename V>
V shfl(V v, int src) {
  const unsigned t = threadIdx_.x;
  shfl_buf[t] = static_cast<double>(v);
  warp_barriers[t / 32]->arrive_and_wait();
  V r = static_cast<V>(shfl_buf[t / 32 * 32 + src % 32]);
  warp_barriers[t / 32]->arrive_and_wait();
  return r;
}
inline unsigned ballot(bool predicate) {
  const unsigned t = threadIdx_.x;
  shfl_buf[t] = predicate ? 1.0 : 0.0;
  warp_barriers[t / 32]->arrive_and_wait();
  unsigned bits = 0;
  for (unsigned i = 0; i < 32; ++i)
    if (shfl_buf[t / 32 * 32 + i] != 0.0) bits |= 1u << i;
  warp_barriers[t / 32]->arrive_and_wait();
  return bits;
}
inline Idx to_idx(dim3 d) { return {d.x, d.y, d.z}; }
inline Idx to_idx(long long x) { return {unsigned(x), 1, 1}; }
template <typename K>
auto launch(K kernel, auto grid, auto block, size_t = 0, int = 0) {
  return [=](auto... args) {
    gridDim_ = to_idx(dim3(grid));
    blockDim_ = to_idx(dim3(block));
    if (gridDim_.z == 0) gridDim_.z = 1;
    for (unsigned bz = 0; bz < gridDim_.z; ++bz)
      for (unsigned by = 0; by < gridDim_.y; ++by)
        for (unsigned bx = 0; bx < gridDim_.x; ++bx) {
          std::memset(smem, 0xff, sizeof(smem));
          const unsigned n = blockDim_.x;
          std::barrier<> bar(n);
          block_barrier = &bar;
          warp_barriers.clear();
          for (unsigned w = 0; w < n / 32; ++w)
            warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
          std::vector<std::thread> threads;
          for (unsigned t = 0; t < n; ++t)
            threads.emplace_back([&, t, bx, by, bz] {
              threadIdx_ = {t, 0, 0};
              blockIdx_ = {bx, by, bz};
              kernel(args...);
              bar.arrive_and_drop();
            });
          for (auto& th : threads) th.join();
        }
  };
}
}  // namespace emu
#define threadIdx emu::threadIdx_
#define blockIdx emu::blockIdx_
#define blockDim emu::blockDim_
#define gridDim emu::gridDim_
#define __syncthreads() emu::sync()
#define __shfl_xor_sync(mask, v, off) emu::shfl_xor(v, off)
#define __shfl_sync(mask, v, src) emu::shfl(v, src)
#define __ballot_sync(mask, predicate) emu::ballot(predicate)
#define __trap() std::abort()
// Blocks per multiprocessor the host code sizes its grids for.
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor(count, kernel, threads, \
                                                      smem)                   \
  (*(count) = 2, 0)
#define __launch_bounds__(x)
#define cudaFuncSetAttribute(...) 0
#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0
#include <cstdio>
#include <cstring>

#include "warp_emulation.h"
#include "wmma_emulation.h"
