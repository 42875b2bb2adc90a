// Soft prompt mixtures: out[b] = sum_j w[b, j] * pool[entry(b, j)], entry(b, j) = j (dense) or index[b, j]
// (sparse, -1 = empty term). Backward: grad_pool by a per-entry reduction over the batch (dense, no atomics) or
// an fp32 scatter-add (sparse), grad_weights by one dot product over F per (b, j).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gather_mix_params.h"
#include "mix_prompts_kernels.cuh"

namespace fastprompt {
namespace {

using namespace mix_kernels;

dim3 grid_for(int64_t rows, int64_t F) {
  const int64_t gx = (F + kThreads - 1) / kThreads;
  const int64_t gy = rows < 65535 ? rows : 65535;
  return dim3((unsigned)gx, (unsigned)(gy > 0 ? gy : 1));
}

}  // namespace

template <typename T>
void run_mix_forward(const T* pool, const float* weights, const int64_t* index, T* out, int64_t B, int64_t K,
                     int64_t N, int64_t F, cudaStream_t stream) {
  if (B == 0 || F == 0) return;
  mix_forward_kernel<T><<<grid_for(B, F), kThreads, 0, stream>>>(pool, weights, index, out, B, K, N, F);
}

template <typename T>
void run_mix_backward(const T* grad_out, const T* pool, const float* weights, const int64_t* index,
                      float* grad_pool, float* grad_weights, int64_t B, int64_t K, int64_t N, int64_t F,
                      cudaStream_t stream) {
  if (B == 0) return;
  if (F > 0 && N > 0) {
    if (index == nullptr) {
      mix_backward_pool_dense_kernel<T><<<grid_for(N, F), kThreads, 0, stream>>>(grad_out, weights, grad_pool, B, N, F);
    } else {
      mix_backward_pool_sparse_kernel<T><<<grid_for(B, F), kThreads, 0, stream>>>(grad_out, weights, index, grad_pool,
                                                                                 B, K, N, F);
    }
  }
  if (K > 0) {
    mix_backward_weights_kernel<T><<<(unsigned)(B * K), kThreads, 0, stream>>>(grad_out, pool, index, grad_weights, B,
                                                                              K, N, F);
  }
}

#define INSTANTIATE(T)                                                                                        \
  template void run_mix_forward<T>(const T*, const float*, const int64_t*, T*, int64_t, int64_t, int64_t,        \
                                   int64_t, cudaStream_t);                                                    \
  template void run_mix_backward<T>(const T*, const T*, const float*, const int64_t*, float*, float*, int64_t, \
                                    int64_t, int64_t, int64_t, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace fastprompt
