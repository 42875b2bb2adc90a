"""`fastprompt.ops.prefix_attention`: attention over `[prefix; sequence]` keys without building them.

This module is the op's front door: argument checks (prefix_attention_inputs), backend choice, and the
`torch.library` registration that makes the op opaque to `torch.compile` and differentiable. The math lives in
one module per backend (`prefix_attention_{torch,triton,cuda,reference}`), all behind the interface written down
in BACKEND_INTERFACE.md.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .. import reference
from . import prefix_attention_cpu_flash as cpu_flash
from . import prefix_attention_triton_bias as triton_bias  # registers the biased Triton custom ops
from .attention_dropout import check_dropout_p, draw_dropout_seed
from .index_range import check_index_values, checked_index
from .prefix_attention_inputs import PREFIX_NONE, PREFIX_POOL, PrefixAttentionArgs, check_prefix_attention_args

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")
_BACKEND_MODULES = {name: f"fastprompt.ops.prefix_attention_{name}" for name in ("cuda", "triton", "torch")}


def _import_backends() -> dict:
    """Each backend module, or the ImportError saying why it is unavailable, imported once here: backend_module
    is then a dict lookup, which torch.compile traces (importlib calls it cannot). The modules themselves import
    nothing heavy (triton and the CUDA extension load on first use)."""
    loaded = {}
    for name, module_name in _BACKEND_MODULES.items():
        try:
            loaded[name] = importlib.import_module(module_name)
        except ImportError as exc:  # e.g. triton not installed, or the CUDA extension not built
            loaded[name] = ImportError(f"prefix_attention backend {name!r} is not available: {exc}")
    return loaded


_LOADED_BACKENDS = _import_backends()


def backend_module(name: str):
    """The module implementing backend `name`, or raise ImportError saying why it is unavailable."""
    module = _LOADED_BACKENDS[name]
    if isinstance(module, ImportError):
        raise module
    return module


def _plain_eager() -> bool:
    """Whether the call may skip the custom-op machinery: not traced by torch.compile, and no dispatch / function
    mode or functorch transform watching (FlopCounterMode and fastprompt.bench.metrics count through the op, so
    they keep seeing it). Then an inference call runs the op's forward body directly and a differentiated one runs
    _EagerPrefixAttention (the same bodies): a decode step is a few hundred microseconds of kernel per layer, and
    the op's dispatch (autograd redispatch, alias checks, the compile guard) costs a sizeable share of that; the
    result is the same tensors (and the same index check) either way."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled() and not torch._C._are_functorch_transforms_active())


def backend_unsupported_reason(name: str, args: PrefixAttentionArgs, needs_grad: bool,
                               dropout_p: float = 0.0) -> Optional[str]:
    """None when backend `name` can run these (normalized) arguments, else a one-line reason."""
    try:
        module = backend_module(name)
    except ImportError as exc:
        return str(exc)
    return module.supports(args.q, args.k, args.v, args.prefix_k, args.prefix_index, args.prefix_mode,
                           args.key_padding_mask, args.causal, args.softcap, args.window, needs_grad,
                           dropout_p=dropout_p)


def resolve_backend(backend: str, args: PrefixAttentionArgs, needs_grad: bool, dropout_p: float = 0.0) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"prefix_attention: `backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend != "auto":
        reason = backend_unsupported_reason(backend, args, needs_grad, dropout_p)
        if reason is not None:
            raise ValueError(f"prefix_attention: backend={backend!r} cannot run this call: {reason}")
        return backend
    # On a GPU: the CUDA kernels where they cover the case, Triton otherwise, the exact torch path last.
    # On the CPU the torch path is the fast one (the Triton interpreter is for tests only).
    candidates = ("cuda", "triton") if args.q.is_cuda else ()
    for name in candidates:
        if backend_unsupported_reason(name, args, needs_grad, dropout_p) is None:
            return name
    return "torch"


