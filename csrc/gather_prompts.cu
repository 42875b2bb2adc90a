// Hard prompt selection: rows of a pool copied by index (-1 = empty slot -> zeros), and its backward as an
// fp32 scatter-add into the pool gradient (several rows may pick the same entry).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gather_mix_params.h"
#include "gather_prompts_kernels.cuh"

namespace fastprompt {
namespace {

using namespace gather_kernels;

dim3 grid_for(int64_t R, int64_t F) {
  const int64_t gx = (F + kThreads - 1) / kThreads;
  const int64_t gy = R < 65535 ? R : 65535;
  return dim3((unsigned)gx, (unsigned)(gy > 0 ? gy : 1));
}

}  // namespace

template <typename T>
void run_gather_forward(const T* pool, const int64_t* index, T* out, int64_t R, int64_t N, int64_t F,
                        cudaStream_t stream) {
  if (R == 0 || F == 0) return;
  gather_forward_kernel<T><<<grid_for(R, F), kThreads, 0, stream>>>(pool, index, out, R, N, F);
}

template <typename T>
void run_gather_backward(const T* grad_out, const int64_t* index, float* grad_pool, int64_t R, int64_t N, int64_t F,
                         cudaStream_t stream) {
  if (R == 0 || F == 0) return;
  gather_backward_kernel<T><<<grid_for(R, F), kThreads, 0, stream>>>(grad_out, index, grad_pool, R, N, F);
}

#define INSTANTIATE(T)                                                                                   \
  template void run_gather_forward<T>(const T*, const int64_t*, T*, int64_t, int64_t, int64_t, cudaStream_t); \
  template void run_gather_backward<T>(const T*, const int64_t*, float*, int64_t, int64_t, int64_t, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(__half)
INSTANTIATE(__nv_bfloat16)
#undef INSTANTIATE

}  // namespace fastprompt
