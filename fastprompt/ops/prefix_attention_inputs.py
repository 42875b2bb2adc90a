"""Checking and normalizing the arguments of `prefix_attention`.

Users pass a prefix in one of three public layouts (shared `[Hkv, P, D]`, per-sample `[B, Hkv, P, D]`, or a pool
`[N, Hkv, P, D]` with `prefix_index`). Backends see one layout, `[E, Hkv, P, D]` entries plus an int64
`[B, S]` index, and a mode number that says which public layout it came from (BACKEND_INTERFACE.md). The
normalization only adds views and a tiny index tensor: no prefix data is copied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..attention_dropout import check_dropout_p

PREFIX_NONE, PREFIX_SHARED, PREFIX_PER_SAMPLE, PREFIX_POOL = 0, 1, 2, 3
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class PrefixAttentionArgs:
    """One call's checked, normalized arguments: what every backend receives (BACKEND_INTERFACE.md). The fields
    are, in order, the inputs of the op's custom-op pair (`op_inputs`), so the op rebuilds this from its inputs
    and a new argument is one field here plus the backends that claim it."""
    q: Tensor
    k: Tensor
    v: Tensor
    prefix_k: Optional[Tensor]  # [E, Hkv, P, D]
    prefix_v: Optional[Tensor]
    prefix_index: Optional[Tensor]  # int64 [B, S]
    prefix_mode: int
    key_padding_mask: Optional[Tensor]  # bool [B, Lk]
    causal: bool
    scale: float
    softcap: float  # 0.0 = none
    window: int  # -1 = none
    attn_bias: Optional[Tensor] = None  # [1|B, Hq, Lq, Lk], any float dtype and strides
    prefix_bias: Optional[Tensor] = None  # [1|B, Hq, Lq, S*P]
    dropout_p: float = 0.0
    dropout_seed: Optional[Tensor] = None  # int64 [seed_lo, seed_hi, offset] (fastprompt.attention_dropout) when dropout_p > 0

    @property
    def biased(self) -> bool:
        return self.attn_bias is not None or self.prefix_bias is not None

    def op_inputs(self) -> tuple:
        """The fields in order: the leading inputs of the custom ops (PrefixAttentionArgs(*inputs) undoes it)."""
        return (self.q, self.k, self.v, self.prefix_k, self.prefix_v, self.prefix_index, self.prefix_mode,
                self.key_padding_mask, self.causal, self.scale, self.softcap, self.window, self.attn_bias,
                self.prefix_bias, self.dropout_p, self.dropout_seed)

    def saved(self) -> tuple:
        """(tensors, everything else), what autograd saves between forward and backward; from_saved undoes it."""
        return ((self.q, self.k, self.v, self.prefix_k, self.prefix_v, self.prefix_index, self.key_padding_mask,
                 self.attn_bias, self.prefix_bias, self.dropout_seed),
                (self.prefix_mode, self.causal, self.scale, self.softcap, self.window, self.dropout_p))

    @classmethod
    def from_saved(cls, tensors, params) -> "PrefixAttentionArgs":
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias, prefix_bias, dropout_seed = tensors
        prefix_mode, causal, scale, softcap, window, dropout_p = params
        return cls(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
                   window, attn_bias, prefix_bias, dropout_p, dropout_seed)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, t, dims: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"prefix_attention: `{name}` must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"prefix_attention: `{name}` must be {dims}-D {layout}, got shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"prefix_attention: `{name}` must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_prefix_attention_args(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, scale,
                                softcap, window, attn_bias=None, prefix_bias=None,
                                dropout_p=0.0) -> PrefixAttentionArgs:
    """The checked, normalized arguments of one call, or a clear error naming the argument. The dropout seed is
    left to the op, which draws it once the call is known to run."""
    _require_tensor("q", q, 4, "[B, Hq, Lq, D]")
    _require_tensor("k", k, 4, "[B, Hkv, Lk, D]")
    _require_tensor("v", v, 4, "[B, Hkv, Lk, D]")
    batch, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"prefix_attention: `k` must be [B={batch}, Hkv, Lk, D={dim}] to match q {_shape(q)}, "
                         f"got {_shape(k)}")
    if v.shape != k.shape:
        raise ValueError(f"prefix_attention: `v` must have the shape of k {_shape(k)}, got {_shape(v)}")
    if hkv == 0 or hq % hkv != 0:
        hint = ("; q, k and v are expected as [B, H, L, D]: did you pass [B, L, H, D]? "
                "use .transpose(1, 2) on each")
        raise ValueError(f"prefix_attention: the query heads of `q` ({hq}) must be a multiple of the key/value "
                         f"heads of `k` ({hkv}, dim 1 of k {_shape(k)}){hint}")
    if lq == 0 or dim == 0:
        raise ValueError(f"prefix_attention: `q` must have Lq >= 1 and D >= 1, got {_shape(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"prefix_attention: `{name}` must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"prefix_attention: `{name}` must be on q's device {q.device}, got {t.device}")

    prefix_k, prefix_v, prefix_index, mode = _normalize_prefix(q, prefix_k, prefix_v, prefix_index, batch, hkv, dim)

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError("prefix_attention: `key_padding_mask` must be a bool tensor [B, Lk] or None, "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.shape != (batch, lk):
            raise ValueError(f"prefix_attention: `key_padding_mask` must be [B={batch}, Lk={lk}] "
                             f"(True = real token), got {_shape(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"prefix_attention: `key_padding_mask` must be on q's device {q.device}, "
                             f"got {key_padding_mask.device}")
        if key_padding_mask.dtype != torch.bool:
            if key_padding_mask.dtype.is_floating_point:
                raise TypeError("prefix_attention: `key_padding_mask` must be bool or integer 0/1 "
                                f"(True = real token), got {key_padding_mask.dtype}")
            key_padding_mask = key_padding_mask != 0

    if not isinstance(causal, bool):
        raise TypeError(f"prefix_attention: `causal` must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"prefix_attention: `scale` must be a positive finite float or None, got {scale!r}")
    if softcap is None or softcap == 0:
        softcap = 0.0
    elif (not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not math.isfinite(softcap)
          or softcap <= 0):
        raise ValueError(f"prefix_attention: `softcap` must be a positive finite float or None, got {softcap!r}")
    if window is None:
        window = -1
    elif not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"prefix_attention: `window` must be a positive int (keys within the window are seen) "
                         f"or None, got {window!r}")
    dropout_p = check_dropout_p(dropout_p)
    if attn_bias is not None:
        attn_bias = _check_bias("attn_bias", attn_bias, q, lk, "[1|B, Hq, Lq, Lk]")
    if prefix_bias is not None:
        if mode == PREFIX_NONE:
            raise ValueError("prefix_attention: `prefix_bias` was given but there is no prefix (prefix_k is None)")
        keys = prefix_index.shape[1] * prefix_k.shape[2]
        prefix_bias = _check_bias("prefix_bias", prefix_bias, q, keys, "[1|B, Hq, Lq, S*P]")
    return PrefixAttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index, mode, key_padding_mask, causal,
                               float(scale), float(softcap), int(window), attn_bias, prefix_bias, dropout_p)


def _check_bias(name: str, bias, q: Tensor, keys: int, layout: str) -> Tensor:
    """An additive score bias (T5's relative position bias): a float tensor broadcastable over the batch, on q's
    device, that gets no gradient (T5's relative attention bias belongs to the frozen base model)."""
    batch, hq, lq, _ = q.shape
    if not isinstance(bias, Tensor):
        raise TypeError(f"prefix_attention: `{name}` must be a float tensor {layout} or None, got {type(bias).__name__}")
    if not bias.dtype.is_floating_point:
        raise TypeError(f"prefix_attention: `{name}` must be a float tensor, got {bias.dtype}")
    if bias.dim() != 4 or bias.shape[0] not in (1, batch) or tuple(bias.shape[1:]) != (hq, lq, keys):
        raise ValueError(f"prefix_attention: `{name}` must be {layout} = [1 or {batch}, {hq}, {lq}, {keys}], "
                         f"got {list(bias.shape)}")
    if bias.device != q.device:
        raise ValueError(f"prefix_attention: `{name}` must be on q's device {q.device}, got {bias.device}")
    if bias.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"prefix_attention: `{name}` requires grad, but the op gives no gradient to an attention bias (T5's "
            "relative attention bias is part of the frozen base model); detach it, or freeze the weights it comes "
            "from")
    return bias


def _normalize_prefix(q, prefix_k, prefix_v, prefix_index, batch, hkv, dim):
    if prefix_k is None and prefix_v is None:
        if prefix_index is not None:
            raise ValueError("prefix_attention: `prefix_index` was given but `prefix_k`/`prefix_v` are None")
        return None, None, None, PREFIX_NONE
    if prefix_k is None or prefix_v is None:
        missing = "prefix_k" if prefix_k is None else "prefix_v"
        raise ValueError(f"prefix_attention: `{missing}` is None but the other prefix tensor was given; pass both "
                         "or neither")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"prefix_attention: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"prefix_attention: `{name}` must be [Hkv, P, D] (shared), [B, Hkv, P, D] (per sample) "
                             f"or [N, Hkv, P, D] (pool with prefix_index), got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"prefix_attention: `{name}` must be a float tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"prefix_attention: `{name}` must be on q's device {q.device}, got {t.device}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_attention: `prefix_v` must have the shape of prefix_k {_shape(prefix_k)}, "
                         f"got {_shape(prefix_v)}")
    # One rule for every backend: the prefix comes in q's dtype (no silent promotion either way). The model
    # integration casts prefix parameters to the activations' dtype before calling the op.
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"prefix_attention: `{name}` must have q's dtype {q.dtype}, got {t.dtype}; "
                            f"cast it with {name}.to(q.dtype)")
    heads, plen, pdim = prefix_k.shape[-3:]
    if heads != hkv or pdim != dim:
        raise ValueError(f"prefix_attention: `prefix_k` must end in [Hkv={hkv}, P, D={dim}] to match k, "
                         f"got {_shape(prefix_k)}")
    if plen == 0:
        raise ValueError(f"prefix_attention: `prefix_k` has an empty prefix (P = 0), got {_shape(prefix_k)}; "
                         "pass prefix_k=None for no prefix")

    if prefix_index is None:
        if prefix_k.dim() == 3:
            index = torch.zeros(batch, 1, dtype=torch.long, device=q.device)
            return prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), index, PREFIX_SHARED
        if prefix_k.shape[0] != batch:
            raise ValueError(f"prefix_attention: a 4-D `prefix_k` without prefix_index is per sample and must be "
                             f"[B={batch}, Hkv, P, D], got {_shape(prefix_k)}; pass prefix_index to use it as a pool")
        index = torch.arange(batch, dtype=torch.long, device=q.device)[:, None]
        return prefix_k, prefix_v, index, PREFIX_PER_SAMPLE

    if prefix_k.dim() != 4:
        raise ValueError(f"prefix_attention: with `prefix_index`, `prefix_k` must be a pool [N, Hkv, P, D], "
                         f"got {_shape(prefix_k)}")
    if not isinstance(prefix_index, Tensor):
        raise TypeError(f"prefix_attention: `prefix_index` must be an integer tensor [B] or [B, S], "
                        f"got {type(prefix_index).__name__}")
    if prefix_index.dtype.is_floating_point or prefix_index.dtype == torch.bool or prefix_index.is_complex():
        raise TypeError(f"prefix_attention: `prefix_index` must be an integer tensor, got {prefix_index.dtype}")
    if prefix_index.device != q.device:
        raise ValueError(f"prefix_attention: `prefix_index` must be on q's device {q.device}, got {prefix_index.device}")
    if prefix_index.dim() not in (1, 2) or prefix_index.shape[0] != batch or prefix_index.shape[-1] == 0:
        raise ValueError(f"prefix_attention: `prefix_index` must be [B={batch}] or [B={batch}, S] with S >= 1, "
                         f"got {_shape(prefix_index)}")
    index = prefix_index.reshape(batch, prefix_index.shape[1] if prefix_index.dim() == 2 else 1).long()
    # The values are checked where the op runs (index_range.check_index_values), not here: this function is
    # traced by torch.compile, where a data-dependent check cannot run.
    return prefix_k, prefix_v, index, PREFIX_POOL

