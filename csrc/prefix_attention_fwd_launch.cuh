// Launcher for prefix_attention_fwd_kernel: the two tile shapes, dynamic shared memory, grid.
// Kept apart from the kernel header so the kernel body also compiles in a host-side emulation harness.
#pragma once
#include "prefix_attention_fwd_kernel.cuh"

namespace fastprompt {
namespace attn {

template <int D, PrefixAttnConfig C> struct ConfigShape;
template <int D> struct ConfigShape<D, PrefixAttnConfig::kDecode> {
  static constexpr int kNWarps = 1;
  static constexpr int kBlockN = D >= 128 ? 32 : 64;
};
template <int D> struct ConfigShape<D, PrefixAttnConfig::kPrefill> {
  static constexpr int kNWarps = 4;
  static constexpr int kBlockN = D >= 256 ? 32 : 64;  // D = 256: two 64-key stages would exceed A100's 163 KB smem
};

}  // namespace attn

template <typename T, int D, PrefixAttnConfig C>
void run_prefix_attention_fwd(const PrefixAttnParams& params, cudaStream_t stream) {
  using Shape = attn::ConfigShape<D, C>;
  using Tr = attn::FwdTraits<T, D, Shape::kNWarps, Shape::kBlockN>;
  static_assert(Tr::kBlockM == 16 * Shape::kNWarps, "");
  auto kernel = attn::prefix_attention_fwd_kernel<T, D, Shape::kNWarps, Shape::kBlockN>;
  const int smem = Tr::kSmemBytes;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const int R = params.G * params.Lq;
  dim3 grid((R + Tr::kBlockM - 1) / Tr::kBlockM, params.B * params.Hkv, params.num_splits);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(params);
}

}  // namespace fastprompt

// One explicit instantiation per translation unit (see prefix_attention_fwd_*.cu).
#define FASTPROMPT_INSTANTIATE_FWD(T, D, C) \
  template void fastprompt::run_prefix_attention_fwd<T, D, C>(const fastprompt::PrefixAttnParams&, cudaStream_t);
