// Plain-pointer description of one prefix-attention forward call. No torch headers here, so the kernel
// translation units compile fast and stay independent of the ATen ABI; bindings.cpp fills this struct.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastprompt {

struct PrefixAttnParams {
  // Inputs. Strides are in elements; the last dimension (D) is contiguous and rows are 16-byte aligned
  // (bindings.cpp calls .contiguous() otherwise), which the 16-byte cp.async loads rely on.
  const void* q;              // [B, Hq, Lq, D]
  const void* k;              // [B, Hkv, Lk, D]
  const void* v;              // [B, Hkv, Lk, D]
  const void* pk;             // [E, Hkv, P, D] or nullptr (no prefix)
  const void* pv;             // [E, Hkv, P, D] or nullptr
  const int64_t* prefix_index;  // [B, S] contiguous, -1 = empty slot; nullptr when S == 0
  const uint8_t* kpm;         // key_padding_mask [B, Lk] bool (1 = real token), contiguous; nullptr = none
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t pk_se, pk_sh, pk_sp;
  int64_t pv_se, pv_sh, pv_sp;

  // Outputs, contiguous. With num_splits > 1 the main kernel writes normalized partial results to the
  // fp32 accumulators ([num_splits, B*Hq*Lq, D] and [num_splits, B*Hq*Lq]) and a second kernel merges them.
  void* out;                  // [B, Hq, Lq, D] in the input dtype
  float* lse;                 // [B, Hq, Lq]
  float* out_accum;
  float* lse_accum;

  int B, Hq, Hkv, G, Lq, Lk, E, P, S;
  float scale;
  float softcap;              // 0 = off
  int window;                 // <= 0 = off
  bool causal;                // bottom-right aligned, sequence keys only
  int num_splits;             // >= 1
};

// Two tile shapes of the same kernel: "decode" (one warp, 16 query rows = G heads x Lq positions of one kv
// head, split-KV over many CTAs) and "prefill" (four warps, 64 query rows).
enum class PrefixAttnConfig { kDecode = 0, kPrefill = 1 };

template <typename T, int D, PrefixAttnConfig C>
void run_prefix_attention_fwd(const PrefixAttnParams& params, cudaStream_t stream);

template <typename T>
void run_prefix_attention_combine(const PrefixAttnParams& params, int head_dim, cudaStream_t stream);

// Shape facts the host needs before it allocates split accumulators (must match the kernel traits).
inline int prefix_attention_block_m(PrefixAttnConfig c) { return c == PrefixAttnConfig::kDecode ? 16 : 64; }
inline int prefix_attention_block_n(PrefixAttnConfig c, int head_dim) {
  return c == PrefixAttnConfig::kDecode ? (head_dim >= 128 ? 32 : 64) : (head_dim >= 256 ? 32 : 64);
}

// How many CTAs share one row block's key tiles. Decode launches few CTAs (B * Hkv), so the key axis is split
// until the GPU is covered a few times over; each split is then merged by log-sum-exp.
inline int prefix_attention_num_splits(PrefixAttnConfig c, int row_blocks_total, int max_tiles, int sm_count,
                                       int requested) {
  if (max_tiles <= 1) return 1;
  int cap = max_tiles < 128 ? max_tiles : 128;
  if (requested > 0) return requested < cap ? requested : cap;
  const int target = sm_count * (c == PrefixAttnConfig::kDecode ? 8 : 2);
  if (row_blocks_total * 2 >= target) return 1;
  int splits = (target + row_blocks_total - 1) / row_blocks_total;
  // Keep at least two tiles per split so the merge stays cheap relative to the work.
  int by_tiles = max_tiles / 2 > 1 ? max_tiles / 2 : 1;
  if (splits > by_tiles) splits = by_tiles;
  if (splits > cap) splits = cap;
  return splits < 1 ? 1 : splits;
}

}  // namespace fastprompt
