// Host emulation of the gather/mix kernels (csrc/gather_prompts_kernels.cuh, csrc/mix_prompts_kernels.cuh): the
// real kernel bodies compiled by g++, each CUDA thread a std::thread, __syncthreads / __shfl_xor_sync / atomicAdd
// re-implemented; results compared with a float64 reference (forward, pool gradients with repeated entries and
// empty slots, weight gradients). Built and run by tests/test_cuda_kernel_emulation.py:
//   g++ -std=c++20 -O2 -I csrc/emulation/fake_cuda -I csrc csrc/emulation/gather_mix_emulation.cpp -lpthread
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>

struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
struct Dim3 { int x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx, gridDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __shared__ static  // one CTA runs at a time, so a function-static array is that CTA's shared memory

inline float __half2float(__half h) { _Float16 f; memcpy(&f, &h.x, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; memcpy(&h.x, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = (uint32_t)b.x << 16; float f; memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u; memcpy(&u, &x, 4); __nv_bfloat16 b; b.x = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16); return b;
}

namespace emu {
struct Warp { std::unique_ptr<std::barrier<>> bar; float fx[32]; };
thread_local Warp* warp = nullptr;
thread_local std::barrier<>* cta = nullptr;
// Run grid x block with one std::thread per CUDA thread, one CTA at a time.
inline void launch(Dim3 grid, int threads, const std::function<void()>& body) {
  for (int z = 0; z < std::max(grid.z, 1); ++z)
    for (int y = 0; y < grid.y; ++y)
      for (int x = 0; x < grid.x; ++x) {
        std::barrier<> bar(threads);
        std::vector<Warp> warps((threads + 31) / 32);
        for (auto& w : warps) w.bar = std::make_unique<std::barrier<>>(32);
        std::vector<std::thread> th;
        for (int t = 0; t < threads; ++t)
          th.emplace_back([&, t] {
            threadIdx = {t, 0, 0}; blockIdx = {x, y, z}; gridDim = grid;
            cta = &bar; warp = &warps[t / 32];
            body();
          });
        for (auto& h : th) h.join();
      }
}
}  // namespace emu
inline void __syncthreads() { emu::cta->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  int L = threadIdx.x % 32;
  emu::warp->fx[L] = v; emu::warp->bar->arrive_and_wait();
  float r = emu::warp->fx[L ^ m]; emu::warp->bar->arrive_and_wait();
  return r;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

#include "gather_prompts_kernels.cuh"
#include "mix_prompts_kernels.cuh"

using namespace fastprompt;

template <typename T> float tof(T x) { return gm::to_float(x); }
template <typename T> T fromf(float x) { return gm::from_float<T>(x); }

double rel(const std::vector<double>& a, const std::vector<double>& b) {
  double n = 0, d = 0;
  for (size_t i = 0; i < a.size(); ++i) { n += (a[i] - b[i]) * (a[i] - b[i]); d += b[i] * b[i]; }
  return std::sqrt(n / std::max(d, 1e-30));
}

template <typename T>
bool check(double tol, unsigned seed) {
  std::mt19937 rng(seed); std::normal_distribution<float> nd;
  const int64_t N = 7, F = 300, R = 12, B = 5, K = 3;
  const int threads = gather_kernels::kThreads;
  std::vector<T> pool(N * F); for (auto& x : pool) x = fromf<T>(nd(rng));
  std::vector<int64_t> idx(R); for (auto& e : idx) e = (int64_t)(rng() % (N + 1)) - 1;
  idx[0] = idx[1] = 2;
  Dim3 grid{(int)((F + threads - 1) / threads), (int)R, 1};
  // gather forward
  std::vector<T> out(R * F);
  emu::launch(grid, threads, [&] { gather_kernels::gather_forward_kernel<T>(pool.data(), idx.data(), out.data(), R, N, F); });
  std::vector<double> got, ref;
  for (int64_t r = 0; r < R; ++r) for (int64_t f = 0; f < F; ++f) {
    got.push_back(tof(out[r * F + f])); ref.push_back(idx[r] >= 0 ? tof(pool[idx[r] * F + f]) : 0.0); }
  double e_gf = rel(got, ref);
  // gather backward
  std::vector<T> g(R * F); for (auto& x : g) x = fromf<T>(nd(rng));
  std::vector<float> gp(N * F, 0.f);
  emu::launch(grid, threads, [&] { gather_kernels::gather_backward_kernel<T>(g.data(), idx.data(), gp.data(), R, N, F); });
  std::vector<double> rgp(N * F, 0.0);
  for (int64_t r = 0; r < R; ++r) if (idx[r] >= 0) for (int64_t f = 0; f < F; ++f) rgp[idx[r] * F + f] += tof(g[r * F + f]);
  double e_gb = rel(std::vector<double>(gp.begin(), gp.end()), rgp);
  // mix, dense and sparse
  double e_m = 0;
  for (int sparse = 0; sparse < 2; ++sparse) {
    const int64_t KK = sparse ? K : N;
    std::vector<float> w(B * KK); for (auto& x : w) x = nd(rng);
    std::vector<int64_t> mi(B * KK); for (auto& e : mi) e = (int64_t)(rng() % (N + 1)) - 1;
    for (int64_t b = 0; b < B; ++b) mi[b * KK] = 4;
    const int64_t* ip = sparse ? mi.data() : nullptr;
    auto ent = [&](int64_t b, int64_t j) -> int64_t { return sparse ? mi[b * KK + j] : j; };
    std::vector<T> mo(B * F);
    emu::launch({grid.x, (int)B, 1}, threads, [&] { mix_kernels::mix_forward_kernel<T>(pool.data(), w.data(), ip, mo.data(), B, KK, N, F); });
    std::vector<double> a, r2;
    for (int64_t b = 0; b < B; ++b) for (int64_t f = 0; f < F; ++f) {
      double s = 0; for (int64_t j = 0; j < KK; ++j) if (ent(b, j) >= 0) s += w[b * KK + j] * (double)tof(pool[ent(b, j) * F + f]);
      a.push_back(tof(mo[b * F + f])); r2.push_back(s); }
    e_m = std::max(e_m, rel(a, r2));
    std::vector<T> mg(B * F); for (auto& x : mg) x = fromf<T>(nd(rng));
    std::vector<float> mgp(N * F, 0.f), mgw(B * KK, NAN);
    if (sparse) emu::launch({grid.x, (int)B, 1}, threads, [&] { mix_kernels::mix_backward_pool_sparse_kernel<T>(mg.data(), w.data(), ip, mgp.data(), B, KK, N, F); });
    else emu::launch({grid.x, (int)N, 1}, threads, [&] { mix_kernels::mix_backward_pool_dense_kernel<T>(mg.data(), w.data(), mgp.data(), B, N, F); });
    emu::launch({(int)(B * KK), 1, 1}, threads, [&] { mix_kernels::mix_backward_weights_kernel<T>(mg.data(), pool.data(), ip, mgw.data(), B, KK, N, F); });
    std::vector<double> rp(N * F, 0.0), rw(B * KK, 0.0);
    for (int64_t b = 0; b < B; ++b) for (int64_t j = 0; j < KK; ++j) { int64_t e = ent(b, j); if (e < 0) continue;
      for (int64_t f = 0; f < F; ++f) { rp[e * F + f] += w[b * KK + j] * (double)tof(mg[b * F + f]); rw[b * KK + j] += (double)tof(mg[b * F + f]) * tof(pool[e * F + f]); } }
    e_m = std::max({e_m, rel(std::vector<double>(mgp.begin(), mgp.end()), rp), rel(std::vector<double>(mgw.begin(), mgw.end()), rw)});
  }
  bool ok = e_gf == 0 && e_gb < tol && e_m < tol;
  printf("gather fwd %.1e bwd %.1e | mix fwd/bwd max %.1e %s\n", e_gf, e_gb, e_m, ok ? "ok" : "FAIL");
  return ok;
}

int main() {
  bool ok = check<float>(1e-5, 1) & check<__half>(5e-3, 2) & check<__nv_bfloat16>(3e-2, 3);
  printf(ok ? "EMULATION OK\n" : "EMULATION FAILED\n");
  return ok ? 0 : 1;
}