def _forward_impl(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
                  window, backend, dropout_p=0.0, dropout_seed=None):
    """The forward op's body, also run directly by eager inference calls (_plain_eager)."""
    if prefix_mode == PREFIX_POOL:  # here, not at the front door: this body runs on real tensors under compile too
        check_index_values(prefix_index, prefix_k.shape[0], "prefix_index")
    result = backend_module(backend).forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode,
                                             key_padding_mask, causal, scale, softcap, window,
                                             **_dropout_kwargs(dropout_p, dropout_seed))
    # a third result: the torch backend's packed dropout keep mask, handed to its backward (empty elsewhere)
    kept = result[2] if len(result) > 2 else q.new_empty(0, dtype=torch.uint8)
    return _in_layout(result[0], _layout_strides(q)), result[1].contiguous(), kept


@torch.library.custom_op("fastprompt::prefix_attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
                prefix_index: Optional[Tensor], prefix_mode: int, key_padding_mask: Optional[Tensor], causal: bool,
                scale: float, softcap: float, window: int, backend: str, dropout_p: float = 0.0,
                dropout_seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    # dropout_seed: int64 [seed_lo, seed_hi, offset] (ops/attention_dropout.py); an input, so the op is a pure function
    # returns out, lse, and the torch backend's packed dropout keep mask (uint8; empty for other backends / no dropout)
    return _forward_impl(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale,
                         softcap, window, backend, dropout_p, dropout_seed)


def _dropout_kwargs(dropout_p: float, dropout_seed: Optional[Tensor]) -> dict:
    # passed only when on, so a backend without dropout (cuda) keeps its plain signature
    return {"dropout_p": dropout_p, "dropout_seed": dropout_seed} if dropout_p > 0 else {}


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


def _fused_cpu_backward(q: Tensor, softcap: float, backend: str, out: Optional[Tensor]) -> bool:
    """Whether backward runs PyTorch's fused CPU kernel (prefix_attention_cpu_flash), whose gradients come in
    `[B, L, H, D]` memory order."""
    return backend == "torch" and out is not None and cpu_flash.applicable(q, softcap)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@_forward_op.register_fake
def _forward_fake(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
                  window, backend, dropout_p=0.0, dropout_seed=None):
    return (torch.empty_strided(q.shape, _layout_strides(q), dtype=q.dtype, device=q.device),
            q.new_empty(q.shape[:3], dtype=_lse_dtype(q)),
            q.new_empty(_kept_mask_bytes(q, k, prefix_k, prefix_index, backend, dropout_p), dtype=torch.uint8))


def _kept_mask_bytes(q, k, prefix_k, prefix_index, backend, dropout_p):
    if backend != "torch" or dropout_p == 0:
        return 0
    from .prefix_attention_torch_dropout import kept_mask_bytes

    prefix_keys = 0 if prefix_k is None else prefix_index.shape[1] * prefix_k.shape[2]
    return kept_mask_bytes(q.shape[0], q.shape[1], q.shape[2], k.shape[2], prefix_keys)


@torch.library.custom_op("fastprompt::prefix_attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
                 prefix_v: Optional[Tensor], prefix_index: Optional[Tensor], prefix_mode: int,
                 key_padding_mask: Optional[Tensor], lse: Tensor, delta: Tensor, causal: bool, scale: float,
                 softcap: float, window: int, backend: str, out: Optional[Tensor], dropout_p: float = 0.0,
                 dropout_seed: Optional[Tensor] = None,
                 dropout_keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # `out` is passed only when the lse output carries no gradient: then the torch backend may hand the whole
    # backward to PyTorch's fused CPU kernel, which recomputes the row term from out (prefix_attention_cpu_flash).
    return _backward_impl(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse,
                          delta, causal, scale, softcap, window, backend, out, dropout_p, dropout_seed, dropout_keep)


def _backward_impl(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta,
                   causal, scale, softcap, window, backend, out, dropout_p=0.0, dropout_seed=None, dropout_keep=None):
    """The backward op's body, also run directly by eager training calls (_EagerPrefixAttention)."""
    extra = {"out": out} if backend == "torch" and out is not None else {}
    extra.update(_dropout_kwargs(dropout_p, dropout_seed))
    if dropout_keep is not None and dropout_keep.numel() > 0:  # the mask the torch backend's forward kept
        extra["dropout_keep"] = dropout_keep
    dq, dk, dv, dpk, dpv = backend_module(backend).backward(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta, causal,
        scale, softcap, window, **extra)
    if dpk is None:  # custom ops return tensors only: an empty one stands for "no prefix"
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    fused = _fused_cpu_backward(q, softcap, backend, out)
    dq, dk, dv = (_in_layout(g, _layout_strides(x, fused)) for g, x in ((dq, q), (dk, k), (dv, v)))
    return dq, dk, dv, dpk.contiguous(), dpv.contiguous()


@_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta,
                   causal, scale, softcap, window, backend, out, dropout_p=0.0, dropout_seed=None, dropout_keep=None):
    if prefix_k is None:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    else:
        dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
    fused = _fused_cpu_backward(q, softcap, backend, out)
    dq, dk, dv = (torch.empty_strided(x.shape, _layout_strides(x, fused), dtype=x.dtype, device=x.device)
                  for x in (q, k, v))
    return dq, dk, dv, dpk, dpv


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap, window, \
        backend = inputs[:13]
    dropout_p, dropout_seed = inputs[13:] if len(inputs) > 13 else (0.0, None)
    out, lse, kept = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, dropout_seed, kept)
    ctx.params = (prefix_mode, causal, scale, softcap, window, backend, dropout_p)
    ctx.set_materialize_grads(False)  # an unused lse then arrives as None, not as zeros to be folded in


