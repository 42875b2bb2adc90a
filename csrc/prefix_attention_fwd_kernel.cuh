// Prefix attention forward: one pass over [prefix tiles; sequence tiles] with one online softmax, on tensor
// cores (mma.sync m16n8k16, fp32 accumulation). The prefix is read where it lives ([E, Hkv, P, D] + prefix_index),
// never concatenated or batch-expanded.
//
// Rows of a CTA are the flattened (query head in the GQA group, query position) pairs of ONE kv head, so every
// K/V tile is loaded once per group, not once per query head. This is what makes the same kernel a good
// decode kernel: with Lq = 1 and G = 4..8 a 16-row warp tile holds the whole group.
//
// Split-KV ("flash-decoding"): the list of key tiles a row block needs (all prefix tiles, then the sequence tiles
// that causal/window leave visible) is cut into num_splits contiguous pieces, one CTA each (prefix tiles simply
// become the first splits). Each writes a normalized partial output and its lse; prefix_attention_combine.cu
// merges them by log-sum-exp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cmath>

#include "mma_primitives.cuh"
#include "prefix_attention_params.h"

namespace fastprompt {
namespace attn {

template <typename T, int D, int kNWarps, int kBlockN>
struct FwdTraits {
  static_assert(D % 16 == 0 && kBlockN % 16 == 0, "tile shapes must be multiples of 16");
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kBlockM = 16 * kNWarps;
  static constexpr int kRowStride = D + 8;  // +16 bytes: fragment loads and ldmatrix rows hit distinct banks
  static constexpr int kVecPerRow = D / 8;  // 16-byte vectors per row
  static constexpr int kSmemQ = kBlockM * kRowStride * (int)sizeof(T);
  static constexpr int kSmemKVStage = kBlockN * kRowStride * (int)sizeof(T);
  static constexpr int kSmemBytes = kSmemQ + 4 * kSmemKVStage + 2 * kBlockN;  // Q, 2 stages of K and V, key flags
};

template <typename T, int D, int kNWarps, int kBlockN>
__global__ void __launch_bounds__(32 * kNWarps) prefix_attention_fwd_kernel(const PrefixAttnParams p) {
  using Tr = FwdTraits<T, D, kNWarps, kBlockN>;
  using M = MmaType<T>;
  constexpr int kBlockM = Tr::kBlockM;
  constexpr int kRS = Tr::kRowStride;
  constexpr int kVec = Tr::kVecPerRow;
  constexpr int kThreads = Tr::kThreads;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBlockM * kRS;       // [2][kBlockN][kRS]
  T* sV = sK + 2 * kBlockN * kRS;   // [2][kBlockN][kRS]
  uint8_t* sKeyOk = reinterpret_cast<uint8_t*>(sV + 2 * kBlockN * kRS);  // [2][kBlockN]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int b = blockIdx.y / p.Hkv;
  const int hkv = blockIdx.y % p.Hkv;
  const int split = blockIdx.z;
  const int R = p.G * p.Lq;
  const int row0 = blockIdx.x * kBlockM;
  const int off = p.Lk - p.Lq;  // bottom-right alignment: query i sits at sequence position i + off

  // ---- which key tiles this row block needs ----
  const int row_last = min(row0 + kBlockM, R) - 1;
  int i_min = 0, i_max = p.Lq - 1;
  if (row0 / p.Lq == row_last / p.Lq) {  // the block lies within one query head: use its position range
    i_min = row0 % p.Lq;
    i_max = row_last % p.Lq;
  }
  const int NP = p.S * p.P;
  const int n_ptiles = (NP + kBlockN - 1) / kBlockN;
  int j_lo = 0, j_hi = p.Lk - 1;
  if (p.causal) j_hi = min(j_hi, i_max + off);
  if (p.window > 0) {
    j_lo = max(j_lo, i_min + off - p.window + 1);
    if (!p.causal) j_hi = min(j_hi, i_max + off + p.window - 1);
  }
  int st_lo = 0, n_stiles = 0;
  if (j_hi >= j_lo) {
    st_lo = j_lo / kBlockN;
    n_stiles = j_hi / kBlockN - st_lo + 1;
  }
  const int n_tiles = n_ptiles + n_stiles;
  const int per_split = (n_tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = min(n_tiles, split * per_split);
  const int t_end = min(n_tiles, t_begin + per_split);

  const T* __restrict__ qg = reinterpret_cast<const T*>(p.q);
  const T* __restrict__ kg = reinterpret_cast<const T*>(p.k);
  const T* __restrict__ vg = reinterpret_cast<const T*>(p.v);
  const T* __restrict__ pkg = reinterpret_cast<const T*>(p.pk);
  const T* __restrict__ pvg = reinterpret_cast<const T*>(p.pv);

  // ---- Q tile: rows are (g, i) pairs of this kv head; rows past R are zero ----
  for (int c = tid; c < kBlockM * kVec; c += kThreads) {
    const int r = c / kVec, v8 = c % kVec;
    const int row = row0 + r;
    const bool valid = row < R;
    const T* src = qg;
    if (valid) {
      const int g = row / p.Lq, i = row % p.Lq;
      src = qg + b * p.q_sb + (int64_t)(hkv * p.G + g) * p.q_sh + (int64_t)i * p.q_sl + v8 * 8;
    }
    cp_async16(sQ + r * kRS + v8 * 8, src, valid);
  }
  cp_async_commit();

  // Tile position t in [0, n_tiles): prefix tiles first, then visible sequence tiles.
  auto tile_base = [&](int t) { return t < n_ptiles ? t * kBlockN : (st_lo + t - n_ptiles) * kBlockN; };

  auto load_tile = [&](int t, int stage) {
    T* dK = sK + stage * kBlockN * kRS;
    T* dV = sV + stage * kBlockN * kRS;
    uint8_t* ok = sKeyOk + stage * kBlockN;
    const bool is_prefix = t < n_ptiles;
    const int base = tile_base(t);
    for (int c = tid; c < kBlockN * kVec; c += kThreads) {
      const int n = c / kVec, v8 = c % kVec;
      const int key = base + n;
      bool valid = false;
      const T* srcK = kg;
      const T* srcV = vg;
      if (is_prefix) {
        if (key < NP) {
          const int s = key / p.P, pp = key - s * p.P;
          const int64_t e = p.prefix_index[(int64_t)b * p.S + s];
          if (e >= 0) {
            valid = true;
            srcK = pkg + e * p.pk_se + (int64_t)hkv * p.pk_sh + (int64_t)pp * p.pk_sp + v8 * 8;
            srcV = pvg + e * p.pv_se + (int64_t)hkv * p.pv_sh + (int64_t)pp * p.pv_sp + v8 * 8;
          }
        }
      } else if (key < p.Lk) {
        valid = p.kpm == nullptr || p.kpm[(int64_t)b * p.Lk + key] != 0;
        if (valid) {
          srcK = kg + b * p.k_sb + (int64_t)hkv * p.k_sh + (int64_t)key * p.k_sl + v8 * 8;
          srcV = vg + b * p.v_sb + (int64_t)hkv * p.v_sh + (int64_t)key * p.v_sl + v8 * 8;
        }
      }
      // Invalid keys are zero-filled so masked scores never multiply garbage (0 * NaN).
      cp_async16(dK + n * kRS + v8 * 8, srcK, valid);
      cp_async16(dV + n * kRS + v8 * 8, srcV, valid);
      if (v8 == 0) ok[n] = valid ? 1 : 0;
    }
  };

  if (t_begin < t_end) load_tile(t_begin, 0);
  cp_async_commit();

  // Each thread owns two rows of its warp's 16 (mma C layout: lane/4 and lane/4 + 8).
  int apos[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = row0 + warp * 16 + lane / 4 + rr * 8;
    apos[rr] = (row < R ? row % p.Lq : 0) + off;
  }

  float o[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  cp_async_wait<1>();  // Q has landed (the first K/V tile may still be in flight)
  __syncthreads();
  // Q fragments stay in registers up to D = 128; at D = 256 the O accumulator alone takes 128 registers, so the
  // fragments are re-read from shared memory for each k-step instead.
  constexpr bool kQInRegs = D <= 128;
  const T* qw = sQ + (warp * 16 + lane / 4) * kRS + (lane % 4) * 2;
  auto load_q_frag = [&](int kk, uint32_t (&a)[4]) {
    a[0] = *reinterpret_cast<const uint32_t*>(qw + kk * 16);
    a[1] = *reinterpret_cast<const uint32_t*>(qw + 8 * kRS + kk * 16);
    a[2] = *reinterpret_cast<const uint32_t*>(qw + kk * 16 + 8);
    a[3] = *reinterpret_cast<const uint32_t*>(qw + 8 * kRS + kk * 16 + 8);
  };
  uint32_t qf[kQInRegs ? D / 16 : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_q_frag(kk, qf[kk]);
  }

  const float scale_log2 = p.scale * kLog2e;
  for (int t = t_begin; t < t_end; ++t) {
    const int stage = (t - t_begin) & 1;
    cp_async_wait<0>();
    __syncthreads();  // tile t visible to all; everyone is done with tile t-1, whose buffer is refilled next
    if (t + 1 < t_end) load_tile(t + 1, stage ^ 1);
    cp_async_commit();

    const T* cK = sK + stage * kBlockN * kRS;
    const T* cV = sV + stage * kBlockN * kRS;
    const uint8_t* cOk = sKeyOk + stage * kBlockN;

    // S = Q K^T for 16 rows x kBlockN keys.
    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a_q[4];
      if constexpr (kQInRegs) {
        a_q[0] = qf[kk][0]; a_q[1] = qf[kk][1]; a_q[2] = qf[kk][2]; a_q[3] = qf[kk][3];
      } else {
        load_q_frag(kk, a_q);
      }
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        const T* kp = cK + (nt * 8 + lane / 4) * kRS + kk * 16 + (lane % 4) * 2;
        M::mma(s[nt], a_q, *reinterpret_cast<const uint32_t*>(kp), *reinterpret_cast<const uint32_t*>(kp + 8));
      }
    }

    // Scale, soft-cap, mask; scores move to the log2 domain so exp2 can be used.
    const bool is_prefix = t < n_ptiles;
    const int base = tile_base(t);
    // Position masks (causal/window) only matter on tiles that cross a row's visibility boundary; tiles wholly
    // inside every row's visible range (most of a long causal prefill) skip the per-element test.
    bool pos_mask = false;
    if (!is_prefix) {
      const int last = base + kBlockN - 1;
      if (p.causal && last > i_min + off) pos_mask = true;
      if (p.window > 0) {
        if (i_max + off - base >= p.window) pos_mask = true;
        if (!p.causal && last - (i_min + off) >= p.window) pos_mask = true;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + (lane % 4) * 2 + (e & 1);
        float x;
        if (p.softcap > 0.f) {
          x = p.softcap * tanhf(s[nt][e] * p.scale / p.softcap) * kLog2e;
        } else {
          x = s[nt][e] * scale_log2;
        }
        bool ok = cOk[col] != 0;
        if (ok && pos_mask) {
          const int j = base + col;
          const int a = apos[e >> 1];
          if (p.causal && j > a) ok = false;
          if (p.window > 0) {
            if (a - j >= p.window) ok = false;
            if (!p.causal && j - a >= p.window) ok = false;
          }
        }
        s[nt][e] = ok ? x : -INFINITY;
      }
    }

    // Online softmax; the four lanes of a quad share a row.
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rr], s[nt][2 * rr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[rr], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: keep exp2 finite
      const float alpha = exp2f(m_run[rr] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        s[nt][2 * rr] = exp2f(s[nt][2 * rr] - m_use);
        s[nt][2 * rr + 1] = exp2f(s[nt][2 * rr + 1] - m_use);
        sum += s[nt][2 * rr] + s[nt][2 * rr + 1];
      }
      l_run[rr] = l_run[rr] * alpha + sum;  // per-lane partial; reduced over the quad at the end
      m_run[rr] = m_new;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o[nt][2 * rr] *= alpha;
        o[nt][2 * rr + 1] *= alpha;
      }
    }

