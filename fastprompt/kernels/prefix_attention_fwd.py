"""Prefix-attention forward: one pass per query tile over the prefix tiles, then the sequence tiles.

The prefix is read where it lives: `[E, Hkv, P, D]` entries chosen per sample by `prefix_index[b, s]` (shared,
per-sample and pool layouts all arrive this way), so no `[prefix; seq]` concatenation, B-fold prefix copy or mask
tensor is ever built. One online softmax (running max m, sum l, fp32 accumulator) spans both key sets.

Grid: (row tiles, Hkv, B). A tile's rows are the (query, head) pairs of one GQA group, so each K/V tile is read
once per group rather than once per query head. Batch and heads sit on grid axes 2 and 1 (CUDA's 65535 limit
applies to each separately, not to B * H). Additive score biases (T5's relative position bias, HAS_BIAS /
HAS_PBIAS) are read tile by tile where they live (prefix_attention_bias.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .prefix_attention_common import (BIASED_FWD_CONFIGS, FWD_CONFIGS, LN2_C, LOG2E, block_d, dot_precision,
                                      fit_block_m, mma, pick_config, score_log2, sequence_key_range,
                                      load_sequence_tile)
from .prefix_attention_bias import bias_args, bias_tile
from .prefix_attention_dropout import dropout_args, dropout_keep, load_dropout_seed


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k, v, vis, bias, score_scale, cap_scale, rng, row_ids, query_ids, key_j,
                 APPLY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Fold one key tile into the online softmax state. `vis` [M, N] is only read when APPLY_MASK, `bias` [M, N]
    (log2 domain, prefix_attention_bias.py) only when HAS_BIAS. With dropout
    (rng = (seed_lo, seed_hi, offset, threshold); row_ids = b * Hq + h and query_ids [M]; key_j [N], the tile's
    key indices over [prefix; sequence]) the denominator l sums every probability, the accumulator only the kept
    ones (the epilogue scales by 1 / (1 - p))."""
    qk = mma(q, tl.trans(k), None, DOT_PRECISION)
    s, _ = score_log2(qk, score_scale, cap_scale, HAS_SOFTCAP)
    if HAS_BIAS:
        s = s + bias
    if APPLY_MASK:
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if APPLY_MASK or HAS_BIAS:
        # A row with nothing visible yet keeps m = -inf (a -inf bias hides keys too); subtracting 0 instead keeps
        # exp2 at 0 rather than NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        seed_lo, seed_hi, offset, threshold = rng
        keep = dropout_keep(seed_lo, seed_hi, offset, row_ids[:, None], query_ids[:, None], key_j[None, :],
                            threshold)
        p = tl.where(keep, p, 0.0)
    acc = acc * alpha[:, None]
    acc = mma(p.to(v.dtype), v, acc, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _prefix_attention_fwd_kernel(
    Q, K, V, PK, PV, PIDX, KPM, BIAS, PBIAS, Out, Lse, DROPOUT_SEED,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pke, stride_pkh, stride_pkn,
    stride_pve, stride_pvh, stride_pvn,
    stride_ib, stride_is,
    stride_mb, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_pbb, stride_pbh, stride_pbm, stride_pbn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    Lq, Lk, P, S, G, window,
    score_scale, cap_scale, dropout_threshold, dropout_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_PREFIX: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PBIAS: tl.constexpr,
):
    # Heaviest query tiles first: under causal masking the last tiles see the most keys (better tail balance).
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h_kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    start_m = pid_m * BLOCK_M

    # A tile's rows are (query, head) pairs of one GQA group, query-major ("packed GQA"): each K/V tile is loaded
    # once for the whole group, and decoding (Lq = 1) fills G rows of the tile instead of one.
    rows = start_m + tl.arange(0, BLOCK_M)
    num_rows = Lq * G
    row_ok = rows < num_rows
    offs_m = rows // G  # query index of each row
    row_h = h_kv * G + rows % G  # query head of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D

    q_ptrs = Q + b * stride_qb + row_h[:, None] * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Dropout's counter words for these rows: b * Hq + h and the query index (grid axis 1 runs over the Hkv heads).
    seed_lo, seed_hi, seed_offset = load_dropout_seed(DROPOUT_SEED, HAS_DROPOUT)
    rng = (seed_lo, seed_hi, seed_offset, dropout_threshold)
    row_ids = b * (tl.num_programs(1) * G) + row_h
    # Element offsets of these rows in attn_bias / prefix_bias (a broadcast batch has stride 0).
    bias_rows = b * stride_bb + row_h * stride_bh + offs_m * stride_bm
    pbias_rows = b * stride_pbb + row_h * stride_pbh + offs_m * stride_pbm

    if HAS_PREFIX:
        P_full = (P // BLOCK_N) * BLOCK_N
        for s in range(0, S):
            entry = tl.load(PIDX + b * stride_ib + s * stride_is)
            # An empty pool slot (-1) contributes no keys: both loops below get an empty range.
            p_full = tl.where(entry >= 0, P_full, 0)
            p_end = tl.where(entry >= 0, P, 0)
            entry = tl.maximum(entry, 0)
            pk_base = PK + entry * stride_pke + h_kv * stride_pkh
            pv_base = PV + entry * stride_pve + h_kv * stride_pvh
            for start_n in range(0, p_full, BLOCK_N):
                offs = start_n + offs_n
                k = tl.load(pk_base + offs[:, None] * stride_pkn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                v = tl.load(pv_base + offs[:, None] * stride_pvn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                pbias = bias_tile(PBIAS, pbias_rows[:, None] + (s * P + offs)[None, :] * stride_pbn,
                                  row_ok[:, None] & (offs < P)[None, :], HAS_PBIAS)
                acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k.to(q.dtype), v.to(q.dtype), None, pbias,
                                             score_scale, cap_scale, rng, row_ids, offs_m, s * P + offs, False,
                                             HAS_PBIAS, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT)
            for start_n in range(p_full, p_end, BLOCK_N):  # the one partial tail tile, if P % BLOCK_N
                offs = start_n + offs_n
                kv_mask = (offs[:, None] < P) & d_ok[None, :]
                k = tl.load(pk_base + offs[:, None] * stride_pkn + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(pv_base + offs[:, None] * stride_pvn + offs_d[None, :], mask=kv_mask, other=0.0)
                vis = (offs[None, :] < P) & (offs_m[:, None] >= 0)
                pbias = bias_tile(PBIAS, pbias_rows[:, None] + (s * P + offs)[None, :] * stride_pbn,
                                  row_ok[:, None] & (offs < P)[None, :], HAS_PBIAS)
                acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k.to(q.dtype), v.to(q.dtype), vis, pbias,
                                             score_scale, cap_scale, rng, row_ids, offs_m, s * P + offs, True,
                                             HAS_PBIAS, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT)

    m_first = start_m // G
    m_last = (tl.minimum(start_m + BLOCK_M, num_rows) - 1) // G
    lo, full_lo, full_hi, hi = sequence_key_range(m_first, m_last, Lq, Lk, window, BLOCK_N, CAUSAL, HAS_WINDOW)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    a = offs_m + (Lk - Lq)  # bottom-right aligned query position
    # Edge tiles (causal diagonal, window edges, the Lk tail) need the causal/window/bounds mask ...
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, l_i, m_i = _sequence_tile(acc, l_i, m_i, q, a, start_n, offs_n, offs_d, d_ok, k_base, v_base, KPM,
                                       b, stride_kn, stride_vn, stride_mb, stride_mn, Lk, window, score_scale,
                                       cap_scale, rng, row_ids, offs_m, S * P, BIAS, bias_rows, row_ok, stride_bn,
                                       True, HAS_KPM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT,
                                       HAS_BIAS)
    # ... interior tiles only the padding mask (if any).
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _sequence_tile(acc, l_i, m_i, q, a, start_n, offs_n, offs_d, d_ok, k_base, v_base, KPM,
                                       b, stride_kn, stride_vn, stride_mb, stride_mn, Lk, window, score_scale,
                                       cap_scale, rng, row_ids, offs_m, S * P, BIAS, bias_rows, row_ok, stride_bn,
                                       False, HAS_KPM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT,
                                       HAS_BIAS)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _sequence_tile(acc, l_i, m_i, q, a, start_n, offs_n, offs_d, d_ok, k_base, v_base, KPM,
                                       b, stride_kn, stride_vn, stride_mb, stride_mn, Lk, window, score_scale,
                                       cap_scale, rng, row_ids, offs_m, S * P, BIAS, bias_rows, row_ok, stride_bn,
                                       True, HAS_KPM, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT,
                                       HAS_BIAS)

    empty = l_i == 0.0  # no visible key: out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        out = acc * (dropout_scale / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2_C)
    o_ptrs = Out + b * stride_ob + row_h[:, None] * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * stride_lb + row_h * stride_lh + offs_m, lse, mask=row_ok)


@triton.jit
def _sequence_tile(acc, l_i, m_i, q, a, start_n, offs_n, offs_d, d_ok, k_base, v_base, KPM, b,
                   stride_kn, stride_vn, stride_mb, stride_mn, Lk, window, score_scale, cap_scale, rng, row_ids,
                   query_ids, key_base, BIAS, bias_rows, row_ok, stride_bn,
                   EDGE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    k, v, vis = load_sequence_tile(a, start_n, offs_n, offs_d, d_ok, k_base, v_base, KPM, b, stride_kn, stride_vn,
                                   stride_mb, stride_mn, Lk, window, EDGE, HAS_KPM, CAUSAL, HAS_WINDOW)
    offs = start_n + offs_n
    bias = bias_tile(BIAS, bias_rows[:, None] + offs[None, :] * stride_bn, row_ok[:, None] & (offs < Lk)[None, :],
                     HAS_BIAS)
    return _attend_tile(acc, l_i, m_i, q, k, v, vis, bias, score_scale, cap_scale, rng, row_ids, query_ids,
                        key_base + offs, EDGE or HAS_KPM, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT)


def last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def score_constants(scale: float, softcap: float):
    """(score_scale, cap_scale) for `score_log2`."""
    if softcap > 0.0:
        return 2.0 * LOG2E * scale / softcap, softcap * LOG2E
    return scale * LOG2E, 1.0


def prefix_attention_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal: bool,
                             scale: float, softcap: float, window: int, dropout_p: float = 0.0, dropout_seed=None,
                             attn_bias=None, prefix_bias=None):
    """Launch the forward kernel on the normalized layout (BACKEND_INTERFACE.md). Returns (out, lse fp32).
    With dropout_p > 0, `dropout_seed` is the int64 [seed_lo, seed_hi, offset] tensor (fastprompt/attention_dropout.py).
    attn_bias `[1|B, Hq, Lq, Lk]` / prefix_bias `[1|B, Hq, Lq, S*P]`: additive score biases, any strides
    (kernels/prefix_attention_bias.py)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    out = torch.empty_like(q)  # q's layout (the kernel takes strides): transformers' [B, L, H, D] stays free
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    has_prefix = prefix_k is not None
    if has_prefix:
        prefix_k, prefix_v = last_dim_contiguous(prefix_k), last_dim_contiguous(prefix_v)
        P, S = prefix_k.shape[2], prefix_index.shape[1]
        pk, pv, pidx = prefix_k, prefix_v, prefix_index
    else:
        P, S = 0, 0
        pk, pv, pidx = q, q, q  # never read (HAS_PREFIX=False); any pointer will do
    has_kpm = key_padding_mask is not None
    kpm = key_padding_mask.view(torch.uint8) if has_kpm else q
    bias, pbias = bias_args(attn_bias, q), bias_args(prefix_bias if has_prefix else None, q)
    configs = BIASED_FWD_CONFIGS if bias.enabled or pbias.enabled else FWD_CONFIGS
    cfg = fit_block_m(pick_config(configs, D, max(q.element_size(), pk.element_size())), Lq * (Hq // Hkv))
    score_scale, cap_scale = score_constants(scale, softcap)
    grid = (triton.cdiv(Lq * (Hq // Hkv), cfg.block_m), Hkv, B)  # rows = (query, head of the group) pairs
    drop = dropout_args(dropout_p, dropout_seed, q)
    _prefix_attention_fwd_kernel[grid](
        q, k, v, pk, pv, pidx, kpm, bias.tensor, pbias.tensor, out, lse, drop.seed,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pk.stride(0) if has_prefix else 0, pk.stride(1) if has_prefix else 0, pk.stride(2) if has_prefix else 0,
        pv.stride(0) if has_prefix else 0, pv.stride(1) if has_prefix else 0, pv.stride(2) if has_prefix else 0,
        pidx.stride(0) if has_prefix else 0, pidx.stride(1) if has_prefix else 0,
        kpm.stride(0) if has_kpm else 0, kpm.stride(1) if has_kpm else 0,
        *bias.strides, *pbias.strides,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        Lq, Lk, P, S, Hq // Hkv, window,
        score_scale, cap_scale, drop.threshold, drop.scale,
        HEAD_D=D, BLOCK_D=block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HAS_PREFIX=has_prefix, HAS_KPM=has_kpm, CAUSAL=bool(causal), HAS_WINDOW=window > 0,
        HAS_SOFTCAP=softcap > 0.0, DOT_PRECISION=dot_precision(q.dtype), HAS_DROPOUT=drop.enabled,
        HAS_BIAS=bias.enabled, HAS_PBIAS=pbias.enabled,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse
