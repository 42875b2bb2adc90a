// The one translation unit that sees torch: argument checks (TORCH_CHECK with readable messages), layout
// fix-ups, output allocation, dtype/head-dim dispatch, and the pybind11 module fastprompt._C.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "gather_mix_params.h"
#include "prefix_attention_params.h"

#ifndef FASTPROMPT_CUDA_ARCHS
#define FASTPROMPT_CUDA_ARCHS "unknown"
#endif
#ifndef FASTPROMPT_NVCC_VERSION
#define FASTPROMPT_NVCC_VERSION "unknown"
#endif

namespace fp = fastprompt;

namespace {

#define CHECK_CUDA(x, name) TORCH_CHECK((x).is_cuda(), "fastprompt._C: ", name, " must be a CUDA tensor, got ", (x).device())
#define CHECK_SAME_DEVICE(x, ref, name) \
  TORCH_CHECK((x).device() == (ref).device(), "fastprompt._C: ", name, " is on ", (x).device(), " but q is on ", (ref).device())

// The kernels read 16-byte vectors along D: last dim contiguous, other strides multiples of 8 elements,
// 16-byte aligned base. Views that break this are copied (rare: transformers' views usually qualify).
at::Tensor vec_ready(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) ok = t.size(d) == 1 || t.stride(d) % 8 == 0;
  return ok ? t : t.contiguous();
}

template <typename T>
void dispatch_fwd_hdim(int D, fp::PrefixAttnConfig cfg, const fp::PrefixAttnParams& p, cudaStream_t stream) {
  using C = fp::PrefixAttnConfig;
  if (D == 64) {
    if (cfg == C::kDecode) fp::run_prefix_attention_fwd<T, 64, C::kDecode>(p, stream);
    else fp::run_prefix_attention_fwd<T, 64, C::kPrefill>(p, stream);
  } else if (D == 128) {
    if (cfg == C::kDecode) fp::run_prefix_attention_fwd<T, 128, C::kDecode>(p, stream);
    else fp::run_prefix_attention_fwd<T, 128, C::kPrefill>(p, stream);
  } else if (D == 256) {
    if (cfg == C::kDecode) fp::run_prefix_attention_fwd<T, 256, C::kDecode>(p, stream);
    else fp::run_prefix_attention_fwd<T, 256, C::kPrefill>(p, stream);
  } else {
    TORCH_CHECK(false, "fastprompt._C: head dim ", D, " is not compiled (supported: 64, 128, 256)");
  }
}

// Rows per kv head = G * Lq. Up to one warp tile (16 rows) the one-warp decode shape is used; above it the
// four-warp prefill shape. Both split the key axis when the grid would otherwise underfill the GPU.
fp::PrefixAttnConfig choose_config(int64_t rows_per_kv_head) {
  return rows_per_kv_head <= 16 ? fp::PrefixAttnConfig::kDecode : fp::PrefixAttnConfig::kPrefill;
}

