"""The PEFT + transformers way of running a learned prefix through one attention layer, written with transformers'
own functions, as the op-level baseline.

Per layer, what PEFT's prefix-as-cache makes transformers do (ANCHORS §1): the prefix K/V held once per batch row
(PEFT builds the prefix from B rows of prompt tokens and keeps B copies in the DynamicCache), `torch.cat` of those
rows with the sequence K/V (`DynamicLayer.update`), a 4D boolean mask `[B, 1, S, P+S]` because kv_len != q_len
(`masking_utils.sdpa_mask`), and `sdpa_attention_forward`, which expands K/V with `repeat_kv` for GQA whenever a
mask is present (or packs GQA for a single decode query), then calls SDPA.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor
from transformers import AttentionInterface

try:
    from transformers import AttentionMaskInterface
except ImportError:  # older 5.x export it from masking_utils only
    from transformers.masking_utils import AttentionMaskInterface

from ..ops import prefix_attention

__all__ = ["prefix_rows", "peft_style_attention", "peft_style_decode", "fastprompt_decode"]


def prefix_rows(prefix: Tensor, batch: int) -> Tensor:
    """`[Hkv, P, D]` -> `[B, Hkv, P, D]`, materialized: PEFT's per-row prefix."""
    return prefix.unsqueeze(0).expand(batch, *prefix.shape).contiguous()


def _attention_module(num_heads: int, num_kv_heads: int):
    return SimpleNamespace(num_key_value_groups=num_heads // num_kv_heads, is_causal=True, training=False)


def _sdpa_functions():
    """transformers' own SDPA attention and mask functions, through the public registries (AttentionInterface /
    AttentionMaskInterface, the objects models dispatch through) rather than their module paths."""
    return AttentionInterface()["sdpa"], AttentionMaskInterface()["sdpa"]


def _sdpa(module, q, k, v, mask, scale):
    sdpa_attention_forward, _ = _sdpa_functions()

    out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=scale)
    return out  # [B, Lq, Hq, D]


def peft_style_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         scale: Optional[float] = None) -> Tensor:
    """Causal attention of q `[B, Hq, S, D]` over `[prefix; k]`, prefix `[Hkv, P, D]` shared, the PEFT way.
    Returns `[B, Hq, S, D]` (the same layout as fastprompt.ops.prefix_attention)."""
    _, sdpa_mask = _sdpa_functions()

    batch, hq, lq, dim = q.shape
    hkv = prefix_k.shape[0]
    keys = torch.cat([prefix_rows(prefix_k, batch), k], dim=2)  # DynamicLayer.update
    values = torch.cat([prefix_rows(prefix_v, batch), v], dim=2)
    kv_len = keys.shape[2]
    padding = torch.ones(batch, kv_len, dtype=torch.bool, device=q.device)  # PEFT prepends ones for the prefix
    mask = sdpa_mask(batch_size=batch, q_length=lq, kv_length=kv_len, q_offset=kv_len - lq, kv_offset=0,
                     attention_mask=padding, device=q.device)
    out = _sdpa(_attention_module(hq, hkv), q, keys, values, mask, scale if scale is not None else dim ** -0.5)
    return out.transpose(1, 2)


def peft_style_decode(q: Tensor, cache_k: Tensor, cache_v: Tensor, k_new: Tensor, v_new: Tensor,
                      scale: Optional[float] = None) -> Tensor:
    """One decode step the PEFT way: the cache holds `[prefix rows; tokens]`; it is re-concatenated with the new
    token (DynamicLayer.update), then transformers' SDPA path runs over all P+S+1 keys."""
    _, sdpa_mask = _sdpa_functions()

    batch, hq, lq, dim = q.shape
    keys = torch.cat([cache_k, k_new], dim=2)
    values = torch.cat([cache_v, v_new], dim=2)
    kv_len = keys.shape[2]
    padding = torch.ones(batch, kv_len, dtype=torch.bool, device=q.device)
    mask = sdpa_mask(batch_size=batch, q_length=lq, kv_length=kv_len, q_offset=kv_len - lq, kv_offset=0,
                     attention_mask=padding, device=q.device)
    out = _sdpa(_attention_module(hq, cache_k.shape[1]), q, keys, values, mask,
                scale if scale is not None else dim ** -0.5)
    return out.transpose(1, 2)


def fastprompt_decode(q: Tensor, cache_k: Tensor, cache_v: Tensor, k_new: Tensor, v_new: Tensor, prefix_k: Tensor,
                      prefix_v: Tensor, scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """One decode step the fastprompt way: the cache holds real tokens only; the prefix is read where it lives."""
    keys = torch.cat([cache_k, k_new], dim=2)
    values = torch.cat([cache_v, v_new], dim=2)
    return prefix_attention(q, keys, values, prefix_k, prefix_v, causal=True, scale=scale, backend=backend)
