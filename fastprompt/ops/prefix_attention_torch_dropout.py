"""Exact PyTorch prefix attention with attention dropout: the torch backend's path when dropout_p > 0.

PyTorch's fused CPU kernel draws its own dropout mask (and cannot regenerate it), so with dropout the torch backend
runs the explicit composition of prefix_attention_torch, chunked over queries: each chunk of at most
CHUNK_SCORES scores computes its sequence block `[B, Hkv, G, m, Lk]` and prefix block `[B, Hkv, G, m, (S,) P]`
(never joined, never a `[B, H, Lq, P + Lk]` matrix, never a concatenated or B-fold K/V), regenerates that chunk's
keep mask from the saved seed (fastprompt.ops.attention_dropout), and backward does the same again instead of
storing anything of score size. With Z the keep mask and r = 1 / (1 - p):

    forward:  out = (Z * P * r) V,  lse as without dropout (the softmax's own)
    backward: dV = (Z * P * r)^T dO,  dP = Z * r * (dO V^T),  dS = P * (dP - delta),  delta = rowsum(dO * O) - dlse
"""
from __future__ import annotations

import torch

from .attention_dropout import dropout_scale, keep_mask
from .prefix_attention_cpu_flash import hidden_positions
from .prefix_attention_inputs import PREFIX_NONE, PREFIX_POOL
from .prefix_attention_torch import (_GRAD_EQ, _SCORE_EQ, _VALUE_EQ, _accumulator_dtype, _selected_prefix,
                                     prefix_grads_per_entry)

NEG_INF = float("-inf")
CHUNK_SCORES = 1 << 18  # scores (all heads and batch rows) per query chunk: bounds every temporary, and keeps the
# mask generator's int64 words (one per 4 scores) cache-sized


class _Problem:
    """The chunk-independent pieces: grouped q, K/V in the accumulator dtype, the selected prefix, masks, the
    dropout counter words of every (b, h) row."""

    def __init__(self, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale,
                 softcap, window, dropout_p, dropout_seed):
        self.batch, self.hq, self.lq, self.dim = q.shape
        self.hkv, self.lk = k.shape[1], k.shape[2]
        self.group = self.hq // self.hkv
        self.acc = _accumulator_dtype(q.dtype)
        self.qg = q.reshape(self.batch, self.hkv, self.group, self.lq, self.dim).to(self.acc)
        self.k, self.v = k.to(self.acc), v.to(self.acc)
        self.mode, self.prefix_index = prefix_mode, prefix_index
        self.pk = self.pv = None
        self.slots = self.plen = 0
        if prefix_mode != PREFIX_NONE:
            self.pk = _selected_prefix(prefix_k, prefix_index, prefix_mode, self.acc)
            self.pv = _selected_prefix(prefix_v, prefix_index, prefix_mode, self.acc)
            self.slots, self.plen = prefix_index.shape[1], prefix_k.shape[2]
        self.scale, self.softcap = scale, softcap
        self.hidden = hidden_positions(self.lq, self.lk, causal, window, q.device)  # [Lq, Lk] or None
        self.padded = None if key_padding_mask is None else (~key_padding_mask)[:, None, None, None, :]
        self.empty_slot = None
        if prefix_mode == PREFIX_POOL:
            self.empty_slot = (prefix_index < 0)[:, None, None, None, :, None]
        self.dropout_p, self.seed = dropout_p, dropout_seed
        self.keep_scale = dropout_scale(dropout_p)
        b = torch.arange(self.batch, dtype=torch.int64, device=q.device)[:, None, None, None, None]
        h = torch.arange(self.hq, dtype=torch.int64, device=q.device).reshape(1, self.hkv, self.group, 1, 1)
        self.rows = b * self.hq + h  # b * Hq + h, [B, Hkv, G, 1, 1]

    def chunks(self):
        keys = max(1, self.lk + self.slots * self.plen)
        rows = max(1, CHUNK_SCORES // (self.batch * self.hq * keys))
        for start in range(0, self.lq, rows):
            yield start, min(self.lq, start + rows)

    def scores(self, q_chunk, start, stop):
        """Capped, masked scores of queries [start, stop): (sequence, prefix or None, their tanh terms)."""
        seq = torch.einsum("bhgqd,bhkd->bhgqk", q_chunk, self.k) * self.scale
        pre = None
        if self.mode != PREFIX_NONE:
            pre = torch.einsum(_SCORE_EQ[self.mode], q_chunk, self.pk) * self.scale
        seq_tanh = pre_tanh = None
        if self.softcap > 0:
            seq_tanh = torch.tanh(seq / self.softcap)
            seq = seq_tanh * self.softcap
            if pre is not None:
                pre_tanh = torch.tanh(pre / self.softcap)
                pre = pre_tanh * self.softcap
        if self.hidden is not None:
            seq = seq.masked_fill(self.hidden[start:stop], NEG_INF)
        if self.padded is not None:
            seq = seq.masked_fill(self.padded, NEG_INF)
        if self.empty_slot is not None:
            pre = pre.masked_fill(self.empty_slot, NEG_INF)
        return seq, pre, seq_tanh, pre_tanh

    def keep(self, start, stop):
        """This chunk's keep masks: sequence `[B, Hkv, G, m, Lk]`, prefix `[B, Hkv, G, m, (S,) P]` or None."""
        queries = torch.arange(start, stop, dtype=torch.int64, device=self.rows.device)[:, None]
        prefix_keys = self.slots * self.plen
        keep_seq = keep_mask(self.seed, self.dropout_p, self.rows, queries, prefix_keys, self.lk)
        keep_pre = None
        if self.mode != PREFIX_NONE:
            keep_pre = keep_mask(self.seed, self.dropout_p, self.rows, queries, 0, prefix_keys)
            if self.mode == PREFIX_POOL:
                keep_pre = keep_pre.unflatten(-1, (self.slots, self.plen))
        return keep_seq, keep_pre

    def kept(self, p, keep):
        """Z * p * r."""
        return (p * self.keep_scale).masked_fill_(~keep, 0.0)


def forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap, window,
            dropout_p, dropout_seed):
    pb = _Problem(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
                  window, dropout_p, dropout_seed)
    pool = prefix_mode == PREFIX_POOL
    out = torch.empty(pb.batch, pb.hkv, pb.group, pb.lq, pb.dim, dtype=pb.acc, device=q.device)
    lse = torch.empty(pb.batch, pb.hkv, pb.group, pb.lq, dtype=pb.acc, device=q.device)
    for start, stop in pb.chunks():
        q_chunk = pb.qg[:, :, :, start:stop]
        seq, pre, _, _ = pb.scores(q_chunk, start, stop)
        keep_seq, keep_pre = pb.keep(start, stop)
        row_max = seq.amax(dim=-1) if pb.lk > 0 else seq.new_full(seq.shape[:-1], NEG_INF)
        if pre is not None:
            row_max = torch.maximum(row_max, pre.flatten(start_dim=4).amax(dim=-1))
        empty = torch.isinf(row_max)  # every key hidden
        safe_max = row_max.masked_fill(empty, 0.0)[..., None]
        p_seq = torch.exp(seq - safe_max)
        denom = p_seq.sum(dim=-1)
        acc = torch.einsum("bhgqk,bhkd->bhgqd", pb.kept(p_seq, keep_seq), pb.v)
        if pre is not None:
            p_pre = torch.exp(pre - (safe_max[..., None] if pool else safe_max))
            denom = denom + p_pre.flatten(start_dim=4).sum(dim=-1)
            acc = acc + torch.einsum(_VALUE_EQ[prefix_mode], pb.kept(p_pre, keep_pre), pb.pv)
        out[:, :, :, start:stop] = acc / denom.masked_fill(empty, 1.0)[..., None]
        lse[:, :, :, start:stop] = (row_max + torch.log(denom)).masked_fill(empty, NEG_INF)
    return (out.reshape(pb.batch, pb.hq, pb.lq, pb.dim).to(q.dtype),
            lse.reshape(pb.batch, pb.hq, pb.lq))


def backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta, causal,
             scale, softcap, window, dropout_p, dropout_seed):
    pb = _Problem(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
                  window, dropout_p, dropout_seed)
    shape = (pb.batch, pb.hkv, pb.group, pb.lq)
    dog = grad_out.reshape(*shape, pb.dim).to(pb.acc)
    lse_g = lse.reshape(shape).to(pb.acc)
    delta_g = delta.reshape(shape).to(pb.acc)
    pool = prefix_mode == PREFIX_POOL
    dq = torch.empty(*shape, pb.dim, dtype=pb.acc, device=q.device)
    dk = torch.zeros(pb.k.shape, dtype=pb.acc, device=q.device)
    dv = torch.zeros(pb.v.shape, dtype=pb.acc, device=q.device)
    dpk = dpv = None
    for start, stop in pb.chunks():
        q_chunk, do_chunk = pb.qg[:, :, :, start:stop], dog[:, :, :, start:stop]
        seq, pre, seq_tanh, pre_tanh = pb.scores(q_chunk, start, stop)
        keep_seq, keep_pre = pb.keep(start, stop)
        lse_c = lse_g[:, :, :, start:stop]
        safe_lse = lse_c.masked_fill(torch.isinf(lse_c), 0.0)[..., None]  # lse = -inf: every score is -inf, P = 0
        delta_c = delta_g[:, :, :, start:stop][..., None]

        def score_grad(p, dp_kept, tanh_term, row_term):
            ds = p * (dp_kept - row_term)
            if tanh_term is not None:
                ds = ds * (1.0 - tanh_term * tanh_term)
            return ds * scale

        p_seq = torch.exp(seq - safe_lse)
        dv += torch.einsum("bhgqk,bhgqd->bhkd", pb.kept(p_seq, keep_seq), do_chunk)
        dp_seq = pb.kept(torch.einsum("bhgqd,bhkd->bhgqk", do_chunk, pb.v), keep_seq)
        ds_seq = score_grad(p_seq, dp_seq, seq_tanh, delta_c)
        dq_chunk = torch.einsum("bhgqk,bhkd->bhgqd", ds_seq, pb.k)
        dk += torch.einsum("bhgqk,bhgqd->bhkd", ds_seq, q_chunk)
        if pre is not None:
            p_pre = torch.exp(pre - (safe_lse[..., None] if pool else safe_lse))
            dp_pre = pb.kept(torch.einsum(_SCORE_EQ[prefix_mode], do_chunk, pb.pv), keep_pre)
            ds_pre = score_grad(p_pre, dp_pre, pre_tanh, delta_c[..., None] if pool else delta_c)
            dq_chunk = dq_chunk + torch.einsum(_VALUE_EQ[prefix_mode], ds_pre, pb.pk)
            dpk_chunk = torch.einsum(_GRAD_EQ[prefix_mode], ds_pre, q_chunk)
            dpv_chunk = torch.einsum(_GRAD_EQ[prefix_mode], pb.kept(p_pre, keep_pre), do_chunk)
            dpk = dpk_chunk if dpk is None else dpk.add_(dpk_chunk)
            dpv = dpv_chunk if dpv is None else dpv.add_(dpv_chunk)
        dq[:, :, :, start:stop] = dq_chunk

    dprefix_k = dprefix_v = None
    if prefix_mode != PREFIX_NONE:
        dprefix_k, dprefix_v = prefix_grads_per_entry(dpk, dpv, prefix_mode, prefix_index, prefix_k, prefix_v,
                                                      pb.acc)
    return (dq.reshape(pb.batch, pb.hq, pb.lq, pb.dim).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dprefix_k,
            dprefix_v)
