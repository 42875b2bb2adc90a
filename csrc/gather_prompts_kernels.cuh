// Hard prompt selection: rows of a pool copied by index (-1 = empty slot -> zeros), and its backward as an
// fp32 scatter-add into the pool gradient (several rows may pick the same entry).
// Kernels only (launchers in gather_prompts.cu) so the host emulation can compile them too.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "gather_mix_utils.cuh"

namespace fastprompt {
namespace gather_kernels {

constexpr int kThreads = 256;

// One thread per element along F; blockIdx.y walks rows in a grid-stride loop so huge R is fine.
template <typename T>
__global__ void __launch_bounds__(kThreads) gather_forward_kernel(const T* __restrict__ pool,
                                                                  const int64_t* __restrict__ index,
                                                                  T* __restrict__ out, int64_t R, int64_t N, int64_t F) {
  const int64_t f = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (f >= F) return;
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    const int64_t e = index[r];
    out[r * F + f] = (e >= 0 && e < N) ? pool[e * F + f] : gm::from_float<T>(0.f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_backward_kernel(const T* __restrict__ grad_out,
                                                                   const int64_t* __restrict__ index,
                                                                   float* __restrict__ grad_pool, int64_t R,
                                                                   int64_t N, int64_t F) {
  const int64_t f = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (f >= F) return;
  for (int64_t r = blockIdx.y; r < R; r += gridDim.y) {
    const int64_t e = index[r];
    if (e >= 0 && e < N) atomicAdd(grad_pool + e * F + f, gm::to_float(grad_out[r * F + f]));
  }
}

}  // namespace gather_kernels
}  // namespace fastprompt
