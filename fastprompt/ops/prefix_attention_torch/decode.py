"""One decoding step over a shared prefix on the CPU, for inference: the lean path of a generate() step.

In a decode step each row has one query (Lq = 1), so causality hides nothing and the whole call is two small
attention problems: the shared prefix `[Hkv, P, D]` and the cached sequence keys. Through the general op
(`prefix_attention`) such a step costs far more in per-call work (argument checks, backend choice, the layout and
mask bookkeeping a training call needs, a 7-op lse merge) than in arithmetic. Here:

- sequence part: PyTorch's CPU flash kernel with the GQA group packed as query rows (q `[B, Hkv, G, D]`, a view:
  with one query per head, the G heads of a group are G rows over the same keys), so the kernel walks B·Hkv row
  blocks instead of B·Hq single rows;
- prefix part: every query of a head attends the same P keys, so the B queries are folded into one row block per
  head (q `[1, Hq, B, D]`, a view) against the prefix read where it lives (no per-row copy);
- merge: with w = sigmoid(lse_prefix − lse_seq) = exp(lse_prefix − lse), out = lerp(out_seq, out_prefix, w)
  = (1 − w)·out_seq + w·out_prefix, which is the lse merge of the two parts (FlashInfer's cascade merge) in 3 ops.

The result equals the general op's to float rounding (tests/test_hoisting_decode_attention.py). The concatenated
`[prefix; sequence]` keys are never built. `shared_prefix_decode` returns None whenever a call is outside this
narrow case (gradients, a tracing / dispatch mode such as FlopCounterMode, softcap, a window that hides keys,
dropout, low precision, rows whose sequence keys are all padding, unusual layouts): the caller then runs the
general op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..prefix_attention import plain_eager  # the same "nothing watching" test as the op's eager paths

__all__ = ["shared_prefix_decode"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_DTYPES = (torch.float32, torch.float64)  # bf16/fp16 merge in the lse precision: the general op does that
NEG_INF = float("-inf")


def _no_observer(tensors) -> bool:
    """Nothing to differentiate and nothing watching the call (torch.compile, dispatch / function modes such as
    FlopCounterMode, functorch transforms): those go through the op, which they see and count."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return plain_eager()


def shared_prefix_decode(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         key_padding_mask: Optional[Tensor], scale: float, softcap: Optional[float] = None,
                         window: Optional[int] = None, dropout_p: float = 0.0) -> Optional[Tensor]:
    """Attention of one query per row over `[prefix; k]`: q `[B, Hq, 1, D]`, k/v `[B, Hkv, Lk, D]`, a shared prefix
    `[Hkv, P, D]`, `key_padding_mask` bool `[B, Lk]` (True = real key) or None. Returns out `[B, Hq, 1, D]`
    (contiguous in `[B, 1, Hq, D]` order, what a transformers attention returns after its transpose), or None
    when this path does not apply (the general op then runs)."""
    if q.dim() != 4 or q.shape[2] != 1 or q.device.type != "cpu" or q.dtype not in _DTYPES:
        return None
    if softcap or dropout_p or prefix_k.dim() != 3 or k.dim() != 4:
        return None
    batch, hq, _, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if lk == 0 or hkv == 0 or hq % hkv or window is not None and window < lk:
        return None  # no sequence key (the kernel divides by Lk), or a window that hides some
    if (k.shape[0] != batch or k.shape[3] != dim or v.shape != k.shape or prefix_k.shape[0] != hkv
            or prefix_k.shape[2] != dim or prefix_k.shape[1] == 0 or prefix_v.shape != prefix_k.shape):
        return None  # the general op says what is wrong
    if not (k.dtype == v.dtype == prefix_k.dtype == prefix_v.dtype == q.dtype):
        return None
    # the kernel reads each D-row as one contiguous run (see cpu_flash.kernel_layout)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or prefix_k.stride(-1) != 1 \
            or prefix_v.stride(-1) != 1:
        return None
    if not _no_observer((q, k, v, prefix_k, prefix_v)):
        return None
    mask = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, lk) or key_padding_mask.dtype != torch.bool:
            return None
        if not bool(key_padding_mask.all()):  # (an all-true mask: a static cache's filled slots, no padding)
            if not bool(key_padding_mask.any(dim=1).all()):
                return None  # a row with every sequence key hidden: the general op handles the empty part
            # additive [B, 1, 1, Lk], broadcast over the heads and the packed query rows of a group
            mask = torch.zeros((batch, 1, 1, lk), dtype=q.dtype).masked_fill_(~key_padding_mask[:, None, None],
                                                                              NEG_INF)

    group = hq // hkv
    packed = q.reshape(batch, hkv, group, dim)  # a view for transformers' [B, 1, Hq, D] memory
    out_seq, lse_seq = _flash(packed, k, v, 0.0, False, attn_mask=mask, scale=scale)
    folded = q.transpose(0, 2)  # [1, Hq, B, D]: every query of a head against the same P prefix keys
    out_pre, lse_pre = _flash(folded, prefix_k[None], prefix_v[None], 0.0, False, attn_mask=None, scale=scale)
    lse_pre = lse_pre.transpose(0, 2).reshape(batch, hkv, group)  # [1, Hq, B] -> [B, Hkv, G] (views)
    out_pre = out_pre.transpose(0, 2).reshape(batch, hkv, group, dim)
    weight = torch.sigmoid(lse_pre - lse_seq)  # the prefix's share of the softmax mass, exp(lse_prefix - lse)
    out = torch.lerp(out_seq, out_pre, weight[..., None])  # [B, Hkv, G, D] in out_seq's (contiguous) layout
    return out.reshape(batch, hq, 1, dim)  # [B, Hkv, G, D] memory: also contiguous as [B, 1, Hq, D]
