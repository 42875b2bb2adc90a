"""`fastprompt.ops.prefix_attention`: attention over `[prefix; sequence]` keys without building them.

This module is the op's front door and its one custom-op pair: the checks (prefix_attention_inputs) build one
PrefixAttentionArgs, the dispatch (prefix_attention_dispatch) picks the backend, and the `torch.library` ops
`fastprompt::prefix_attention_forward` / `_backward`, whose schema carries the optional biases and dropout, call
that backend's `forward(args)` / `backward(args, ...)`. Here too, once each: the fake implementations, the FLOP
formulas, the row term of backward, and the eager bypass. The math lives in one module per backend
(`prefix_attention_{torch,triton,cuda,reference}`), behind the interface written down in BACKEND_INTERFACE.md.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..attention_dropout import draw_dropout_seed
from .index_range import check_index_values
from .prefix_attention_dispatch import BACKENDS, backend_class, resolve_backend
from .prefix_attention_inputs import PREFIX_NONE, PREFIX_POOL, PrefixAttentionArgs, check_prefix_attention_args

__all__ = ["BACKENDS", "prefix_attention", "resolve_backend", "check_prefix_attention_args"]
_ARG_COUNT = 16  # the fields of PrefixAttentionArgs, the ops' leading inputs; `backend` follows them


def plain_eager() -> bool:
    """Whether the call may skip the custom-op machinery: not traced by torch.compile, and no dispatch / function
    mode or functorch transform watching (FlopCounterMode and fastprompt.bench.metrics count through the op, so
    they keep seeing it). Then an inference call runs the op's forward body directly and a differentiated one runs
    _EagerPrefixAttention (the same bodies): a decode step is a few hundred microseconds of kernel per layer, and
    the op's dispatch (autograd redispatch, alias checks, the compile guard) costs a sizeable share of that; the
    result is the same tensors (and the same index check) either way."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled() and not torch._C._are_functorch_transforms_active())


def _forward_impl(args: PrefixAttentionArgs, backend: str):
    """The forward op's body, also run directly by eager calls (plain_eager): (out, lse, kept), kept being
    what the backend keeps for its backward (the torch path's packed dropout mask; empty elsewhere)."""
    if args.prefix_mode == PREFIX_POOL:  # here, not at the front door: this body runs on real tensors under compile
        check_index_values(args.prefix_index, args.prefix_k.shape[0], "prefix_index")
    out, lse, kept = backend_class(backend).forward(args)
    if kept is None:
        kept = args.q.new_empty(0, dtype=torch.uint8)
    return _in_layout(out, _layout_strides(args.q)), lse.contiguous(), kept


@torch.library.custom_op("fastprompt::prefix_attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
                prefix_index: Optional[Tensor], prefix_mode: int, key_padding_mask: Optional[Tensor], causal: bool,
                scale: float, softcap: float, window: int, attn_bias: Optional[Tensor], prefix_bias: Optional[Tensor],
                dropout_p: float, dropout_seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    # the leading inputs are PrefixAttentionArgs' fields in order (dropout_seed an input: the op stays pure);
    # returns out, lse and what the backend keeps for backward (uint8, empty for most)
    return _forward_impl(PrefixAttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode,
                                             key_padding_mask, causal, scale, softcap, window, attn_bias,
                                             prefix_bias, dropout_p, dropout_seed), backend)


