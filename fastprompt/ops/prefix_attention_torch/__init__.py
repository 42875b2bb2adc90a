"""The torch backend of `prefix_attention`: exact PyTorch, the whole contract, on any device (the CPU's path).

One package, one module per way of computing the call:

    explicit.py          the explicit composition (prefix and sequence score blocks joined by one softmax), the path
                         off the CPU, under softcap and with biases in low precision
    cpu_flash.py         PyTorch's fused CPU flash kernel in two lse-merged parts (the CPU's fast path)
    cpu_flash_bias.py    the same with attn_bias / prefix_bias as the kernel's additive masks
    dropout.py           the chunked path with attention dropout (biases included), its mask kept bit-packed
    dropout_mask_fill.py the contract's Philox keep mask, written and packed by blocks
    decode.py            the lean decode step over a shared prefix (fastprompt.ops.shared_prefix_decode)
"""
from __future__ import annotations

import torch

from ..prefix_attention_backend import PrefixAttentionBackend
from ..prefix_attention_inputs import PrefixAttentionArgs
from . import cpu_flash
from . import cpu_flash_bias
from . import dropout as with_dropout
from .explicit import accumulator_dtype, explicit_backward, explicit_forward


class TorchBackend(PrefixAttentionBackend):
    """The exact PyTorch backend: the whole contract, on any device. Which path runs:

    - dropout_p > 0: the chunked dropout path (dropout.py), biases included;
    - on the CPU without softcap: PyTorch's fused flash kernel in two lse-merged parts (cpu_flash.py; with biases
      cpu_flash_bias.py, float32 / float64 only, where the bias becomes the kernel's additive
      mask); its backward takes over the whole call when the lse output carries no gradient (forms_row_term);
    - everywhere else the explicit composition (explicit.py; biases added in the accumulator precision)."""

    NAME = "torch"
    DESCRIPTION = "the torch ops"
    SUPPORTS_BIAS = True
    SUPPORTS_DROPOUT = True

    @classmethod
    def kept_mask_bytes(cls, args: PrefixAttentionArgs) -> int:
        if args.dropout_p == 0:
            return 0
        prefix_keys = 0 if args.prefix_k is None else args.prefix_index.shape[1] * args.prefix_k.shape[2]
        q = args.q
        return with_dropout.kept_mask_bytes(q.shape[0], q.shape[1], q.shape[2], args.k.shape[2], prefix_keys)

    @classmethod
    def _fused_cpu(cls, args: PrefixAttentionArgs) -> bool:
        """Whether PyTorch's fused CPU kernel runs forward (without dropout: the kernel's mask would be its own, not
        the contract's); else the explicit composition."""
        if args.biased:
            return cpu_flash_bias.applicable(args.q, args.softcap)
        return cpu_flash.applicable(args.q, args.softcap)

    @classmethod
    def forms_row_term(cls, args: PrefixAttentionArgs, lse_has_grad: bool) -> bool:
        return not lse_has_grad and args.dropout_p == 0 and cls._fused_cpu(args)

    @classmethod
    def forward(cls, args: PrefixAttentionArgs):
        a = args
        if a.dropout_p > 0:  # its own chunked path, which also returns the packed keep mask
            return with_dropout.forward(a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_index, a.prefix_mode,
                                        a.key_padding_mask, a.causal, a.scale, a.softcap, a.window, a.dropout_p,
                                        a.dropout_seed, attn_bias=a.attn_bias, prefix_bias=a.prefix_bias)
        if cls._fused_cpu(a):
            if a.biased:  # the biases as the fused kernel's additive masks
                out, lse = cpu_flash_bias.forward(a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_index, a.prefix_mode,
                                            a.key_padding_mask, a.causal, a.scale, a.window, attn_bias=a.attn_bias,
                                            prefix_bias=a.prefix_bias)
            else:
                out, lse = cpu_flash.forward(a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_index, a.prefix_mode,
                                             a.key_padding_mask, a.causal, a.scale, a.window)
            return out, lse, None
        attn_bias, prefix_bias = _biases_in(a, accumulator_dtype(a.q.dtype))
        out, lse = explicit_forward(a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_index, a.prefix_mode,
                                    a.key_padding_mask, a.causal, a.scale, a.softcap, a.window, attn_bias=attn_bias,
                                    prefix_bias=prefix_bias)
        return out, lse, None

    @classmethod
    def backward(cls, args: PrefixAttentionArgs, grad_out, out, lse, delta, kept):
        a = args
        if a.dropout_p > 0:
            return with_dropout.backward(grad_out, a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_index,
                                         a.prefix_mode, a.key_padding_mask, lse, delta, a.causal, a.scale, a.softcap,
                                         a.window, a.dropout_p, a.dropout_seed, kept, attn_bias=a.attn_bias,
                                         prefix_bias=a.prefix_bias)
        if delta is None:  # forms_row_term: the fused kernel's backward, which forms the row term from out
            if a.biased:
                return cpu_flash_bias.backward(grad_out, a.q, a.k, a.v, out, lse, a.prefix_k, a.prefix_v, a.prefix_index,
                                         a.prefix_mode, a.key_padding_mask, a.causal, a.scale, a.window,
                                         attn_bias=a.attn_bias, prefix_bias=a.prefix_bias)
            return cpu_flash.backward(grad_out, a.q, a.k, a.v, out, a.prefix_k, a.prefix_v, a.prefix_index,
                                      a.prefix_mode, a.key_padding_mask, lse, a.causal, a.scale, a.window)
        attn_bias, prefix_bias = _biases_in(a, accumulator_dtype(a.q.dtype))
        return explicit_backward(grad_out, a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_index, a.prefix_mode,
                                 a.key_padding_mask, lse, delta, a.causal, a.scale, a.softcap, a.window,
                                 attn_bias=attn_bias, prefix_bias=prefix_bias)


def _biases_in(args: PrefixAttentionArgs, dtype: torch.dtype):
    """(attn_bias, prefix_bias) in `dtype` (None stays None): the explicit path adds them in its precision."""
    return tuple(None if b is None else b.to(dtype) for b in (args.attn_bias, args.prefix_bias))


BACKEND = TorchBackend
