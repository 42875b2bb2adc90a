"""`prefix_attention` with an additive score bias AND attention dropout (T5 training): the torch path.

T5's relative position bias reaches the op as `attn_bias` / `prefix_bias` (fastprompt.ops.prefix_attention_bias);
in train() mode T5 also drops attention probabilities. The chunked dropout path
(prefix_attention_torch_dropout) adds the biases to the capped scores exactly where the reference does, draws the
contract's Philox mask from a seed taken from torch's generator at call time, and keeps it bit-packed for
backward, so nothing of `[B, H, Lq, P + Lk]` (scores, probabilities, a joined bias or K/V) is built. The biases
get no gradient (checked by prefix_attention_bias.check_biases, as without dropout). On CUDA tensors `auto` runs
the Triton kernels instead (prefix_attention_triton_bias), which keep the same elements for the same seed.
"""
from __future__ import annotations

import torch

from . import prefix_attention_torch_dropout as with_dropout
from .prefix_attention_inputs import PREFIX_NONE, PrefixAttentionArgs


class _BiasedDropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, args, attn_bias, prefix_bias, dropout_p, dropout_seed):
        out, lse, kept = with_dropout.forward(q, k, v, prefix_k, prefix_v, args.prefix_index, args.prefix_mode,
                                              args.key_padding_mask, args.causal, args.scale, args.softcap,
                                              args.window, dropout_p, dropout_seed, attn_bias=attn_bias,
                                              prefix_bias=prefix_bias)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse, attn_bias, prefix_bias, dropout_seed, kept)
        ctx.args, ctx.dropout_p = args, dropout_p
        return out, lse.float()

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, prefix_k, prefix_v, out, lse, attn_bias, prefix_bias, seed, kept = ctx.saved_tensors
        args = ctx.args
        delta = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(dim=-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(lse.dtype)
        dq, dk, dv, dpk, dpv = with_dropout.backward(grad_out, q, k, v, prefix_k, prefix_v, args.prefix_index,
                                                     args.prefix_mode, args.key_padding_mask, lse, delta,
                                                     args.causal, args.scale, args.softcap, args.window,
                                                     ctx.dropout_p, seed, kept, attn_bias=attn_bias,
                                                     prefix_bias=prefix_bias)
        if args.prefix_mode == PREFIX_NONE:
            dpk = dpv = None
        return dq, dk, dv, dpk, dpv, None, None, None, None, None


def biased_dropout_attention(args: PrefixAttentionArgs, attn_bias, prefix_bias, dropout_p: float,
                             dropout_seed: torch.Tensor):
    """(out `[B, Hq, Lq, D]`, lse float32, the softmax's) of the checked arguments with biases and dropout."""
    return _BiasedDropoutAttention.apply(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args, attn_bias,
                                         prefix_bias, dropout_p, dropout_seed)
