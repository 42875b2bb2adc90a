"""Prefix-attention backward, FA2 style: probabilities are recomputed from the saved lse, never stored.

Three kernels:
- dK/dV over sequence key tiles: each program keeps its K/V tile resident and streams the query tiles of every
  query head in its GQA group, so dk/dv come out already summed over the group (no repeat_kv).
- dQ over tiles of (query, head) rows of one GQA group: prefix tiles then sequence tiles, mirroring the forward.
- dPrefix over (prefix tile x slot, kv head, batch row): each program computes what sample b's slot s adds to
  entry prefix_index[b, s] and adds it into an fp32 [E, Hkv, P, D] buffer with atomics (FA3's approach), so a
  shared or pooled prefix's gradient is reduced over the batch without a B-fold copy. Per-sample prefixes
  (each entry used exactly once) store directly in the prefix dtype instead.

Attention dropout (prefix_attention_dropout.py) is regenerated per tile from the seed: with Z the keep mask and
r = 1 / (1 - p), out = (Z * P * r) V, so dV = (Z * P * r)^T dO, dP = Z * r * (dO V^T), and dS = P * (dP - delta)
(dropped entries too: their dS is -P * delta). delta = rowsum(dO * O) still equals sum_j P_ij dP_ij because O is
the dropped output, so the row term needs no change.

Additive score biases (prefix_attention_bias.py) enter the recomputed probabilities only: each kernel loads the
bias tile of its score tile (key-major in dK/dV and dPrefix), and dS keeps its form; the biases get no gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .prefix_attention_common import (BIASED_BWD_DQ_CONFIGS, BIASED_DROPOUT_BWD_DQ_CONFIGS, BWD_DKDV_CONFIGS, BWD_DPREFIX_CONFIGS, BWD_DQ_CONFIGS,
                                      LOG2E_C, block_d,
                                      dot_precision, fit_block_m, mma, pick_config, score_log2, sequence_key_range,
                                      sequence_visible, load_sequence_tile, split_range)
from .prefix_attention_bias import bias_args, bias_tile
from .prefix_attention_dropout import dropout_args, dropout_keep, load_dropout_seed
from .prefix_attention_fwd import last_dim_contiguous, score_constants


@triton.jit
def _load_query_rows(Q, DO, LSE, DELTA, q_off, do_off, l_off, row_ok, offs_d, d_ok):
    """q, dO, lse (log2 domain) and delta for a tile of query rows at element offsets q_off / do_off / l_off [M].
    Rows outside the problem and rows with no visible key get lse = +inf, so every probability recomputed for
    them is exactly 0 and they need no further masking."""
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + do_off[:, None] + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE + l_off, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E_C)
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
    return q, do.to(q.dtype), lse, delta


@triton.jit
def _kv_grad_tile(dk, dv, k, v, q, do, lse, delta, vis_t, bias_t, score_scale, cap_scale, rng, row_id, query_ids,
                  key_j, APPLY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """dK/dV contribution of one query tile, in key-major [N, M] orientation. `vis_t` read only if APPLY_MASK,
    `bias_t` [N, M] (log2 domain) only if HAS_BIAS: the bias enters the recomputed probabilities, not dS's form.
    Dropout: rng = (seed_lo, seed_hi, offset, threshold, 1 / (1 - p)), row_id = b * Hq + h (one query head),
    query_ids [M], key_j [N] (key indices over [prefix; sequence])."""
    qk_t = mma(k, tl.trans(q), None, DOT_PRECISION)
    s_t, tanh_t = score_log2(qk_t, score_scale, cap_scale, HAS_SOFTCAP)
    if HAS_BIAS:
        s_t = s_t + bias_t
    p_t = tl.math.exp2(s_t - lse[None, :])
    if APPLY_MASK:
        p_t = tl.where(vis_t, p_t, 0.0)
    if HAS_DROPOUT:
        seed_lo, seed_hi, offset, threshold, keep_scale = rng
        keep_t = dropout_keep(seed_lo, seed_hi, offset, row_id, query_ids[None, :], key_j[:, None], threshold)
        dv = mma(tl.where(keep_t, p_t * keep_scale, 0.0).to(q.dtype), do, dv, DOT_PRECISION)
        dp_t = mma(v, tl.trans(do), None, DOT_PRECISION)
        dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
    else:
        dv = mma(p_t.to(q.dtype), do, dv, DOT_PRECISION)
        dp_t = mma(v, tl.trans(do), None, DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if HAS_SOFTCAP:
        ds_t = ds_t * (1.0 - tanh_t * tanh_t)
    dk = mma(ds_t.to(q.dtype), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def _q_grad_tile(dq, q, do, lse, delta, k, v, vis, bias, score_scale, cap_scale, rng, row_ids, query_ids, key_j,
                 APPLY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """dQ contribution of one key tile, query-major [M, N]. `vis` read only if APPLY_MASK, `bias` [M, N] only if
    HAS_BIAS. Dropout as in _kv_grad_tile, with row_ids [M] (rows span query heads here)."""
    qk = mma(q, tl.trans(k), None, DOT_PRECISION)
    s, tanh_s = score_log2(qk, score_scale, cap_scale, HAS_SOFTCAP)
    if HAS_BIAS:
        s = s + bias
    p = tl.math.exp2(s - lse[:, None])
    if APPLY_MASK:
        p = tl.where(vis, p, 0.0)
    dp = mma(do, tl.trans(v), None, DOT_PRECISION)
    if HAS_DROPOUT:
        seed_lo, seed_hi, offset, threshold, keep_scale = rng
        keep = dropout_keep(seed_lo, seed_hi, offset, row_ids[:, None], query_ids[:, None], key_j[None, :],
                            threshold)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - tanh_s * tanh_s)
    return mma(ds.to(q.dtype), k, dq, DOT_PRECISION)


@triton.jit
def _key_major_bias(BIAS, base, offs_m, offs_n, Lq, num_keys, stride_bm, stride_bn, HAS_BIAS: tl.constexpr):
    """The `[N, M]` (key-major) bias tile of keys offs_n (columns of the bias) and queries offs_m of one head."""
    return bias_tile(BIAS, base + offs_n[:, None] * stride_bn + offs_m[None, :] * stride_bm,
                     (offs_n[:, None] < num_keys) & (offs_m[None, :] < Lq), HAS_BIAS)


@triton.jit
def _prefix_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, KPM, BIAS, DK, DV, DROPOUT_SEED,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_mb, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    Lq, Lk, G, window, prefix_keys,
    score_scale, cap_scale, sm_scale, dropout_threshold, dropout_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h_kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    kv_mask = (offs_n[:, None] < Lk) & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)

    # Query rows that see some key of this tile: [lo, hi); rows that see all of it: [full_lo, full_hi).
    j_first = start_n
    j_last = tl.minimum(start_n + BLOCK_N, Lk) - 1
    shift = Lk - Lq  # query i sits at key position i + shift (bottom-right alignment)
    lo = j_first * 0
    hi = lo + Lq
    full_lo = lo
    full_hi = lo + Lq
    if CAUSAL:
        lo = tl.maximum(lo, j_first - shift)
        full_lo = tl.maximum(full_lo, j_last - shift)
    if HAS_WINDOW:
        hi = tl.minimum(hi, j_last + window - shift)
        full_hi = tl.minimum(full_hi, j_first + window - shift)
        if not CAUSAL:
            lo = tl.maximum(lo, j_first - window + 1 - shift)
            full_lo = tl.maximum(full_lo, j_last - window + 1 - shift)
    if HAS_KPM:
        # A padding key has zero probability for every query, hence zero dk/dv: a tile of padding is skipped.
        kpm = tl.load(KPM + b * stride_mb + offs_n * stride_mn, mask=offs_n < Lk, other=0)
        hi = tl.where(tl.max(kpm.to(tl.int32), 0) > 0, hi, 0)
    lo, full_lo, full_hi, hi = split_range(lo, full_lo, full_hi, hi, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    seed_lo, seed_hi, seed_offset = load_dropout_seed(DROPOUT_SEED, HAS_DROPOUT)
    rng = (seed_lo, seed_hi, seed_offset, dropout_threshold, dropout_scale)
    key_j = prefix_keys + offs_n  # sequence keys come after the S*P prefix keys in dropout's key numbering
    for g in range(0, G):
        h = h_kv * G + g
        row_id = b * (tl.num_programs(1) * G) + h
        q_base = b * stride_qb + h * stride_qh
        do_base = b * stride_dob + h * stride_doh
        l_base = b * stride_lb + h * stride_lh
        bias_base = b * stride_bb + h * stride_bh
        for start_m in range(lo, full_lo, BLOCK_M):
            offs_m = start_m + offs_m0
            q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, q_base + offs_m * stride_qm,
                                                 do_base + offs_m * stride_dom, l_base + offs_m, offs_m < Lq,
                                                 offs_d, d_ok)
            vis_t = sequence_visible(offs_m[None, :] + shift, offs_n[:, None], Lk, window, CAUSAL, HAS_WINDOW)
            bias_t = _key_major_bias(BIAS, bias_base, offs_m, offs_n, Lq, Lk, stride_bm, stride_bn, HAS_BIAS)
            dk, dv = _kv_grad_tile(dk, dv, k, v, q, do, lse, delta, vis_t, bias_t, score_scale, cap_scale, rng,
                                   row_id, offs_m, key_j, True, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT)
        for start_m in range(full_lo, full_hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, q_base + offs_m * stride_qm,
                                                 do_base + offs_m * stride_dom, l_base + offs_m, offs_m < Lq,
                                                 offs_d, d_ok)
            bias_t = _key_major_bias(BIAS, bias_base, offs_m, offs_n, Lq, Lk, stride_bm, stride_bn, HAS_BIAS)
            dk, dv = _kv_grad_tile(dk, dv, k, v, q, do, lse, delta, None, bias_t, score_scale, cap_scale, rng,
                                   row_id, offs_m, key_j, False, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT)
        for start_m in range(full_hi, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, q_base + offs_m * stride_qm,
                                                 do_base + offs_m * stride_dom, l_base + offs_m, offs_m < Lq,
                                                 offs_d, d_ok)
            vis_t = sequence_visible(offs_m[None, :] + shift, offs_n[:, None], Lk, window, CAUSAL, HAS_WINDOW)
            bias_t = _key_major_bias(BIAS, bias_base, offs_m, offs_n, Lq, Lk, stride_bm, stride_bn, HAS_BIAS)
            dk, dv = _kv_grad_tile(dk, dv, k, v, q, do, lse, delta, vis_t, bias_t, score_scale, cap_scale, rng,
                                   row_id, offs_m, key_j, True, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT)

    dk = dk * sm_scale
    if HAS_KPM:
        # Padding keys were not masked per element above (their rows may hold garbage): zero them here.
        real = (kpm != 0)[:, None]
        dk = tl.where(real, dk, 0.0)
        dv = tl.where(real, dv, 0.0)
    tl.store(DK + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _prefix_attention_bwd_dq_kernel(
    Q, K, V, PK, PV, PIDX, KPM, BIAS, PBIAS, DO, LSE, DELTA, DQ, DROPOUT_SEED,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pke, stride_pkh, stride_pkn,
    stride_pve, stride_pvh, stride_pvn,
    stride_ib, stride_is,
    stride_mb, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_pbb, stride_pbh, stride_pbm, stride_pbn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dqm,
    Lq, Lk, P, S, G, window,
    score_scale, cap_scale, sm_scale, dropout_threshold, dropout_scale,
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
    # Rows are (query, head) pairs of one GQA group, query-major, as in the forward kernel.
    rows = start_m + tl.arange(0, BLOCK_M)
    num_rows = Lq * G
    row_ok = rows < num_rows
    offs_m = rows // G
    row_h = h_kv * G + rows % G
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, b * stride_qb + row_h * stride_qh + offs_m * stride_qm,
                                         b * stride_dob + row_h * stride_doh + offs_m * stride_dom,
                                         b * stride_lb + row_h * stride_lh + offs_m, row_ok, offs_d, d_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    seed_lo, seed_hi, seed_offset = load_dropout_seed(DROPOUT_SEED, HAS_DROPOUT)
    rng = (seed_lo, seed_hi, seed_offset, dropout_threshold, dropout_scale)
    row_ids = b * (tl.num_programs(1) * G) + row_h
    bias_rows = b * stride_bb + row_h * stride_bh + offs_m * stride_bm
    pbias_rows = b * stride_pbb + row_h * stride_pbh + offs_m * stride_pbm

    if HAS_PREFIX:
        P_full = (P // BLOCK_N) * BLOCK_N
        for s in range(0, S):
            entry = tl.load(PIDX + b * stride_ib + s * stride_is)
            p_full = tl.where(entry >= 0, P_full, 0)
            p_end = tl.where(entry >= 0, P, 0)
            entry = tl.maximum(entry, 0)
            pk_base = PK + entry * stride_pke + h_kv * stride_pkh
            pv_base = PV + entry * stride_pve + h_kv * stride_pvh
            for start_n in range(0, p_full, BLOCK_N):
                offs = start_n + offs_n0
                k = tl.load(pk_base + offs[:, None] * stride_pkn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                v = tl.load(pv_base + offs[:, None] * stride_pvn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
                pbias = bias_tile(PBIAS, pbias_rows[:, None] + (s * P + offs)[None, :] * stride_pbn,
                                  row_ok[:, None] & (offs < P)[None, :], HAS_PBIAS)
                dq = _q_grad_tile(dq, q, do, lse, delta, k.to(q.dtype), v.to(q.dtype), None, pbias, score_scale,
                                  cap_scale, rng, row_ids, offs_m, s * P + offs, False, HAS_PBIAS, HAS_SOFTCAP,
                                  DOT_PRECISION, HAS_DROPOUT)
            for start_n in range(p_full, p_end, BLOCK_N):
                offs = start_n + offs_n0
                kv_mask = (offs[:, None] < P) & d_ok[None, :]
                k = tl.load(pk_base + offs[:, None] * stride_pkn + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(pv_base + offs[:, None] * stride_pvn + offs_d[None, :], mask=kv_mask, other=0.0)
                vis = (offs[None, :] < P) & (offs_m[:, None] >= 0)
                pbias = bias_tile(PBIAS, pbias_rows[:, None] + (s * P + offs)[None, :] * stride_pbn,
                                  row_ok[:, None] & (offs < P)[None, :], HAS_PBIAS)
                dq = _q_grad_tile(dq, q, do, lse, delta, k.to(q.dtype), v.to(q.dtype), vis, pbias, score_scale,
                                  cap_scale, rng, row_ids, offs_m, s * P + offs, True, HAS_PBIAS, HAS_SOFTCAP,
                                  DOT_PRECISION, HAS_DROPOUT)

    m_first = start_m // G
    m_last = (tl.minimum(start_m + BLOCK_M, num_rows) - 1) // G
    lo, full_lo, full_hi, hi = sequence_key_range(m_first, m_last, Lq, Lk, window, BLOCK_N, CAUSAL, HAS_WINDOW)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    a = offs_m + (Lk - Lq)
    for start_n in range(lo, full_lo, BLOCK_N):
        dq = _dq_sequence_tile(dq, q, do, lse, delta, a, start_n, offs_n0, offs_d, d_ok, k_base, v_base, KPM, b,
                               stride_kn, stride_vn, stride_mb, stride_mn, Lk, window, score_scale, cap_scale,
                               rng, row_ids, offs_m, S * P, BIAS, bias_rows, row_ok, stride_bn, True, HAS_KPM,
                               CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT, HAS_BIAS)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_sequence_tile(dq, q, do, lse, delta, a, start_n, offs_n0, offs_d, d_ok, k_base, v_base, KPM, b,
                               stride_kn, stride_vn, stride_mb, stride_mn, Lk, window, score_scale, cap_scale,
                               rng, row_ids, offs_m, S * P, BIAS, bias_rows, row_ok, stride_bn, False, HAS_KPM,
                               CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT, HAS_BIAS)
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_sequence_tile(dq, q, do, lse, delta, a, start_n, offs_n0, offs_d, d_ok, k_base, v_base, KPM, b,
                               stride_kn, stride_vn, stride_mb, stride_mn, Lk, window, score_scale, cap_scale,
                               rng, row_ids, offs_m, S * P, BIAS, bias_rows, row_ok, stride_bn, True, HAS_KPM,
                               CAUSAL, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT, HAS_BIAS)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + row_h[:, None] * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _dq_sequence_tile(dq, q, do, lse, delta, a, start_n, offs_n0, offs_d, d_ok, k_base, v_base, KPM, b,
                      stride_kn, stride_vn, stride_mb, stride_mn, Lk, window, score_scale, cap_scale,
                      rng, row_ids, query_ids, key_base, BIAS, bias_rows, row_ok, stride_bn,
                      EDGE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      HAS_BIAS: tl.constexpr):
    k, v, vis = load_sequence_tile(a, start_n, offs_n0, offs_d, d_ok, k_base, v_base, KPM, b, stride_kn, stride_vn,
                                   stride_mb, stride_mn, Lk, window, EDGE, HAS_KPM, CAUSAL, HAS_WINDOW)
    offs = start_n + offs_n0
    bias = bias_tile(BIAS, bias_rows[:, None] + offs[None, :] * stride_bn, row_ok[:, None] & (offs < Lk)[None, :],
                     HAS_BIAS)
    return _q_grad_tile(dq, q, do, lse, delta, k, v, vis, bias, score_scale, cap_scale, rng, row_ids, query_ids,
                        key_base + offs, EDGE or HAS_KPM, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, HAS_DROPOUT)


@triton.jit
def _prefix_attention_bwd_dprefix_kernel(
    Q, PK, PV, PIDX, PBIAS, DO, LSE, DELTA, DPK, DPV, DROPOUT_SEED,
    stride_qb, stride_qh, stride_qm,
    stride_pke, stride_pkh, stride_pkn,
    stride_pve, stride_pvh, stride_pvn,
    stride_ib, stride_is,
    stride_pbb, stride_pbh, stride_pbm, stride_pbn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dpke, stride_dpkh, stride_dpkn,
    stride_dpve, stride_dpvh, stride_dpvn,
    Lq, P, G, num_p_tiles,
    score_scale, cap_scale, sm_scale, dropout_threshold, dropout_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_PBIAS: tl.constexpr,
):
    pid0 = tl.program_id(0)
    s = pid0 // num_p_tiles
    pid_p = pid0 % num_p_tiles
    h_kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    entry = tl.load(PIDX + b * stride_ib + s * stride_is)
    used = entry >= 0
    entry = tl.maximum(entry, 0)
    offs_n = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    kv_mask = (offs_n[:, None] < P) & d_ok[None, :]
    k = tl.load(PK + entry * stride_pke + h_kv * stride_pkh + offs_n[:, None] * stride_pkn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(PV + entry * stride_pve + h_kv * stride_pvh + offs_n[:, None] * stride_pvn + offs_d[None, :],
                mask=kv_mask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Prefix keys are visible to every query: no masks. Keys past P only touch rows that are never stored.
    m_end = tl.where(used, Lq, 0)
    seed_lo, seed_hi, seed_offset = load_dropout_seed(DROPOUT_SEED, HAS_DROPOUT)
    rng = (seed_lo, seed_hi, seed_offset, dropout_threshold, dropout_scale)
    key_j = s * P + offs_n  # slot s's keys in dropout's key numbering over [prefix slots; sequence]
    for g in range(0, G):
        h = h_kv * G + g
        row_id = b * (tl.num_programs(1) * G) + h
        q_base = b * stride_qb + h * stride_qh
        do_base = b * stride_dob + h * stride_doh
        l_base = b * stride_lb + h * stride_lh
        # slot s's columns of prefix_bias: offs_n < P only (a tail tile's extra keys would read the next slot)
        pbias_base = b * stride_pbb + h * stride_pbh + s * P * stride_pbn
        for start_m in range(0, m_end, BLOCK_M):
            offs_m = start_m + offs_m0
            q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, q_base + offs_m * stride_qm,
                                                 do_base + offs_m * stride_dom, l_base + offs_m, offs_m < Lq,
                                                 offs_d, d_ok)
            pbias_t = _key_major_bias(PBIAS, pbias_base, offs_m, offs_n, Lq, P, stride_pbm, stride_pbn, HAS_PBIAS)
            dk, dv = _kv_grad_tile(dk, dv, k.to(q.dtype), v.to(q.dtype), q, do, lse, delta, None, pbias_t,
                                   score_scale, cap_scale, rng, row_id, offs_m, key_j, False, HAS_PBIAS, HAS_SOFTCAP,
                                   DOT_PRECISION, HAS_DROPOUT)
    dk = dk * sm_scale

    dpk_ptrs = DPK + entry * stride_dpke + h_kv * stride_dpkh + offs_n[:, None] * stride_dpkn + offs_d[None, :]
    dpv_ptrs = DPV + entry * stride_dpve + h_kv * stride_dpvh + offs_n[:, None] * stride_dpvn + offs_d[None, :]
    if ATOMIC:
        # An empty slot (-1) adds nothing: its bound is 0. (Triton 3.9's interpreter refuses a
        # `tensor & scalar-bool` mask, so `used` enters as a bound of the tensor condition.)
        out_mask = (offs_n[:, None] < tl.where(used, P, 0)) & d_ok[None, :]
        tl.atomic_add(dpk_ptrs, dk, mask=out_mask, sem="relaxed")
        tl.atomic_add(dpv_ptrs, dv, mask=out_mask, sem="relaxed")
    else:
        tl.store(dpk_ptrs, dk.to(DPK.dtype.element_ty), mask=kv_mask)
        tl.store(dpv_ptrs, dv.to(DPV.dtype.element_ty), mask=kv_mask)


def prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode: int,
                              key_padding_mask, lse, delta, causal: bool, scale: float, softcap: float, window: int,
                              dropout_p: float = 0.0, dropout_seed=None, attn_bias=None, prefix_bias=None):
    """Launch the three backward kernels on the normalized layout. Returns (dq, dk, dv, dprefix_k, dprefix_v).
    dropout_p / dropout_seed: those of the forward (the mask is regenerated, not stored). attn_bias / prefix_bias:
    those of the forward (they get no gradient)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    do = last_dim_contiguous(grad_out)
    lse = lse.contiguous()
    delta = delta.contiguous()  # same [B, Hq, Lq] layout as lse: the kernels share lse's strides for it
    has_kpm = key_padding_mask is not None
    kpm = key_padding_mask.view(torch.uint8) if has_kpm else q
    score_scale, cap_scale = score_constants(scale, softcap)
    drop = dropout_args(dropout_p, dropout_seed, q)
    flags = dict(HEAD_D=D, BLOCK_D=block_d(D), HAS_SOFTCAP=softcap > 0.0, DOT_PRECISION=dot_precision(q.dtype),
                 HAS_DROPOUT=drop.enabled)
    prefix_keys = prefix_k.shape[2] * prefix_index.shape[1] if prefix_k is not None else 0
    bias, pbias = bias_args(attn_bias, q), bias_args(prefix_bias if prefix_k is not None else None, q)
    seq_flags = dict(HAS_KPM=has_kpm, CAUSAL=bool(causal), HAS_WINDOW=window > 0)

    # gradients in their inputs' layouts (the kernels take strides), as the op promises
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    if Lk > 0:
        cfg = fit_block_m(pick_config(BWD_DKDV_CONFIGS, D, q.element_size()), Lq)
        _prefix_attention_bwd_dkdv_kernel[(triton.cdiv(Lk, cfg.block_n), Hkv, B)](
            q, k, v, do, lse, delta, kpm, bias.tensor, dk, dv, drop.seed,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            lse.stride(0), lse.stride(1),
            kpm.stride(0) if has_kpm else 0, kpm.stride(1) if has_kpm else 0,
            *bias.strides,
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            Lq, Lk, G, window, prefix_keys,
            score_scale, cap_scale, scale, drop.threshold, drop.scale,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_BIAS=bias.enabled, **flags, **seq_flags,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    has_prefix = prefix_k is not None
    if has_prefix:
        prefix_k, prefix_v = last_dim_contiguous(prefix_k), last_dim_contiguous(prefix_v)
        P, S = prefix_k.shape[2], prefix_index.shape[1]
        pk, pv, pidx = prefix_k, prefix_v, prefix_index
    else:
        P, S = 0, 0
        pk, pv, pidx = q, q, q
    if bias.enabled or pbias.enabled:
        dq_configs = BIASED_DROPOUT_BWD_DQ_CONFIGS if drop.enabled else BIASED_BWD_DQ_CONFIGS
    else:
        dq_configs = BWD_DQ_CONFIGS
    cfg = fit_block_m(pick_config(dq_configs, D, max(q.element_size(), pk.element_size())), Lq * G)
    _prefix_attention_bwd_dq_kernel[(triton.cdiv(Lq * G, cfg.block_m), Hkv, B)](
        q, k, v, pk, pv, pidx, kpm, bias.tensor, pbias.tensor, do, lse, delta, dq, drop.seed,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pk.stride(0) if has_prefix else 0, pk.stride(1) if has_prefix else 0, pk.stride(2) if has_prefix else 0,
        pv.stride(0) if has_prefix else 0, pv.stride(1) if has_prefix else 0, pv.stride(2) if has_prefix else 0,
        pidx.stride(0) if has_prefix else 0, pidx.stride(1) if has_prefix else 0,
        kpm.stride(0) if has_kpm else 0, kpm.stride(1) if has_kpm else 0,
        *bias.strides, *pbias.strides,
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2),
        Lq, Lk, P, S, G, window,
        score_scale, cap_scale, scale, drop.threshold, drop.scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_PREFIX=has_prefix, HAS_BIAS=bias.enabled,
        HAS_PBIAS=pbias.enabled, **flags, **seq_flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    if not has_prefix:
        return dq, dk, dv, None, None

    # Per-sample entries are each used by exactly one batch row: plain stores, no fp32 buffer.
    atomic = prefix_mode != 2
    if atomic:
        dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device)
        dpv = torch.zeros(prefix_v.shape, dtype=torch.float32, device=q.device)
    else:
        dpk = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=q.device)
        dpv = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=q.device)
    cfg = fit_block_m(pick_config(BWD_DPREFIX_CONFIGS, D, max(q.element_size(), pk.element_size())), Lq)
    num_p_tiles = triton.cdiv(P, cfg.block_n)
    _prefix_attention_bwd_dprefix_kernel[(num_p_tiles * S, Hkv, B)](
        q, pk, pv, pidx, pbias.tensor, do, lse, delta, dpk, dpv, drop.seed,
        q.stride(0), q.stride(1), q.stride(2),
        pk.stride(0), pk.stride(1), pk.stride(2),
        pv.stride(0), pv.stride(1), pv.stride(2),
        pidx.stride(0), pidx.stride(1),
        *pbias.strides,
        do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1),
        dpk.stride(0), dpk.stride(1), dpk.stride(2),
        dpv.stride(0), dpv.stride(1), dpv.stride(2),
        Lq, P, G, num_p_tiles,
        score_scale, cap_scale, scale, drop.threshold, drop.scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ATOMIC=atomic, HAS_PBIAS=pbias.enabled, **flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
