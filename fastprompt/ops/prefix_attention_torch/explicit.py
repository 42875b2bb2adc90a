"""Exact PyTorch prefix attention: the CPU path and the fallback for shapes the kernels do not cover.

On the CPU without softcap, forward and backward go to PyTorch's fused flash kernel in two lse-merged parts
(cpu_flash.py). Everywhere else, the explicit composition below:

Prefix scores and sequence scores are computed as two separate blocks and joined by one softmax, so the
concatenated `[prefix; sequence]` keys never exist. A shared prefix stays `[Hkv, P, D]` (einsum broadcasts it over
the batch and the GQA group), queries are viewed `[B, Hkv, G, Lq, D]` instead of repeating K/V per query head,
and the causal/window/padding masks are applied as broadcast `[Lq, Lk]` and `[B, Lk]` pieces, never as a
`[B, 1, Lq, P + Lk]` mask. Backward recomputes the scores from the saved log-sum-exp (the FlashAttention
recurrence), so nothing of size `[B, H, Lq, P + Lk]` is kept between forward and backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..prefix_attention_inputs import PREFIX_NONE, PREFIX_PER_SAMPLE, PREFIX_POOL, PREFIX_SHARED
from . import cpu_flash

NEG_INF = float("-inf")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sequence_masks(q: Tensor, lk: int, key_padding_mask, causal: bool, window: int):
    """Broadcastable invisibility masks for `[B, Hkv, G, Lq, Lk]` scores: `[Lq, Lk]` and `[B, 1, 1, 1, Lk]`."""
    position_mask = cpu_flash.hidden_positions(q.shape[2], lk, causal, window, q.device)
    padding_mask = None
    if key_padding_mask is not None:
        padding_mask = (~key_padding_mask)[:, None, None, None, :]
    return position_mask, padding_mask


def _selected_prefix(prefix: Tensor, prefix_index: Tensor, mode: int, acc: torch.dtype) -> Tensor:
    """Prefix rows as the einsums below expect them: shared `[Hkv, P, D]`, per sample `[B, Hkv, P, D]`,
    pool `[B, S, Hkv, P, D]` (the entries each row selected; the gather is the selection itself)."""
    if mode == PREFIX_SHARED:
        return prefix[0].to(acc)
    if mode == PREFIX_PER_SAMPLE:
        return prefix.to(acc)
    return prefix[prefix_index.clamp(min=0)].to(acc)


_SCORE_EQ = {PREFIX_SHARED: "bhgqd,hpd->bhgqp", PREFIX_PER_SAMPLE: "bhgqd,bhpd->bhgqp",
             PREFIX_POOL: "bhgqd,bshpd->bhgqsp"}
_VALUE_EQ = {PREFIX_SHARED: "bhgqp,hpd->bhgqd", PREFIX_PER_SAMPLE: "bhgqp,bhpd->bhgqd",
             PREFIX_POOL: "bhgqsp,bshpd->bhgqd"}
_GRAD_EQ = {PREFIX_SHARED: "bhgqp,bhgqd->hpd", PREFIX_PER_SAMPLE: "bhgqp,bhgqd->bhpd",
            PREFIX_POOL: "bhgqsp,bhgqd->bshpd"}


def _scores(qg, k, pk, prefix_index, mode, key_padding_mask, causal, scale, softcap, window, seq_bias=None,
            pre_bias=None):
    """Capped, biased, masked scores: (sequence `[B,Hkv,G,Lq,Lk]`, prefix `[B,Hkv,G,Lq,(S,)P]` or None, tanh terms).
    seq_bias / pre_bias: additive biases already shaped to broadcast against those (see _grouped_bias)."""
    seq = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) * scale
    pre = torch.einsum(_SCORE_EQ[mode], qg, pk) * scale if mode != PREFIX_NONE else None
    seq_tanh = pre_tanh = None
    if softcap > 0:
        seq_tanh = torch.tanh(seq / softcap)
        seq = seq_tanh * softcap
        if pre is not None:
            pre_tanh = torch.tanh(pre / softcap)
            pre = pre_tanh * softcap
    if seq_bias is not None:
        seq = seq + seq_bias
    if pre_bias is not None and pre is not None:
        pre = pre + pre_bias
    position_mask, padding_mask = _sequence_masks(qg[:, :, 0], k.shape[2], key_padding_mask, causal, window)
    if position_mask is not None:
        seq = seq.masked_fill(position_mask, NEG_INF)
    if padding_mask is not None:
        seq = seq.masked_fill(padding_mask, NEG_INF)
    if mode == PREFIX_POOL:  # empty slots (-1) hide their keys
        empty_slot = (prefix_index < 0)[:, None, None, None, :, None]
        pre = pre.masked_fill(empty_slot, NEG_INF)
    return seq, pre, seq_tanh, pre_tanh


def _row_max(seq: Tensor, pre: Optional[Tensor]) -> Tensor:
    m = seq.amax(dim=-1) if seq.shape[-1] > 0 else torch.full(seq.shape[:-1], NEG_INF, dtype=seq.dtype,
                                                               device=seq.device)
    if pre is not None:
        m = torch.maximum(m, pre.flatten(start_dim=4).amax(dim=-1))
    return m


def _grouped_bias(bias, hkv, mode, slots):
    """An additive bias `[1|B, Hq, Lq, N]` viewed as the grouped scores' `[1|B, Hkv, G, Lq, N]` (pool prefix:
    `[..., S, P]`), a view, in float. None stays None."""
    if bias is None:
        return None
    b, hq, lq, n = bias.shape
    grouped = bias.reshape(b, hkv, hq // hkv, lq, n)
    if mode == PREFIX_POOL and slots is not None:
        grouped = grouped.reshape(b, hkv, hq // hkv, lq, slots, n // slots)
    return grouped


def explicit_forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale,
                     softcap, window, attn_bias=None, prefix_bias=None):
    batch, hq, lq, dim = q.shape
    hkv = k.shape[1]
    acc = accumulator_dtype(q.dtype)
    qg = q.reshape(batch, hkv, hq // hkv, lq, dim).to(acc)
    kf, vf = k.to(acc), v.to(acc)
    pk = pv = None
    if prefix_mode != PREFIX_NONE:
        pk = _selected_prefix(prefix_k, prefix_index, prefix_mode, acc)
        pv = _selected_prefix(prefix_v, prefix_index, prefix_mode, acc)
    slots = prefix_index.shape[1] if prefix_index is not None else None
    seq, pre, _, _ = _scores(qg, kf, pk, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap, window,
                             _grouped_bias(attn_bias, hkv, prefix_mode, None),
                             _grouped_bias(prefix_bias, hkv, prefix_mode, slots))

    row_max = _row_max(seq, pre)
    empty = torch.isinf(row_max)  # every key hidden: all scores are -inf
    safe_max = row_max.masked_fill(empty, 0.0)[..., None]
    p_seq = torch.exp(seq - safe_max)
    denom = p_seq.sum(dim=-1)
    out = torch.einsum("bhgqk,bhkd->bhgqd", p_seq, vf)
    if pre is not None:
        p_pre = torch.exp(pre - (safe_max[..., None] if prefix_mode == PREFIX_POOL else safe_max))
        denom = denom + p_pre.flatten(start_dim=4).sum(dim=-1)
        out = out + torch.einsum(_VALUE_EQ[prefix_mode], p_pre, pv)
    out = out / denom.masked_fill(empty, 1.0)[..., None]
    lse = (row_max + torch.log(denom)).masked_fill(empty, NEG_INF)
    # lse keeps the accumulator precision (float64 for float64 inputs) so a float64 backward stays exact;
    # the public op returns it as float32.
    return out.reshape(batch, hq, lq, dim).to(q.dtype), lse.reshape(batch, hq, lq)


def explicit_backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse,
                      delta, causal, scale, softcap, window, attn_bias=None, prefix_bias=None):
    batch, hq, lq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    acc = accumulator_dtype(q.dtype)
    qg = q.reshape(batch, hkv, group, lq, dim).to(acc)
    dog = grad_out.reshape(batch, hkv, group, lq, dim).to(acc)
    kf, vf = k.to(acc), v.to(acc)
    lse_g = lse.reshape(batch, hkv, group, lq).to(acc)
    delta_g = delta.reshape(batch, hkv, group, lq).to(acc)
    empty = torch.isinf(lse_g)
    safe_lse = lse_g.masked_fill(empty, 0.0)[..., None]  # with lse = -inf every score is -inf too: P = 0
    pk = pv = None
    if prefix_mode != PREFIX_NONE:
        pk = _selected_prefix(prefix_k, prefix_index, prefix_mode, acc)
        pv = _selected_prefix(prefix_v, prefix_index, prefix_mode, acc)
    slots = prefix_index.shape[1] if prefix_index is not None else None
    seq, pre, seq_tanh, pre_tanh = _scores(qg, kf, pk, prefix_index, prefix_mode, key_padding_mask, causal, scale,
                                           softcap, window, _grouped_bias(attn_bias, hkv, prefix_mode, None),
                                           _grouped_bias(prefix_bias, hkv, prefix_mode, slots))

    def score_grad(p, dp, tanh_term, pad):
        ds = p * (dp - delta_g[..., None] if pad == 0 else dp - delta_g[..., None, None])
        if tanh_term is not None:
            ds = ds * (1.0 - tanh_term * tanh_term)
        return ds * scale

    p_seq = torch.exp(seq - safe_lse)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p_seq, dog)
    ds_seq = score_grad(p_seq, torch.einsum("bhgqd,bhkd->bhgqk", dog, vf), seq_tanh, 0)
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds_seq, kf)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds_seq, qg)

    dprefix_k = dprefix_v = None
    if prefix_mode != PREFIX_NONE:
        pool = prefix_mode == PREFIX_POOL
        p_pre = torch.exp(pre - (safe_lse[..., None] if pool else safe_lse))
        dp_pre = torch.einsum(_SCORE_EQ[prefix_mode], dog, pv)
        ds_pre = score_grad(p_pre, dp_pre, pre_tanh, 1 if pool else 0)
        dq = dq + torch.einsum(_VALUE_EQ[prefix_mode], ds_pre, pk)
        dpk = torch.einsum(_GRAD_EQ[prefix_mode], ds_pre, qg)
        dpv = torch.einsum(_GRAD_EQ[prefix_mode], p_pre, dog)
        dprefix_k, dprefix_v = prefix_grads_per_entry(dpk, dpv, prefix_mode, prefix_index, prefix_k, prefix_v, acc)
    dq = dq.reshape(batch, hq, lq, dim).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dprefix_k, dprefix_v


def prefix_grads_per_entry(dpk, dpv, prefix_mode, prefix_index, prefix_k, prefix_v, acc):
    """The prefix gradients in the entries layout `[E, Hkv, P, D]` and the prefix's dtype, from what the torch
    paths accumulate: `[Hkv, P, D]` (shared: already summed over rows), `[B, Hkv, P, D]` (per sample), or
    `[B, S, Hkv, P, D]` per row and slot (pool: scatter-added into the entries read; empty slots carry zeros)."""
    if prefix_mode == PREFIX_SHARED:
        dprefix_k, dprefix_v = dpk.unsqueeze(0), dpv.unsqueeze(0)
    elif prefix_mode == PREFIX_PER_SAMPLE:
        dprefix_k, dprefix_v = dpk, dpv
    else:
        flat_index = prefix_index.clamp(min=0).reshape(-1)
        dprefix_k = torch.zeros(prefix_k.shape, dtype=acc, device=prefix_k.device)
        dprefix_v = torch.zeros(prefix_v.shape, dtype=acc, device=prefix_v.device)
        dprefix_k.index_add_(0, flat_index, dpk.flatten(0, 1))
        dprefix_v.index_add_(0, flat_index, dpv.flatten(0, 1))
    return dprefix_k.to(prefix_k.dtype), dprefix_v.to(prefix_v.dtype)

