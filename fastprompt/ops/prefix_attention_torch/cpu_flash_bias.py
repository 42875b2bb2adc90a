"""Biased prefix attention (T5's relative position bias) on the CPU through PyTorch's fused flash kernel.

The kernel (`aten::_scaled_dot_product_flash_attention_for_cpu`, forward and backward) takes an additive float
`attn_mask`, so a score bias is just that mask: the sequence part gets `attn_bias` (with padding, causality and
the window folded in as -inf; plain causality over Lq == Lk is the kernel's own `is_causal`, so the bias goes in
as it is, a view), the prefix part gets `prefix_bias` (plus -inf over a pool's empty slots). The two parts are
merged by their log-sum-exp exactly as in cpu_flash.py: the `[prefix; sequence]` keys, values and
bias are never concatenated, and a shared prefix is read through a batch-stride-0 view.

Backward: the kernel's backward of each part with the merged out and lse (so its probabilities are the global
ones). A shared prefix's part is one problem per head over all B*Lq query rows folded together (views in
transformers' [B, L, H, D] memory), so its gradient comes out `[1, Hkv, P, D]`, never B-fold. The biases get no
gradient (the op refuses one that requires grad).

Used for float32 / float64 inputs without softcap when the lse output is not differentiated; the explicit
composition (explicit.py) covers everything else.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..prefix_attention_inputs import PREFIX_NONE, PREFIX_PER_SAMPLE, PREFIX_POOL, PREFIX_SHARED
from . import cpu_flash

NEG_INF = float("-inf")


def applicable(q: Tensor, softcap: float) -> bool:
    """Whether forward runs here. Low precision stays on the explicit path, which adds the bias in float32 (the
    kernel would add it in q's dtype)."""
    return cpu_flash.applicable(q, softcap) and q.dtype in (torch.float32, torch.float64)


def _sequence_mask(q: Tensor, lk: int, attn_bias: Optional[Tensor], key_padding_mask, causal: bool, window: int):
    """(additive mask or None, the kernel's is_causal, rows with no visible sequence key or None) for the sequence
    part: attn_bias with every hidden position at -inf."""
    lq = q.shape[2]
    if attn_bias is None:
        return cpu_flash._sequence_mask(q, lk, key_padding_mask, causal, window)
    bias = cpu_flash.kernel_layout(attn_bias.to(q.dtype))
    if key_padding_mask is None and window < 0 and (not causal or lq == lk or lq == 1):
        # top-left is_causal equals bottom-right when Lq == Lk; a single (decode) query sees every key
        return bias, causal and lq > 1, None
    hidden = cpu_flash.hidden_positions(lq, lk, causal, window, q.device)
    if hidden is not None:
        hidden = hidden[None, None]
    if key_padding_mask is not None:
        padded = (~key_padding_mask)[:, None, None, :]
        hidden = padded if hidden is None else (hidden | padded)
    # rows can lose every key only to padding, a window, or causality with more queries than keys
    may_empty = key_padding_mask is not None or window > 0 or (causal and lq > lk)
    return bias.masked_fill(hidden, NEG_INF), False, (hidden.all(dim=-1) if may_empty else None)


def _prefix_part(q: Tensor, prefix_k, prefix_v, prefix_index, prefix_mode, prefix_bias: Optional[Tensor]):
    """(q, k, v, additive mask or None, rows [B] with no prefix key or None) of the prefix part."""
    batch = q.shape[0]
    bias = None if prefix_bias is None else cpu_flash.kernel_layout(prefix_bias.to(q.dtype))
    if prefix_mode == PREFIX_SHARED:  # read through a batch-stride-0 view: no per-row copy
        return (q, prefix_k.expand(batch, *prefix_k.shape[1:]), prefix_v.expand(batch, *prefix_v.shape[1:]), bias,
                None)
    pq, pk, pv, pmask, prefix_empty = cpu_flash._prefix_problem(q, prefix_k, prefix_v, prefix_index, prefix_mode)
    if bias is not None:
        pmask = bias if pmask is None else bias + pmask
    return pq, pk, pv, pmask, prefix_empty


def forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, window,
            attn_bias=None, prefix_bias=None):
    """(out in q's layout, lse [B, Hq, Lq] in the kernel's precision) of biased prefix attention."""
    q, k, v, prefix_k, prefix_v = cpu_flash._kernel_inputs(q, k, v, prefix_k, prefix_v)
    seq_empty = None
    if k.shape[2] == 0:
        out_seq, lse_seq = cpu_flash._empty_sequence_part(q)
    else:
        mask, is_causal, seq_empty = _sequence_mask(q, k.shape[2], attn_bias, key_padding_mask, causal, window)
        out_seq, lse_seq = cpu_flash._flash(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        if seq_empty is not None:  # the kernel reports lse 0 for a row with every key masked
            lse_seq = lse_seq.masked_fill(seq_empty, NEG_INF)
    if prefix_mode == PREFIX_NONE:
        out, lse = out_seq, lse_seq
    else:
        pq, pk, pv, pmask, prefix_empty = _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_mode,
                                                       prefix_bias)
        out_pre, lse_pre = cpu_flash._flash(pq, pk, pv, 0.0, False, attn_mask=pmask, scale=scale)
        out, lse = cpu_flash.merge_parts(out_seq, lse_seq, out_pre, lse_pre, prefix_empty)
    if seq_empty is not None or prefix_mode == PREFIX_POOL or (prefix_mode == PREFIX_NONE and k.shape[2] == 0):
        out = out.masked_fill_(torch.isneginf(lse)[..., None], 0.0)  # a row with no visible key: 0, not NaN
    return out, lse


