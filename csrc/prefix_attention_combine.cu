// Second pass of split-KV: merge num_splits normalized partial outputs by log-sum-exp.
// out = sum_s exp(lse_s - lse) * out_s, lse = log sum_s exp(lse_s); rows where every split saw no key stay
// out = 0, lse = -inf.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cmath>

#include "prefix_attention_params.h"

namespace fastprompt {
namespace {

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

constexpr int kCombineThreads = 128;
constexpr int kMaxSplits = 128;

// One CTA per output row (b, h, i). Cheap next to the main kernel: it reads num_splits * D floats per row.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) prefix_attention_combine_kernel(const PrefixAttnParams p, int D) {
  __shared__ float s_weight[kMaxSplits];
  __shared__ float s_lse;
  const int64_t rows_total = (int64_t)p.B * p.Hq * p.Lq;
  const int64_t row = blockIdx.x;
  if (threadIdx.x < 32) {
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < p.num_splits; s += 32) mx = fmaxf(mx, p.lse_accum[s * rows_total + row]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f;
    for (int s = threadIdx.x; s < p.num_splits; s += 32) sum += expf(p.lse_accum[s * rows_total + row] - m_use);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float lse = sum > 0.f ? m_use + logf(sum) : -INFINITY;
    for (int s = threadIdx.x; s < p.num_splits; s += 32) {
      const float ls = p.lse_accum[s * rows_total + row];
      s_weight[s] = lse == -INFINITY ? 0.f : expf(ls - lse);
    }
    if (threadIdx.x == 0) {
      s_lse = lse;
      p.lse[row] = lse;
    }
  }
  __syncthreads();
  T* out = reinterpret_cast<T*>(p.out) + row * D;
  for (int d = threadIdx.x; d < D; d += kCombineThreads) {
    float acc = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = s_weight[s];
      if (w != 0.f) acc += w * p.out_accum[(s * rows_total + row) * D + d];
    }
    out[d] = from_float<T>(acc);
  }
}

}  // namespace

template <typename T>
void run_prefix_attention_combine(const PrefixAttnParams& params, int head_dim, cudaStream_t stream) {
  const int64_t rows = (int64_t)params.B * params.Hq * params.Lq;
  if (rows == 0) return;
  prefix_attention_combine_kernel<T><<<(unsigned)rows, kCombineThreads, 0, stream>>>(params, head_dim);
}

template void run_prefix_attention_combine<__half>(const PrefixAttnParams&, int, cudaStream_t);
template void run_prefix_attention_combine<__nv_bfloat16>(const PrefixAttnParams&, int, cudaStream_t);

}  // namespace fastprompt