std::vector<at::Tensor> prefix_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                             const std::optional<at::Tensor>& prefix_k_in,
                                             const std::optional<at::Tensor>& prefix_v_in,
                                             const std::optional<at::Tensor>& prefix_index_in,
                                             const std::optional<at::Tensor>& key_padding_mask_in, bool causal,
                                             double scale, double softcap, int64_t window, int64_t num_splits,
                                             int64_t force_config) {
  CHECK_CUDA(q_in, "q");
  CHECK_CUDA(k_in, "k");
  CHECK_CUDA(v_in, "v");
  CHECK_SAME_DEVICE(k_in, q_in, "k");
  CHECK_SAME_DEVICE(v_in, q_in, "v");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "fastprompt._C.prefix_attention_fwd: q must be float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype,
              "fastprompt._C.prefix_attention_fwd: q, k, v must share a dtype, got ", dtype, ", ",
              k_in.scalar_type(), ", ", v_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "fastprompt._C.prefix_attention_fwd: q, k, v must be 4-D [B, H, L, D]");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), Lk = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && v_in.size(0) == B && k_in.size(3) == D && v_in.size(3) == D &&
                  v_in.size(1) == Hkv && v_in.size(2) == Lk,
              "fastprompt._C.prefix_attention_fwd: k, v must be [B, Hkv, Lk, D] matching q [B, Hq, Lq, D]; got q ",
              q_in.sizes(), ", k ", k_in.sizes(), ", v ", v_in.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fastprompt._C.prefix_attention_fwd: Hq (", Hq,
              ") must be a multiple of Hkv (", Hkv, ")");
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "fastprompt._C.prefix_attention_fwd: head dim ", D,
              " is not compiled (supported: 64, 128, 256)");
  TORCH_CHECK(Lk < (int64_t(1) << 31) && Lq < (int64_t(1) << 31), "fastprompt._C: sequence too long");

  const at::cuda::OptionalCUDAGuard guard(q_in.device());
  at::Tensor q = vec_ready(q_in), k = vec_ready(k_in), v = vec_ready(v_in);

  fp::PrefixAttnParams p{};
  at::Tensor pk, pv, pidx, kpm;
  int64_t E = 0, P = 0, S = 0;
  const bool has_prefix = prefix_k_in.has_value() && prefix_k_in->defined();
  if (has_prefix) {
    TORCH_CHECK(prefix_v_in.has_value() && prefix_v_in->defined() && prefix_index_in.has_value() &&
                    prefix_index_in->defined(),
                "fastprompt._C.prefix_attention_fwd: prefix_k needs prefix_v and prefix_index");
    pk = vec_ready(*prefix_k_in);
    pv = vec_ready(*prefix_v_in);
    CHECK_CUDA(pk, "prefix_k");
    CHECK_CUDA(pv, "prefix_v");
    CHECK_SAME_DEVICE(pk, q_in, "prefix_k");
    CHECK_SAME_DEVICE(pv, q_in, "prefix_v");
    TORCH_CHECK(pk.scalar_type() == dtype && pv.scalar_type() == dtype,
                "fastprompt._C.prefix_attention_fwd: prefix_k/prefix_v must have q's dtype ", dtype, ", got ",
                pk.scalar_type(), ", ", pv.scalar_type());
    TORCH_CHECK(pk.dim() == 4 && pk.size(1) == Hkv && pk.size(3) == D && pv.sizes() == pk.sizes(),
                "fastprompt._C.prefix_attention_fwd: prefix_k/prefix_v must be [E, Hkv, P, D] with Hkv=", Hkv,
                ", D=", D, "; got ", pk.sizes(), " and ", pv.sizes());
    E = pk.size(0);
    P = pk.size(2);
    pidx = prefix_index_in->contiguous();
    CHECK_CUDA(pidx, "prefix_index");
    CHECK_SAME_DEVICE(pidx, q_in, "prefix_index");
    TORCH_CHECK(pidx.scalar_type() == at::kLong && pidx.dim() == 2 && pidx.size(0) == B,
                "fastprompt._C.prefix_attention_fwd: prefix_index must be int64 [B, S], got ", pidx.scalar_type(),
                " ", pidx.sizes());
    S = pidx.size(1);
    TORCH_CHECK(S * P < (int64_t(1) << 31), "fastprompt._C: prefix too long");
  }
  if (key_padding_mask_in.has_value() && key_padding_mask_in->defined()) {
    kpm = key_padding_mask_in->contiguous();
    CHECK_CUDA(kpm, "key_padding_mask");
    CHECK_SAME_DEVICE(kpm, q_in, "key_padding_mask");
    TORCH_CHECK(kpm.scalar_type() == at::kBool && kpm.dim() == 2 && kpm.size(0) == B && kpm.size(1) == Lk,
                "fastprompt._C.prefix_attention_fwd: key_padding_mask must be bool [B, Lk] = [", B, ", ", Lk,
                "], got ", kpm.scalar_type(), " ", kpm.sizes());
  }

  auto out = at::empty({B, Hq, Lq, D}, q.options());
  auto lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  if (B * Hq * Lq == 0) return {out, lse};

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sl = q.stride(2);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_sl = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_sl = v.stride(2);
  if (has_prefix) {
    p.pk = pk.data_ptr();
    p.pv = pv.data_ptr();
    p.pk_se = pk.stride(0); p.pk_sh = pk.stride(1); p.pk_sp = pk.stride(2);
    p.pv_se = pv.stride(0); p.pv_sh = pv.stride(1); p.pv_sp = pv.stride(2);
    p.prefix_index = pidx.data_ptr<int64_t>();
  }
  p.kpm = kpm.defined() ? reinterpret_cast<const uint8_t*>(kpm.data_ptr<bool>()) : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = (int)B; p.Hq = (int)Hq; p.Hkv = (int)Hkv; p.G = (int)(Hq / Hkv); p.Lq = (int)Lq; p.Lk = (int)Lk;
  p.E = (int)E; p.P = (int)P; p.S = (int)S;
  p.scale = (float)scale;
  p.softcap = softcap > 0 ? (float)softcap : 0.f;
  p.window = window > 0 ? (int)window : 0;
  p.causal = causal;

  const int64_t R = (Hq / Hkv) * Lq;
  fp::PrefixAttnConfig cfg = force_config == 0   ? fp::PrefixAttnConfig::kDecode
                             : force_config == 1 ? fp::PrefixAttnConfig::kPrefill
                                                 : choose_config(R);
  const int bm = fp::prefix_attention_block_m(cfg), bn = fp::prefix_attention_block_n(cfg, (int)D);
  const int64_t row_blocks = (R + bm - 1) / bm * B * Hkv;
  TORCH_CHECK((R + bm - 1) / bm < (int64_t(1) << 31) && B * Hkv < 65536,
              "fastprompt._C.prefix_attention_fwd: grid too large (B * Hkv must be < 65536)");
  const int64_t max_tiles = (S * P + bn - 1) / bn + (Lk + bn - 1) / bn;
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  p.num_splits = fp::prefix_attention_num_splits(cfg, (int)std::min<int64_t>(row_blocks, 1 << 30),
                                                 (int)std::min<int64_t>(max_tiles, 1 << 30), sm_count, (int)num_splits);
  at::Tensor out_accum, lse_accum;
  if (p.num_splits > 1) {
    out_accum = at::empty({p.num_splits, B * Hq * Lq, D}, q.options().dtype(at::kFloat));
    lse_accum = at::empty({p.num_splits, B * Hq * Lq}, q.options().dtype(at::kFloat));
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (dtype == at::kHalf) {
    dispatch_fwd_hdim<__half>((int)D, cfg, p, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.num_splits > 1) fp::run_prefix_attention_combine<__half>(p, (int)D, stream);
  } else {
    dispatch_fwd_hdim<__nv_bfloat16>((int)D, cfg, p, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.num_splits > 1) fp::run_prefix_attention_combine<__nv_bfloat16>(p, (int)D, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

// Which shape and split count the forward would use (for tests and benchmarks).
std::vector<int64_t> prefix_attention_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
                                           int64_t S, int64_t P, int64_t num_splits, int64_t force_config,
                                           int64_t sm_count) {
  const int64_t R = (Hq / Hkv) * Lq;
  fp::PrefixAttnConfig cfg = force_config == 0   ? fp::PrefixAttnConfig::kDecode
                             : force_config == 1 ? fp::PrefixAttnConfig::kPrefill
                                                 : choose_config(R);
  const int bm = fp::prefix_attention_block_m(cfg), bn = fp::prefix_attention_block_n(cfg, (int)D);
  const int64_t row_blocks = (R + bm - 1) / bm * B * Hkv;
  const int64_t max_tiles = (S * P + bn - 1) / bn + (Lk + bn - 1) / bn;
  const int splits = fp::prefix_attention_num_splits(cfg, (int)row_blocks, (int)max_tiles, (int)sm_count, (int)num_splits);
  return {static_cast<int64_t>(cfg), splits, bm, bn};
}

// ---------------------------------------------------------------- gather / mix

#define DISPATCH_POOL_TYPE(dtype, NAME, ...)                                                         \
  [&] {                                                                                              \
    switch (dtype) {                                                                                 \
      case at::kFloat: { using scalar = float; return __VA_ARGS__(); }                              \
      case at::kHalf: { using scalar = __half; return __VA_ARGS__(); }                              \
      case at::kBFloat16: { using scalar = __nv_bfloat16; return __VA_ARGS__(); }                   \
      default: TORCH_CHECK(false, "fastprompt._C.", NAME, ": unsupported dtype ", dtype,               \
                           " (float32, float16, bfloat16)");                                         \
    }                                                                                                \
  }()

void check_index(const at::Tensor& index, const at::Tensor& ref, const char* name) {
  CHECK_CUDA(index, name);
  CHECK_SAME_DEVICE(index, ref, name);
  TORCH_CHECK(index.scalar_type() == at::kLong, "fastprompt._C: ", name, " must be int64, got ", index.scalar_type());
}

// pool [N, F], index any shape (R entries) -> out [R, F]
at::Tensor gather_fwd(const at::Tensor& pool_in, const at::Tensor& index_in) {
  CHECK_CUDA(pool_in, "pool");
  check_index(index_in, pool_in, "index");
  TORCH_CHECK(pool_in.dim() == 2, "fastprompt._C.gather_fwd: pool must be 2-D [N, F] (flatten trailing dims)");
  const at::cuda::OptionalCUDAGuard guard(pool_in.device());
  auto pool = pool_in.contiguous();
  auto index = index_in.contiguous();
  const int64_t N = pool.size(0), F = pool.size(1), R = index.numel();
  auto out = at::empty({R, F}, pool.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DISPATCH_POOL_TYPE(pool.scalar_type(), "gather_fwd", [&] {
    fp::run_gather_forward<scalar>(reinterpret_cast<const scalar*>(pool.data_ptr()), index.data_ptr<int64_t>(),
                                   reinterpret_cast<scalar*>(out.data_ptr()), R, N, F, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// grad_out [R, F], index (R entries) -> grad_pool [N, F] float32
at::Tensor gather_bwd(const at::Tensor& grad_in, const at::Tensor& index_in, int64_t num_entries) {
  CHECK_CUDA(grad_in, "grad_out");
  check_index(index_in, grad_in, "index");
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == index_in.numel(),
              "fastprompt._C.gather_bwd: grad_out must be [R, F] with R = index.numel() = ", index_in.numel(),
              ", got ", grad_in.sizes());
  const at::cuda::OptionalCUDAGuard guard(grad_in.device());
  auto grad = grad_in.contiguous();
  auto index = index_in.contiguous();
  const int64_t R = grad.size(0), F = grad.size(1);
  auto grad_pool = at::zeros({num_entries, F}, grad.options().dtype(at::kFloat));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DISPATCH_POOL_TYPE(grad.scalar_type(), "gather_bwd", [&] {
    fp::run_gather_backward<scalar>(reinterpret_cast<const scalar*>(grad.data_ptr()), index.data_ptr<int64_t>(),
                                    grad_pool.data_ptr<float>(), R, num_entries, F, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_pool;
}

// pool [N, F], weights [B, K] (float32), index None (K == N) or [B, K] -> out [B, F]
at::Tensor mix_fwd(const at::Tensor& pool_in, const at::Tensor& weights_in, const std::optional<at::Tensor>& index_in) {
  CHECK_CUDA(pool_in, "pool");
  CHECK_CUDA(weights_in, "weights");
  CHECK_SAME_DEVICE(weights_in, pool_in, "weights");
  TORCH_CHECK(pool_in.dim() == 2 && weights_in.dim() == 2,
              "fastprompt._C.mix_fwd: pool must be [N, F] and weights [B, K]");
  TORCH_CHECK(weights_in.scalar_type() == at::kFloat, "fastprompt._C.mix_fwd: weights must be float32 (cast first)");
  const at::cuda::OptionalCUDAGuard guard(pool_in.device());
  auto pool = pool_in.contiguous();
  auto w = weights_in.contiguous();
  const int64_t N = pool.size(0), F = pool.size(1), B = w.size(0), K = w.size(1);
  at::Tensor index;
  if (index_in.has_value() && index_in->defined()) {
    check_index(*index_in, pool_in, "index");
    index = index_in->contiguous();
    TORCH_CHECK(index.dim() == 2 && index.size(0) == B && index.size(1) == K,
                "fastprompt._C.mix_fwd: index must be [B, K] like weights ", w.sizes(), ", got ", index.sizes());
  } else {
    TORCH_CHECK(K == N, "fastprompt._C.mix_fwd: dense weights must be [B, N] with N = ", N, ", got ", w.sizes());
  }
  auto out = at::empty({B, F}, pool.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DISPATCH_POOL_TYPE(pool.scalar_type(), "mix_fwd", [&] {
    fp::run_mix_forward<scalar>(reinterpret_cast<const scalar*>(pool.data_ptr()), w.data_ptr<float>(),
                                index.defined() ? index.data_ptr<int64_t>() : nullptr,
                                reinterpret_cast<scalar*>(out.data_ptr()), B, K, N, F, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// -> (grad_pool [N, F] float32, grad_weights [B, K] float32)
std::vector<at::Tensor> mix_bwd(const at::Tensor& grad_in, const at::Tensor& pool_in, const at::Tensor& weights_in,
                                const std::optional<at::Tensor>& index_in) {
  CHECK_CUDA(grad_in, "grad_out");
  CHECK_CUDA(pool_in, "pool");
  CHECK_CUDA(weights_in, "weights");
  CHECK_SAME_DEVICE(pool_in, grad_in, "pool");
  CHECK_SAME_DEVICE(weights_in, grad_in, "weights");
  TORCH_CHECK(weights_in.scalar_type() == at::kFloat, "fastprompt._C.mix_bwd: weights must be float32 (cast first)");
  TORCH_CHECK(grad_in.scalar_type() == pool_in.scalar_type(), "fastprompt._C.mix_bwd: grad_out dtype ",
              grad_in.scalar_type(), " differs from pool dtype ", pool_in.scalar_type());
  const at::cuda::OptionalCUDAGuard guard(grad_in.device());
  auto grad = grad_in.contiguous();
  auto pool = pool_in.contiguous();
  auto w = weights_in.contiguous();
  TORCH_CHECK(pool.dim() == 2 && w.dim() == 2 && grad.dim() == 2 && grad.size(0) == w.size(0) &&
                  grad.size(1) == pool.size(1),
              "fastprompt._C.mix_bwd: expected grad_out [B, F], pool [N, F], weights [B, K]; got ", grad.sizes(),
              ", ", pool.sizes(), ", ", w.sizes());
  const int64_t N = pool.size(0), F = pool.size(1), B = w.size(0), K = w.size(1);
  at::Tensor index;
  if (index_in.has_value() && index_in->defined()) {
    check_index(*index_in, grad_in, "index");
    index = index_in->contiguous();
    TORCH_CHECK(index.dim() == 2 && index.size(0) == B && index.size(1) == K,
                "fastprompt._C.mix_bwd: index must be [B, K] like weights");
  } else {
    TORCH_CHECK(K == N, "fastprompt._C.mix_bwd: dense weights must be [B, N]");
  }
  // Dense grad_pool is written in full; the sparse scatter-add needs zeros.
  auto grad_pool = index.defined() ? at::zeros({N, F}, grad.options().dtype(at::kFloat))
                                   : at::empty({N, F}, grad.options().dtype(at::kFloat));
  if (!index.defined() && B == 0) grad_pool.zero_();
  auto grad_w = at::empty({B, K}, grad.options().dtype(at::kFloat));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  DISPATCH_POOL_TYPE(pool.scalar_type(), "mix_bwd", [&] {
    fp::run_mix_backward<scalar>(reinterpret_cast<const scalar*>(grad.data_ptr()),
                                 reinterpret_cast<const scalar*>(pool.data_ptr()), w.data_ptr<float>(),
                                 index.defined() ? index.data_ptr<int64_t>() : nullptr, grad_pool.data_ptr<float>(),
                                 grad_w.data_ptr<float>(), B, K, N, F, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_pool, grad_w};
}

py::dict build_info() {
  py::dict info;
  std::vector<int> archs;
  std::stringstream ss(FASTPROMPT_CUDA_ARCHS);
  std::string item;
  while (std::getline(ss, item, ';')) {
    if (!item.empty()) {
      try { archs.push_back(std::stoi(item)); } catch (...) {}
    }
  }
  info["archs"] = archs;
  info["archs_string"] = std::string(FASTPROMPT_CUDA_ARCHS);
  info["nvcc_version"] = std::string(FASTPROMPT_NVCC_VERSION);
  info["cuda_runtime_version"] = CUDART_VERSION;
  info["head_dims"] = std::vector<int>{64, 128, 256};
  info["attention_dtypes"] = std::vector<std::string>{"float16", "bfloat16"};
  info["gather_mix_dtypes"] = std::vector<std::string>{"float32", "float16", "bfloat16"};
  info["kernels"] = std::vector<std::string>{"prefix_attention_fwd[decode]", "prefix_attention_fwd[prefill]",
                                             "prefix_attention_combine", "gather_fwd", "gather_bwd", "mix_fwd",
                                             "mix_bwd"};
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastprompt CUDA kernels: prefix attention forward (decode split-KV + tensor-core prefill), "
            "prompt gather/mix forward and backward";
  m.def("prefix_attention_fwd", &prefix_attention_fwd, "prefix attention forward -> [out, lse]", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"), py::arg("prefix_index"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"), py::arg("softcap"), py::arg("window"),
        py::arg("num_splits") = 0, py::arg("force_config") = -1);
  m.def("prefix_attention_plan", &prefix_attention_plan,
        "[config (0 decode, 1 prefill), num_splits, block_m, block_n] the forward would use", py::arg("B"),
        py::arg("Hq"), py::arg("Hkv"), py::arg("Lq"), py::arg("Lk"), py::arg("D"), py::arg("S"), py::arg("P"),
        py::arg("num_splits") = 0, py::arg("force_config") = -1, py::arg("sm_count") = 132);
  m.def("gather_fwd", &gather_fwd, "pool [N, F], index (R entries) -> [R, F]");
  m.def("gather_bwd", &gather_bwd, "grad [R, F], index, N -> grad_pool [N, F] float32");
  m.def("mix_fwd", &mix_fwd, "pool [N, F], weights [B, K] float32, index [B, K] or None -> [B, F]");
  m.def("mix_bwd", &mix_bwd, "-> [grad_pool [N, F] float32, grad_weights [B, K] float32]");
  m.def("build_info", &build_info, "compile-time facts: archs, nvcc version, covered head dims and dtypes");
}
