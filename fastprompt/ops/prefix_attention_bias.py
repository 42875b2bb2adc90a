"""`prefix_attention` with an additive score bias (T5's relative position bias): checks and the torch path.

T5 adds a learned bias to every attention score: `position_bias [1, H, Lq, Lk]` over the sequence keys, which
transformers computes per call, and, with a prefix-tuning prefix, a bias for the prefix keys too (PEFT's prefix
sits in the cache at positions 0..P-1, so T5 gives each prefix key the bucket of its distance to the query).
Both reach the op as `attn_bias [1|B, Hq, Lq, Lk]` and `prefix_bias [1|B, Hq, Lq, S*P]`; the concatenated
`[prefix; sequence]` bias, keys and values are never built.

Backends: the torch path, the Triton kernels (prefix_attention_triton_bias, which also picks the backend: Triton
for CUDA tensors under "auto") and the reference. The torch path runs PyTorch's fused CPU flash kernel with the
biases as its additive masks (prefix_attention_bias_cpu: float32/float64 on the CPU, no softcap) and otherwise the
exact composition (prefix_attention_torch.explicit_forward/backward, which recomputes the biased scores in backward
from the saved log-sum-exp). The CUDA (_C) kernels take no bias. The bias gets no gradient (T5's relative attention
bias belongs to the frozen base model); a bias that requires grad is refused.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .prefix_attention_inputs import PREFIX_NONE, PrefixAttentionArgs


def _check_one(name: str, bias, args: PrefixAttentionArgs, keys: int, layout: str) -> Tensor:
    q = args.q
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


def check_biases(args: PrefixAttentionArgs, attn_bias, prefix_bias):
    """Validated (attn_bias, prefix_bias); a prefix_bias needs a prefix."""
    lk = args.k.shape[2]
    if attn_bias is not None:
        attn_bias = _check_one("attn_bias", attn_bias, args, lk, "[1|B, Hq, Lq, Lk]")
    if prefix_bias is not None:
        if args.prefix_mode == PREFIX_NONE:
            raise ValueError("prefix_attention: `prefix_bias` was given but there is no prefix (prefix_k is None)")
        keys = args.prefix_index.shape[1] * args.prefix_k.shape[2]
        prefix_bias = _check_one("prefix_bias", prefix_bias, args, keys, "[1|B, Hq, Lq, S*P]")
    return attn_bias, prefix_bias


class _BiasedPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, args, attn_bias, prefix_bias):
        from . import prefix_attention_bias_cpu as cpu
        from . import prefix_attention_torch as tp

        ctx.fused = cpu.applicable(q, args.softcap)
        ctx.set_materialize_grads(False)  # an unused lse output then arrives as None, not as zeros
        if ctx.fused:  # the CPU flash kernel with the biases as its additive masks
            out, lse = cpu.forward(q, k, v, prefix_k, prefix_v, args.prefix_index, args.prefix_mode,
                                   args.key_padding_mask, args.causal, args.scale, args.window, attn_bias=attn_bias,
                                   prefix_bias=prefix_bias)
            ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, attn_bias, prefix_bias)
            ctx.args = args
            return out, lse.float()
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        attn_bias = attn_bias.to(acc) if attn_bias is not None else None
        prefix_bias = prefix_bias.to(acc) if prefix_bias is not None else None
        out, lse = tp.explicit_forward(q, k, v, prefix_k, prefix_v, args.prefix_index, args.prefix_mode,
                                       args.key_padding_mask, args.causal, args.scale, args.softcap, args.window,
                                       attn_bias=attn_bias, prefix_bias=prefix_bias)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, attn_bias, prefix_bias)
        ctx.args = args
        return out, lse.float()

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from . import prefix_attention_torch as tp

        q, k, v, prefix_k, prefix_v, out, lse, attn_bias, prefix_bias = ctx.saved_tensors
        args = ctx.args
        if grad_out is None:  # only the lse output was used
            grad_out = torch.zeros_like(out)
        if ctx.fused and grad_lse is None:  # the kernel's backward recomputes the row term from out
            from . import prefix_attention_bias_cpu as cpu

            dq, dk, dv, dpk, dpv = cpu.backward(grad_out, q, k, v, out, lse, prefix_k, prefix_v, args.prefix_index,
                                                args.prefix_mode, args.key_padding_mask, args.causal, args.scale,
                                                args.window, attn_bias=attn_bias, prefix_bias=prefix_bias)
            return dq, dk, dv, dpk, dpv, None, None, None
        if ctx.fused:  # lse differentiated: the explicit backward, with the biases in its precision
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            attn_bias = attn_bias.to(acc) if attn_bias is not None else None
            prefix_bias = prefix_bias.to(acc) if prefix_bias is not None else None
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(dim=-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(lse.dtype)
        dq, dk, dv, dpk, dpv = tp.explicit_backward(
            grad_out, q, k, v, prefix_k, prefix_v, args.prefix_index, args.prefix_mode, args.key_padding_mask, lse,
            delta, args.causal, args.scale, args.softcap, args.window, attn_bias=attn_bias, prefix_bias=prefix_bias)
        if prefix_k is None:
            dpk = dpv = None
        return dq, dk, dv, dpk, dpv, None, None, None


def biased_prefix_attention(args: PrefixAttentionArgs, attn_bias, prefix_bias):
    """(out, lse) of the torch path with biases; the normalized prefix (`[E, Hkv, P, D]`) is differentiated back
    to the caller's prefix through the views check_prefix_attention_args made."""
    from . import prefix_attention_bias_cpu as cpu

    if not torch.is_grad_enabled() and cpu.applicable(args.q, args.softcap):
        # nothing to differentiate (a decode step): the kernel path without the autograd.Function around it
        out, lse = cpu.forward(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index,
                               args.prefix_mode, args.key_padding_mask, args.causal, args.scale, args.window,
                               attn_bias=attn_bias, prefix_bias=prefix_bias)
        return out, lse.float()
    return _BiasedPrefixAttention.apply(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args, attn_bias,
                                        prefix_bias)
