// Soft prompt mixtures: out[b] = sum_j w[b, j] * pool[entry(b, j)], entry(b, j) = j (dense) or index[b, j]
// (sparse, -1 = empty term). Backward: grad_pool by a per-entry reduction over the batch (dense, no atomics) or
// an fp32 scatter-add (sparse), grad_weights by one dot product over F per (b, j).
// Kernels only (launchers in mix_prompts.cu) so the host emulation can compile them too.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "gather_mix_utils.cuh"

namespace fastprompt {
namespace mix_kernels {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t entry_of(const int64_t* index, int64_t b, int64_t j, int64_t K, int64_t N) {
  if (index == nullptr) return j;
  const int64_t e = index[b * K + j];
  return (e >= 0 && e < N) ? e : -1;
}

// Thread per (b, f); the K terms are walked in order with fp32 accumulation. Weights are warp-uniform loads.
template <typename T>
__global__ void __launch_bounds__(kThreads) mix_forward_kernel(const T* __restrict__ pool,
                                                               const float* __restrict__ w,
                                                               const int64_t* __restrict__ index, T* __restrict__ out,
                                                               int64_t B, int64_t K, int64_t N, int64_t F) {
  const int64_t f = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (f >= F) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float acc = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = entry_of(index, b, j, K, N);
      if (e >= 0) acc += w[b * K + j] * gm::to_float(pool[e * F + f]);
    }
    out[b * F + f] = gm::from_float<T>(acc);
  }
}

// Dense: grad_pool[n, f] = sum_b w[b, n] g[b, f]; thread per (n, f), no atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads) mix_backward_pool_dense_kernel(const T* __restrict__ g,
                                                                           const float* __restrict__ w,
                                                                           float* __restrict__ grad_pool, int64_t B,
                                                                           int64_t N, int64_t F) {
  const int64_t f = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (f >= F) return;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    float acc = 0.f;
    for (int64_t b = 0; b < B; ++b) acc += w[b * N + n] * gm::to_float(g[b * F + f]);
    grad_pool[n * F + f] = acc;
  }
}

// Sparse: grad_pool[index[b, j], f] += w[b, j] g[b, f]; thread per (b, f), fp32 atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads) mix_backward_pool_sparse_kernel(const T* __restrict__ g,
                                                                            const float* __restrict__ w,
                                                                            const int64_t* __restrict__ index,
                                                                            float* __restrict__ grad_pool, int64_t B,
                                                                            int64_t K, int64_t N, int64_t F) {
  const int64_t f = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (f >= F) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const float gv = gm::to_float(g[b * F + f]);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = entry_of(index, b, j, K, N);
      if (e >= 0) atomicAdd(grad_pool + e * F + f, w[b * K + j] * gv);
    }
  }
}

// grad_w[b, j] = sum_f g[b, f] * pool[entry(b, j), f]; one CTA per (b, j), block reduction.
template <typename T>
__global__ void __launch_bounds__(kThreads) mix_backward_weights_kernel(const T* __restrict__ g,
                                                                        const T* __restrict__ pool,
                                                                        const int64_t* __restrict__ index,
                                                                        float* __restrict__ grad_w, int64_t B,
                                                                        int64_t K, int64_t N, int64_t F) {
  __shared__ float s_part[kThreads / 32];
  const int64_t bj = blockIdx.x;
  const int64_t b = bj / K, j = bj % K;
  const int64_t e = entry_of(index, b, j, K, N);
  float acc = 0.f;
  if (e >= 0) {
    for (int64_t f = threadIdx.x; f < F; f += kThreads) acc += gm::to_float(g[b * F + f]) * gm::to_float(pool[e * F + f]);
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (threadIdx.x % 32 == 0) s_part[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int i = 0; i < kThreads / 32; ++i) total += s_part[i];
    grad_w[bj] = total;
  }
}

}  // namespace mix_kernels
}  // namespace fastprompt
