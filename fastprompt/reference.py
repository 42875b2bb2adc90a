"""The oracle: prefix attention written the obvious way.

Everything the fast paths avoid happens here on purpose: the prefix is copied once per batch row, concatenated
in front of the sequence keys/values, GQA heads are repeated, and a dense `[B, Hq, Lq, P + Lk]` visibility mask
is built. Run it in float64 to get a reference that the kernels are measured against.

Attention dropout draws its mask from `dropout_seed` with the counter-based generator every backend uses
(fastprompt.attention_dropout), one element at a time over the full `[B, Hq, Lq, S*P + Lk]` grid, so a
backend's fused dropout is checked exactly, gradients included.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .attention_dropout import dropout_threshold, keep_mask_elementwise
from .reference_prompts import gather_prompts, mix_prompts  # re-exported: every oracle lives in one namespace

__all__ = ["prefix_attention", "expand_prefix", "sequence_visibility", "gather_prompts", "mix_prompts"]


def expand_prefix(prefix: Optional[Tensor], prefix_index: Optional[Tensor], batch: int):
    """Per-row prefix keys or values `[B, Hkv, S*P, D]` and their visibility `[B, S*P]` (False = empty pool slot)."""
    if prefix is None:
        return None, None
    if prefix_index is not None:
        slots = prefix_index.shape[1] if prefix_index.dim() == 2 else 1
        index = prefix_index.reshape(batch, slots).long()  # any integer dtype, as the op accepts (int8 included)
        rows = prefix[index.clamp(min=0)]  # [B, S, Hkv, P, D]
        b, s, h, p, d = rows.shape
        rows = rows.permute(0, 2, 1, 3, 4).reshape(b, h, s * p, d)
        visible = (index >= 0).repeat_interleave(p, dim=1)
        return rows, visible
    if prefix.dim() == 3:  # shared by the batch
        prefix = prefix.unsqueeze(0).expand(batch, -1, -1, -1)
    return prefix, torch.ones(batch, prefix.shape[2], dtype=torch.bool, device=prefix.device)


def sequence_visibility(lq: int, lk: int, *, causal: bool, window: Optional[int], device) -> Tensor:
    """`[Lq, Lk]` bool: which sequence keys each query may see (bottom-right causal, sliding window)."""
    qpos = torch.arange(lq, device=device)[:, None] + (lk - lq)
    kpos = torch.arange(lk, device=device)[None, :]
    visible = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        visible &= kpos <= qpos
    if window is not None:
        visible &= (qpos - kpos) < window
        if not causal:
            visible &= (kpos - qpos) < window
    return visible


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, prefix_index=None, key_padding_mask=None,
                     causal=True, scale=None, softcap=None, window=None, dropout_p=0.0, dropout_seed=None,
                     return_lse=False, attn_bias=None, prefix_bias=None):
    """Same contract as `fastprompt.ops.prefix_attention` (DESIGN.md §1), computed in q's dtype. With dropout_p > 0,
    `dropout_seed` is the int64 `[seed_lo, seed_hi, offset]` the op drew (fastprompt.attention_dropout); lse
    stays the softmax's, before dropout.

    attn_bias `[1|B, Hq, Lq, Lk]` / prefix_bias `[1|B, Hq, Lq, S*P]`: added to the (capped) scores of the sequence /
    prefix keys (T5's relative position bias)."""
    batch, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale

    pk, prefix_visible = expand_prefix(prefix_k, prefix_index, batch)
    pv, _ = expand_prefix(prefix_v, prefix_index, batch)
    seq_visible = sequence_visibility(lq, lk, causal=causal, window=window, device=q.device)
    seq_visible = seq_visible.expand(batch, lq, lk)
    if key_padding_mask is not None:
        seq_visible = seq_visible & key_padding_mask[:, None, :].bool()
    if pk is not None:
        keys, values = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        visible = torch.cat([prefix_visible[:, None, :].expand(batch, lq, -1), seq_visible], dim=2)
    else:
        keys, values, visible = k, v, seq_visible

    group = hq // hkv
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_bias is not None or prefix_bias is not None:
        zeros = lambda n: scores.new_zeros(1, hq, lq, n)
        bias = (attn_bias if attn_bias is not None else zeros(lk)).to(scores.dtype).expand(batch, -1, -1, -1)
        if pk is not None:
            pre = (prefix_bias if prefix_bias is not None else zeros(pk.shape[2])).to(scores.dtype)
            bias = torch.cat([pre.expand(batch, -1, -1, -1), bias], dim=-1)
        scores = scores + bias
    scores = scores.masked_fill(~visible[:, None], float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isinf(lse)
    probs = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    if dropout_p > 0:
        probs = probs * dropout_keep(dropout_seed, dropout_p, probs.shape) / (1.0 - dropout_p_exact(dropout_p))
    out = torch.matmul(probs, values)
    out = out.masked_fill(empty[..., None], 0.0)
    if return_lse:
        return out, lse.float()
    return out


def dropout_keep(seed: Tensor, dropout_p: float, shape) -> Tensor:
    """`[B, Hq, Lq, K]` bool: the keep decision of every (b, h, i, j), keys j over [prefix slots; sequence]."""
    batch, heads, lq, keys = shape
    b, h, i, j = (torch.arange(n, dtype=torch.int64, device=seed.device) for n in shape)
    row = (b[:, None] * heads + h[None, :])[:, :, None, None]
    return keep_mask_elementwise(seed, dropout_p, row, i[:, None], j[None, :])


def dropout_p_exact(dropout_p: float) -> float:
    """The drop probability the integer threshold realizes (dropout_p rounded to a multiple of 2**-31)."""
    return dropout_threshold(dropout_p) / 2**31