    // O += P V: the S accumulator layout of two n8 tiles is exactly the A layout of one k16 step.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = M::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = M::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = M::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = M::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const int mat = lane / 8;
      const T* vrow = cV + (kk * 16 + (mat & 1) * 8 + (lane % 8)) * kRS + (mat >> 1) * 8;
#pragma unroll
      for (int n2 = 0; n2 < D / 16; ++n2) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, vrow + n2 * 16);
        M::mma(o[2 * n2], a, bf[0], bf[1]);
        M::mma(o[2 * n2 + 1], a, bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue ----
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float l = l_run[rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = row0 + warp * 16 + lane / 4 + rr * 8;
    if (row >= R) continue;
    const int g = row / p.Lq, i = row % p.Lq;
    const int64_t orow = ((int64_t)b * p.Hq + hkv * p.G + g) * p.Lq + i;  // row of [B, Hq, Lq]
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? (m_run[rr] + log2f(l)) * kLn2 : -INFINITY;
    if (p.num_splits == 1) {
      T* dst = reinterpret_cast<T*>(p.out) + orow * D + (lane % 4) * 2;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(dst + nt * 8) = M::pack(o[nt][2 * rr] * inv, o[nt][2 * rr + 1] * inv);
      }
      if (lane % 4 == 0) p.lse[orow] = lse;
    } else {
      const int64_t rows_total = (int64_t)p.B * p.Hq * p.Lq;
      const int64_t arow = (int64_t)split * rows_total + orow;
      float* dst = p.out_accum + arow * D + (lane % 4) * 2;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(o[nt][2 * rr] * inv, o[nt][2 * rr + 1] * inv);
      }
      if (lane % 4 == 0) p.lse_accum[arow] = lse;
    }
  }
}

}  // namespace attn

}  // namespace fastprompt