def _backward(ctx, grad_out, grad_lse, _grad_kept=None, run_backward=None):
    q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, dropout_seed, kept = ctx.saved_tensors
    prefix_mode, causal, scale, softcap, window, backend, dropout_p = ctx.params
    # delta = rowsum(dO * O) - dlse: the FlashAttention backward's row term, with the lse output's gradient
    # folded in (d lse / d s = softmax), so returning lse costs nothing extra in backward.
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # The fused CPU backward takes `out` instead of a row term, and only when lse carries no gradient and there is
    # no dropout (its mask is the op's own, regenerated from dropout_seed; delta = rowsum(dO * O) still holds).
    out_for_backend = out if grad_lse is None and dropout_p == 0 else None
    if _fused_cpu_backward(q, softcap, backend, out_for_backend):
        delta = lse.new_empty(0)  # PyTorch's fused CPU backward forms the row term itself: don't build it twice
    else:
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(dim=-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(lse.dtype)
    dq, dk, dv, dpk, dpv = (run_backward or _backward_op)(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta, causal,
        scale, softcap, window, backend, out_for_backend, dropout_p, dropout_seed, kept)
    if prefix_mode == PREFIX_NONE:
        dpk = dpv = None
    return dq, dk, dv, dpk, dpv, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastprompt::prefix_attention_forward", _backward, setup_context=_setup_context)


class _EagerPrefixAttention(torch.autograd.Function):
    """The op's forward and backward bodies as a plain autograd.Function, for eager training calls
    (_plain_eager): the same functions, the same saved tensors and the same backward as the custom op's
    registered autograd, without the custom-op dispatch (schema handling, autograd redispatch and alias checks cost
    ~0.15 ms per direction per layer call, a few percent of a small model's step). torch.compile, dispatch and
    function modes (FlopCounterMode, fastprompt.bench.metrics) and functorch transforms keep the custom op."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2])  # the packed dropout mask
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse, _grad_kept=None):
        return _backward(ctx, grad_out, grad_lse, run_backward=_backward_impl)


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
    prefix keys (T5's relative position bias; no gradient; torch, triton and reference backends, see
    prefix_attention_bias and prefix_attention_triton_bias).
    """
    args = check_prefix_attention_args(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, causal, scale,
                                       softcap, window)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (args.q, args.k, args.v, args.prefix_k, args.prefix_v))
    if not isinstance(backend, str):
        raise TypeError(f"prefix_attention: `backend` must be a string from {BACKENDS}, got {type(backend).__name__}")
    dropout_p = check_dropout_p(dropout_p)
    if attn_bias is not None or prefix_bias is not None:
        return _biased(args, backend, attn_bias, prefix_bias, return_lse, needs_grad, dropout_p)
    dropout_seed = draw_dropout_seed(args.q.device) if dropout_p > 0 else None
    name = resolve_backend(backend, args, needs_grad, dropout_p)
    if name == "reference":  # the oracle itself, differentiated by autograd: slow, materializes everything
        if args.prefix_mode == PREFIX_POOL:  # a custom op, so the check also runs inside a compiled graph
            prefix_index = checked_index(prefix_index, args.prefix_k.shape[0], "prefix_index")
        out, lse = reference.prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=prefix_index,
                                              key_padding_mask=args.key_padding_mask, causal=args.causal,
                                              scale=args.scale, softcap=args.softcap or None,
                                              window=None if args.window < 0 else args.window,
                                              dropout_p=dropout_p, dropout_seed=dropout_seed, return_lse=True)
        return (out, lse.float()) if return_lse else out
    if _plain_eager():
        run = _EagerPrefixAttention.apply if needs_grad else _forward_impl
        out, lse, _ = run(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index,
                          args.prefix_mode, args.key_padding_mask, args.causal, args.scale, args.softcap,
                          args.window, name, dropout_p, dropout_seed)
    else:
        out, lse, _ = _forward_op(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index,
                                  args.prefix_mode, args.key_padding_mask, args.causal, args.scale, args.softcap,
                                  args.window, name, dropout_p, dropout_seed)
    if return_lse:
        return out, lse.float()
    return out


