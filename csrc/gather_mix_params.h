// Plain-pointer interface of the prompt gather / mix kernels (no torch headers; bindings.cpp fills it).
// Pools are viewed as [N, F] row-major (trailing dims flattened), contiguous.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastprompt {

// out[r, :] = pool[index[r], :], or zeros where index[r] < 0 (or >= N). R = B or B * S rows.
template <typename T>
void run_gather_forward(const T* pool, const int64_t* index, T* out, int64_t R, int64_t N, int64_t F,
                        cudaStream_t stream);
// grad_pool[index[r], :] += grad_out[r, :] (fp32 atomics; grad_pool zero-initialized by the caller).
template <typename T>
void run_gather_backward(const T* grad_out, const int64_t* index, float* grad_pool, int64_t R, int64_t N, int64_t F,
                         cudaStream_t stream);

// Dense mixture (index == nullptr, K == N): out[b, :] = sum_n w[b, n] pool[n, :].
// Sparse mixture: out[b, :] = sum_j w[b, j] pool[index[b, j], :], index -1 = empty term.
// Weights are fp32 [B, K] contiguous; accumulation is fp32.
template <typename T>
void run_mix_forward(const T* pool, const float* weights, const int64_t* index, T* out, int64_t B, int64_t K,
                     int64_t N, int64_t F, cudaStream_t stream);
// grad_pool [N, F] fp32 (zero-initialized by the caller) and grad_weights [B, K] fp32 (written).
template <typename T>
void run_mix_backward(const T* grad_out, const T* pool, const float* weights, const int64_t* index,
                      float* grad_pool, float* grad_weights, int64_t B, int64_t K, int64_t N, int64_t F,
                      cudaStream_t stream);

}  // namespace fastprompt