def backward(grad_out, q, k, v, out, lse, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal,
             scale, window, attn_bias=None, prefix_bias=None):
    """(dq, dk, dv, dprefix_k, dprefix_v) from the merged out and lse (the lse output carries no gradient)."""
    q, k, v, prefix_k, prefix_v = cpu_flash._kernel_inputs(q, k, v, prefix_k, prefix_v)
    if prefix_mode not in (PREFIX_SHARED, PREFIX_PER_SAMPLE):  # there every row sees its prefix keys: lse finite
        # A row with no visible key has lse = -inf; +inf makes the kernel's exp(s - lse) an exact 0, not NaN.
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    grad_out, out = cpu_flash._dense(grad_out), cpu_flash._dense(out)
    if k.shape[2] == 0:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    else:
        mask, is_causal, _ = _sequence_mask(q, k.shape[2], attn_bias, key_padding_mask, causal, window)
        dq, dk, dv = cpu_flash._flash_backward(grad_out, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask,
                                               scale=scale)
    if prefix_mode == PREFIX_NONE:
        return dq, dk, dv, None, None
    if prefix_mode == PREFIX_SHARED:
        dpk, dpv = _shared_prefix_backward(grad_out, q, out, lse, prefix_k, prefix_v, scale, dq,
                                           None if prefix_bias is None else prefix_bias.to(q.dtype))
        return dq, dk, dv, dpk, dpv
    pq, pk, pv, pmask, _ = _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_mode, prefix_bias)
    dpq, dpk, dpv = cpu_flash._flash_backward(grad_out, pq, pk, pv, out, lse, 0.0, False, attn_mask=pmask,
                                              scale=scale)
    dq = dq.add_(dpq)
    if prefix_mode == PREFIX_POOL:  # scatter each row's slots back into the pool entries they read
        dpk, dpv = _scatter_slots(dpk, prefix_k, prefix_index), _scatter_slots(dpv, prefix_v, prefix_index)
    return dq, dk, dv, dpk, dpv


def _fold(t: Tensor) -> Tensor:
    """[B, H, L, ...] -> [1, H, B*L, ...]: every row of a head as one long problem; a view for transformers'
    [B, L, H, D] memory (q, dO, O), a small copy otherwise (lse, a bias broadcast over the batch)."""
    return t.transpose(0, 1).reshape(1, t.shape[1], -1, *t.shape[3:])


def _shared_prefix_backward(grad_out, q, out, lse, prefix_k, prefix_v, scale, dq, prefix_bias):
    """The shared prefix's share of the backward: the kernel's backward of one problem per head whose queries are
    all B*Lq rows (folded) and whose keys are the one `[Hkv, P, D]` prefix, so the prefix gradient comes out summed
    over the batch (no B-fold copy); its dq share is added into dq in place. Measured faster on the CPU than the
    written-out per-head backward at T5's shapes, which spends its time in small-op overhead."""
    batch = q.shape[0]
    mask = None if prefix_bias is None else _fold(prefix_bias.expand(batch, *prefix_bias.shape[1:]))
    dpq, dpk, dpv = cpu_flash._flash_backward(_fold(grad_out), _fold(q), prefix_k, prefix_v, _fold(out), _fold(lse),
                                              0.0, False, attn_mask=mask, scale=scale)
    dq.add_(cpu_flash._unfold_shared(dpq, batch))
    return dpk, dpv


def _scatter_slots(rows: Tensor, prefix: Tensor, prefix_index: Tensor) -> Tensor:
    """[B, Hkv, S*P, D] per-row gradients -> [N, Hkv, P, D] summed into the pool entries each slot read (an empty
    slot's rows are zeros: its keys had probability 0)."""
    batch, slots, plen = prefix_index.shape[0], prefix_index.shape[1], prefix.shape[2]
    per_slot = rows.reshape(batch, prefix.shape[1], slots, plen, prefix.shape[3]).transpose(1, 2)
    total = torch.zeros(prefix.shape, dtype=prefix.dtype, device=prefix.device)
    return total.index_add_(0, prefix_index.clamp(min=0).reshape(-1), per_slot.flatten(0, 1))