def _biased(args, backend, attn_bias, prefix_bias, return_lse, needs_grad, dropout_p=0.0):
    """prefix_attention with additive score biases: the Triton kernels, the torch path (prefix_attention_bias;
    with dropout prefix_attention_bias_dropout) or the reference; prefix_attention_triton_bias picks one."""
    from . import prefix_attention_bias as biased

    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"prefix_attention: `backend` must be one of {BACKENDS}, got {backend!r}")
    attn_bias, prefix_bias = biased.check_biases(args, attn_bias, prefix_bias)
    backend = triton_bias.resolve_biased_backend(backend, args, attn_bias, prefix_bias, needs_grad, dropout_p)
    if args.prefix_mode == PREFIX_POOL:  # no op body runs this check here: route the index through the checking op
        args.prefix_index = checked_index(args.prefix_index, args.prefix_k.shape[0], "prefix_index")
    dropout_seed = draw_dropout_seed(args.q.device) if dropout_p > 0 else None
    if backend == "triton":  # biases and dropout together in the same kernels (prefix_attention_triton_bias)
        out, lse = triton_bias.biased_prefix_attention(args, attn_bias, prefix_bias, needs_grad, dropout_p,
                                                       dropout_seed)
    elif backend == "reference":
        out, lse = reference.prefix_attention(
            args.q, args.k, args.v, args.prefix_k, args.prefix_v, prefix_index=args.prefix_index,
            key_padding_mask=args.key_padding_mask, causal=args.causal, scale=args.scale,
            softcap=args.softcap or None, window=None if args.window < 0 else args.window, return_lse=True,
            attn_bias=attn_bias, prefix_bias=prefix_bias, dropout_p=dropout_p, dropout_seed=dropout_seed)
    elif dropout_p > 0:  # T5 training: the chunked dropout path takes the biases (prefix_attention_bias_dropout)
        from .prefix_attention_bias_dropout import biased_dropout_attention

        out, lse = biased_dropout_attention(args, attn_bias, prefix_bias, dropout_p, dropout_seed)
    else:
        out, lse = biased.biased_prefix_attention(args, attn_bias, prefix_bias)
    return (out, lse.float()) if return_lse else out