def _dense(x: Tensor) -> bool:
    """Whether x's elements tile one block of memory exactly, in some order of its dims (a permuted contiguous
    tensor, e.g. transformers' transposed q/k/v views), as opposed to a slice of something larger."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(x.stride(), x.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout_strides(x: Tensor, kernel_bhld: bool = False) -> tuple:
    """The strides an output shaped like `x` comes in.

    Outputs and gradients follow their inputs' layout (torch.empty_like's rule): inside transformers q/k/v are
    `[B, L, H, D]` memory viewed as `[B, H, L, D]`, and an output in that layout makes the caller's transpose +
    reshape free instead of a copy. `kernel_bhld`: the `[B, L, H, D]` memory order PyTorch's fused CPU backward
    writes its gradients in, taken as it is rather than copied. The fake implementations promise the same
    strides, so torch.compile sees what eager produces."""
    b, h, l, d = x.shape
    if kernel_bhld:
        return (l * h * d, d, h * d, 1)
    if _dense(x):
        return x.stride()
    return (h * l * d, l * d, d, 1)


def _in_layout(t: Tensor, strides: tuple) -> Tensor:
    """`t` with `strides` (dims of size 1 aside), copying only when the backend produced another layout."""
    if all(a == b for a, b, n in zip(t.stride(), strides, t.shape) if n > 1):
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_forward_op.register_fake
def _forward_fake(*inputs):
    args, backend = PrefixAttentionArgs(*inputs[:_ARG_COUNT]), inputs[_ARG_COUNT]
    q = args.q
    return (torch.empty_strided(q.shape, _layout_strides(q), dtype=q.dtype, device=q.device),
            q.new_empty(q.shape[:3], dtype=_lse_dtype(q)),
            q.new_empty(backend_class(backend).kept_mask_bytes(args), dtype=torch.uint8))


@torch.library.custom_op("fastprompt::prefix_attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                 prefix_v: Optional[Tensor], prefix_index: Optional[Tensor], prefix_mode: int,
                 key_padding_mask: Optional[Tensor], causal: bool, scale: float, softcap: float, window: int,
                 attn_bias: Optional[Tensor], prefix_bias: Optional[Tensor], dropout_p: float,
                 dropout_seed: Optional[Tensor], backend: str, out: Tensor, lse: Tensor, delta: Optional[Tensor],
                 kept: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # delta None: the backend forms the row term itself (forms_row_term), e.g. PyTorch's fused CPU backward
    args = PrefixAttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal,
                               scale, softcap, window, attn_bias, prefix_bias, dropout_p, dropout_seed)
    return _backward_impl(args, backend, grad_out, out, lse, delta, kept)


def _backward_impl(args: PrefixAttentionArgs, backend: str, grad_out, out, lse, delta, kept):
    """The backward op's body, also run directly by eager training calls (_EagerPrefixAttention)."""
    dq, dk, dv, dpk, dpv = backend_class(backend).backward(args, grad_out, out, lse, delta, kept)
    if dpk is None:  # custom ops return tensors only: an empty one stands for "no prefix"
        dpk, dpv = args.q.new_empty(0), args.q.new_empty(0)
    kernel_order = delta is None  # forms_row_term: gradients in the fused kernel's [B, L, H, D] memory order
    dq, dk, dv = (_in_layout(g, _layout_strides(x, kernel_order)) for g, x in ((dq, args.q), (dk, args.k),
                                                                              (dv, args.v)))
    return dq, dk, dv, dpk.contiguous(), dpv.contiguous()


@_backward_op.register_fake
def _backward_fake(grad_out, *rest):
    args = PrefixAttentionArgs(*rest[:_ARG_COUNT])
    delta = rest[_ARG_COUNT + 3]
    q, prefix_k, prefix_v = args.q, args.prefix_k, args.prefix_v
    if prefix_k is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
    dq, dk, dv = (torch.empty_strided(x.shape, _layout_strides(x, delta is None), dtype=x.dtype, device=x.device)
                  for x in (q, args.k, args.v))
    return dq, dk, dv, dpk, dpv


