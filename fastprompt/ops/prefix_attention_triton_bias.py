"""`prefix_attention` with `attn_bias` / `prefix_bias` on the Triton kernels: backend choice and the custom ops.

T5's relative position bias reaches the op as additive score biases (prefix_attention_bias.py has the contract and
the torch path). The Triton kernels read both biases in place, forward and backward (fastprompt/kernels/
prefix_attention_bias.py); this module picks the backend for a biased call and wraps the kernels in their own
torch.library custom ops (opaque to torch.compile, differentiable in q, k, v and the prefix; the biases get no
gradient: prefix_attention_bias.check_biases refuses one that requires grad). Attention dropout composes with the
biases in the same kernels (T5 training): the contract's Philox mask (ops/attention_dropout.py) is generated per
tile from the seed the op drew, in forward and again in backward, so the kept elements are those of the reference
and of the torch path (prefix_attention_bias_dropout) for the same seed.

Choice: "auto" runs Triton on CUDA tensors when the kernels cover the call (prefix_attention_triton.supports and
supports_bias), the exact torch path otherwise (on the CPU always: the interpreter is for tests). backend="triton"
also runs CPU tensors under TRITON_INTERPRET=1. The CUDA (_C) kernels take no bias: backend="cuda" is refused with
a biased call and "auto" never picks it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .prefix_attention_inputs import PREFIX_NONE, PrefixAttentionArgs

_NO_BIAS_BACKENDS = {"cuda": "the CUDA kernels take no attn_bias / prefix_bias (use backend='triton' or 'torch')"}


def _triton_backend():
    from .prefix_attention import backend_module

    return backend_module("triton")


def triton_unsupported_reason(args: PrefixAttentionArgs, attn_bias, prefix_bias, needs_grad: bool,
                              dropout_p: float = 0.0) -> Optional[str]:
    """None when the Triton kernels can run this biased call (validated biases), else a one-line reason."""
    try:
        triton = _triton_backend()
    except ImportError as exc:
        return str(exc)
    reason = triton.supports(args.q, args.k, args.v, args.prefix_k, args.prefix_index, args.prefix_mode,
                             args.key_padding_mask, args.causal, args.softcap, args.window, needs_grad,
                             dropout_p=dropout_p)
    return reason if reason is not None else triton.supports_bias(args.q, attn_bias, prefix_bias)


def resolve_biased_backend(backend: str, args: PrefixAttentionArgs, attn_bias, prefix_bias, needs_grad: bool,
                           dropout_p: float = 0.0) -> str:
    """The backend that runs a biased call: "triton", "torch" or "reference"; a clear error for one that cannot."""
    if backend in ("torch", "reference"):
        return backend
    if backend in _NO_BIAS_BACKENDS:
        raise ValueError(f"prefix_attention: backend={backend!r} cannot run this call: {_NO_BIAS_BACKENDS[backend]}")
    if backend == "triton":
        reason = triton_unsupported_reason(args, attn_bias, prefix_bias, needs_grad, dropout_p)
        if reason is not None:
            raise ValueError(f"prefix_attention: backend='triton' cannot run this call: {reason}")
        return backend
    # auto: the fused kernels on a GPU where they cover the call; on the CPU the torch path is the fast one
    if args.q.is_cuda and triton_unsupported_reason(args, attn_bias, prefix_bias, needs_grad, dropout_p) is None:
        return "triton"
    return "torch"


def _layout(q: Tensor) -> tuple:
    from .prefix_attention import _layout_strides

    return _layout_strides(q)


def _forward_impl(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
                  window, attn_bias, prefix_bias, dropout_p=0.0, dropout_seed=None):
    from .prefix_attention import _in_layout

    out, lse = _triton_backend().forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask,
                                         causal, scale, softcap, window, dropout_p=dropout_p,
                                         dropout_seed=dropout_seed, attn_bias=attn_bias, prefix_bias=prefix_bias)
    return _in_layout(out, _layout(q)), lse.contiguous()


@torch.library.custom_op("fastprompt::prefix_attention_biased_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
                prefix_index: Optional[Tensor], prefix_mode: int, key_padding_mask: Optional[Tensor], causal: bool,
                scale: float, softcap: float, window: int, attn_bias: Optional[Tensor],
                prefix_bias: Optional[Tensor], dropout_p: float = 0.0,
                dropout_seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    # dropout_seed: the int64 [seed_lo, seed_hi, offset] the op drew (an input: the op stays a pure function)
    return _forward_impl(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale,
                         softcap, window, attn_bias, prefix_bias, dropout_p, dropout_seed)


@_forward_op.register_fake
def _forward_fake(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
                  window, attn_bias, prefix_bias, dropout_p=0.0, dropout_seed=None):
    return (torch.empty_strided(q.shape, _layout(q), dtype=q.dtype, device=q.device),
            q.new_empty(q.shape[:3], dtype=torch.float32))


@torch.library.custom_op("fastprompt::prefix_attention_biased_backward", mutates_args=())
def _backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                 prefix_v: Optional[Tensor], prefix_index: Optional[Tensor], prefix_mode: int,
                 key_padding_mask: Optional[Tensor], lse: Tensor, delta: Tensor, causal: bool, scale: float,
                 softcap: float, window: int, attn_bias: Optional[Tensor],
                 prefix_bias: Optional[Tensor], dropout_p: float = 0.0,
                 dropout_seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .prefix_attention import _in_layout, _layout_strides

    # the kernels regenerate forward's dropout mask from the same seed, tile by tile
    dq, dk, dv, dpk, dpv = _triton_backend().backward(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta, causal,
        scale, softcap, window, dropout_p=dropout_p, dropout_seed=dropout_seed, attn_bias=attn_bias,
        prefix_bias=prefix_bias)
    if dpk is None:  # custom ops return tensors only: an empty one stands for "no prefix"
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    dq, dk, dv = (_in_layout(g, _layout_strides(x)) for g, x in ((dq, q), (dk, k), (dv, v)))
    return dq, dk, dv, dpk.contiguous(), dpv.contiguous()


@_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta,
                   causal, scale, softcap, window, attn_bias, prefix_bias, dropout_p=0.0, dropout_seed=None):
    from .prefix_attention import _layout_strides

    if prefix_k is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
    dq, dk, dv = (torch.empty_strided(x.shape, _layout_strides(x), dtype=x.dtype, device=x.device)
                  for x in (q, k, v))
    return dq, dk, dv, dpk, dpv


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap, window,
     attn_bias, prefix_bias) = inputs[:14]
    dropout_p, dropout_seed = inputs[14:] if len(inputs) > 14 else (0.0, None)
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, attn_bias,
                          prefix_bias, dropout_seed)
    ctx.params = (prefix_mode, causal, scale, softcap, window, dropout_p)
    ctx.set_materialize_grads(False)  # an unused lse arrives as None, not as zeros to be folded in


def _backward(ctx, grad_out, grad_lse):
    (q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, attn_bias, prefix_bias,
     dropout_seed) = ctx.saved_tensors
    prefix_mode, causal, scale, softcap, window, dropout_p = ctx.params
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # FlashAttention's row term with the lse output's gradient folded in (BACKEND_INTERFACE.md, backward); with
    # dropout rowsum(dO * O) is still sum_j P_ij dP_ij, as out is the dropped probabilities times V
    delta = (grad_out.float() * out.float()).sum(dim=-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    dq, dk, dv, dpk, dpv = _backward_op(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode,
                                        key_padding_mask, lse, delta, causal, scale, softcap, window, attn_bias,
                                        prefix_bias, dropout_p, dropout_seed)
    if prefix_mode == PREFIX_NONE:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastprompt::prefix_attention_biased_forward", _backward,
                                setup_context=_setup_context)


# FlopCounterMode (and fastprompt.bench.metrics) count these ops as the unbiased ones: same leading arguments.
# get_raw: the unbiased formulas, as registered, take the raw arguments and reduce them to shapes themselves.
@register_flop_formula(torch.ops.fastprompt.prefix_attention_biased_forward, get_raw=True)
def _forward_flops(*args, **kwargs) -> int:
    from .prefix_attention import _forward_flops as unbiased

    return unbiased(*args, **kwargs)


@register_flop_formula(torch.ops.fastprompt.prefix_attention_biased_backward, get_raw=True)
def _backward_flops(*args, **kwargs) -> int:
    from .prefix_attention import _backward_flops as unbiased

    return unbiased(*args, **kwargs)


def biased_prefix_attention(args: PrefixAttentionArgs, attn_bias, prefix_bias, needs_grad: bool,
                            dropout_p: float = 0.0, dropout_seed: Optional[Tensor] = None):
    """(out, lse float32) of the Triton kernels with biases, on the op's normalized arguments (the caller checked
    the biases and, for a pool, the index values), with attention dropout when dropout_p > 0 (`dropout_seed`: the
    int64 [seed_lo, seed_hi, offset] drawn by the op). Inference skips the custom-op dispatch as the unbiased op
    does."""
    from .prefix_attention import _plain_eager

    call = _forward_impl if not needs_grad and _plain_eager() else _forward_op
    dropout = (dropout_p, dropout_seed) if dropout_p > 0 else ()  # the ops' defaults (0.0, None) otherwise
    return call(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index, args.prefix_mode,
                args.key_padding_mask, args.causal, args.scale, args.softcap, args.window, attn_bias, prefix_bias,
                *dropout)