def row_term(grad_out: Tensor, out: Tensor, lse: Tensor, grad_lse: Optional[Tensor]) -> Tensor:
    """delta = rowsum(dO * O) - dlse: the FlashAttention backward's row term, with the lse output's gradient
    folded in (d lse / d s = softmax), so returning lse costs nothing extra in backward. With dropout O is the
    dropped output and rowsum(dO * O) is still sum_j P_ij dP_ij (BACKEND_INTERFACE.md)."""
    delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(dim=-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(lse.dtype)
    return delta


def _setup_context(ctx, inputs, output):
    args, backend = PrefixAttentionArgs(*inputs[:_ARG_COUNT]), inputs[_ARG_COUNT]
    _save(ctx, args, backend, output)


def _save(ctx, args: PrefixAttentionArgs, backend: str, output):
    tensors, params = args.saved()
    out, lse, kept = output
    ctx.save_for_backward(*tensors, out, lse, kept)
    ctx.params, ctx.backend = params, backend
    ctx.set_materialize_grads(False)  # an unused lse then arrives as None, not as zeros to be folded in


def _backward(ctx, grad_out, grad_lse, _grad_kept=None, eager=False):
    *tensors, out, lse, kept = ctx.saved_tensors
    args, backend = PrefixAttentionArgs.from_saved(tensors, ctx.params), ctx.backend
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # A backend whose fused backward forms the row term from out (PyTorch's fused CPU kernel) gets delta=None
    # rather than a row term it would compute again.
    delta = None if backend_class(backend).forms_row_term(args, grad_lse is not None) else \
        row_term(grad_out, out, lse, grad_lse)
    if eager:
        dq, dk, dv, dpk, dpv = _backward_impl(args, backend, grad_out, out, lse, delta, kept)
    else:
        dq, dk, dv, dpk, dpv = _backward_op(grad_out, *args.op_inputs(), backend, out, lse, delta, kept)
    if args.prefix_mode == PREFIX_NONE:
        dpk = dpv = None
    return (dq, dk, dv, dpk, dpv) + (None,) * (_ARG_COUNT + 1 - 5)


torch.library.register_autograd("fastprompt::prefix_attention_forward", _backward, setup_context=_setup_context)


class _EagerPrefixAttention(torch.autograd.Function):
    """The op's forward and backward bodies as a plain autograd.Function, for eager training calls
    (plain_eager): the same functions, the same saved tensors and the same backward as the custom op's
    registered autograd, without the custom-op dispatch (schema handling, autograd redispatch and alias checks cost
    ~0.15 ms per direction per layer call, a few percent of a small model's step). torch.compile, dispatch and
    function modes (FlopCounterMode, fastprompt.bench.metrics) and functorch transforms keep the custom op.
    The differentiable tensors come as arguments (autograd tracks those); `args` holds them too."""

    @staticmethod
    def forward(ctx, args, backend, q, k, v, prefix_k, prefix_v):
        output = _forward_impl(args, backend)
        _save(ctx, args, backend, output)
        ctx.mark_non_differentiable(output[2])  # what the backend keeps (the packed dropout mask)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse, _grad_kept=None):
        dq, dk, dv, dpk, dpv = _backward(ctx, grad_out, grad_lse, eager=True)[:5]
        return None, None, dq, dk, dv, dpk, dpv


def _keys_per_row(k_shape, prefix_k_shape, prefix_index_shape) -> int:
    slots = prefix_index_shape[1] if prefix_index_shape is not None else 0
    prefix_len = prefix_k_shape[2] if prefix_k_shape is not None else 0
    return k_shape[2] + slots * prefix_len


@register_flop_formula(torch.ops.fastprompt.prefix_attention_forward)
def _forward_flops(q_shape, k_shape, v_shape, prefix_k_shape=None, prefix_v_shape=None, prefix_index_shape=None,
                   *args, out_shape=None, **kwargs) -> int:
    # the two matmuls of attention over every key a row can see, counted dense (as FlopCounterMode counts SDPA)
    batch, heads, lq, dim = q_shape
    return 4 * batch * heads * lq * _keys_per_row(k_shape, prefix_k_shape, prefix_index_shape) * dim


@register_flop_formula(torch.ops.fastprompt.prefix_attention_backward)
def _backward_flops(grad_out_shape, q_shape, k_shape, v_shape, prefix_k_shape=None, prefix_v_shape=None,
                    prefix_index_shape=None, *args, out_shape=None, **kwargs) -> int:
    # recompute QK^T, then dV, dP, dQ, dK: five matmuls, 2.5x the forward
    batch, heads, lq, dim = q_shape
    return 10 * batch * heads * lq * _keys_per_row(k_shape, prefix_k_shape, prefix_index_shape) * dim


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor] = None,
                     prefix_v: Optional[Tensor] = None, *, prefix_index: Optional[Tensor] = None,
                     key_padding_mask: Optional[Tensor] = None, causal: bool = True, scale: Optional[float] = None,
                     softcap: Optional[float] = None, window: Optional[int] = None, dropout_p: float = 0.0,
                     backend: str = "auto", return_lse: bool = False, attn_bias: Optional[Tensor] = None,
                     prefix_bias: Optional[Tensor] = None):
    """Attention of `q` over the keys `[prefix; k]` and values `[prefix; v]`, read where they live.

    q `[B, Hq, Lq, D]`; k, v `[B, Hkv, Lk, D]` with `Hq % Hkv == 0`. The prefix is `[Hkv, P, D]` shared by the
    batch, `[B, Hkv, P, D]` per sample, or a pool `[N, Hkv, P, D]` read through `prefix_index` `[B]` or `[B, S]`
    (S entries laid end to end; -1 = empty slot); None for no prefix. Prefix keys are always visible;
    `key_padding_mask [B, Lk]` (True = real token), bottom-right `causal`, sliding `window` and `softcap` apply as
    in DESIGN.md §1. `dropout_p`: dropout on the attention probabilities, fused (Philox mask from a seed drawn
    from torch's generator at call time, regenerated in backward, or kept bit-packed on the torch path; pass 0 in
    eval). Returns out `[B, Hq, Lq, D]`
    (q's dtype) and, with return_lse, lse `[B, Hq, Lq]` float32 (the softmax's, before dropout).
    `attn_bias [1|B, Hq, Lq, Lk]` / `prefix_bias [1|B, Hq, Lq, S*P]`: additive score biases over the sequence /
    prefix keys (T5's relative position bias; no gradient; torch, triton and reference backends).
    """
    args = check_prefix_attention_args(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, scale,
                                       softcap, window, attn_bias, prefix_bias, dropout_p)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (args.q, args.k, args.v, args.prefix_k, args.prefix_v))
    name = resolve_backend(backend, args, needs_grad)
    if args.dropout_p > 0:
        args.dropout_seed = draw_dropout_seed(args.q.device)
    implementation = backend_class(name)
    if implementation.DIFFERENTIATED_BY_AUTOGRAD:  # the reference: slow, materializes everything
        out, lse = implementation.run(args)
    elif plain_eager():
        if needs_grad:
            out, lse, _ = _EagerPrefixAttention.apply(args, name, args.q, args.k, args.v, args.prefix_k,
                                                      args.prefix_v)
        else:
            out, lse, _ = _forward_impl(args, name)
    else:
        out, lse, _ = _forward_op(*args.op_inputs(), name)
    if return_lse:
        return out, lse.float()
    return out
