"""The reference backend of `prefix_attention`: the float64-capable oracle (fastprompt.reference) itself.

It materializes everything (the concatenated keys, the repeated K/V, the score matrix) and is differentiated by
autograd, so it runs outside the op's custom ops (DIFFERENTIATED_BY_AUTOGRAD): the op calls `run`. It covers the
whole contract and is never `auto`'s choice.
"""
from __future__ import annotations

from .. import reference
from .index_range import checked_index
from .prefix_attention_backend import PrefixAttentionBackend
from .prefix_attention_inputs import PREFIX_POOL, PREFIX_SHARED, PrefixAttentionArgs


class ReferenceBackend(PrefixAttentionBackend):
    NAME = "reference"
    DESCRIPTION = "the reference ops"
    SUPPORTS_BIAS = True
    SUPPORTS_DROPOUT = True
    DIFFERENTIATED_BY_AUTOGRAD = True

    @classmethod
    def run(cls, args: PrefixAttentionArgs):
        """(out, lse) of the oracle on the call's arguments, with the prefix in the public layout it came in (the
        normalized entries are views of it), so gradients reach the caller's tensors the way the oracle gives
        them."""
        prefix_k, prefix_v, index = args.prefix_k, args.prefix_v, None
        if args.prefix_mode == PREFIX_SHARED:
            prefix_k, prefix_v = prefix_k[0], prefix_v[0]
        elif args.prefix_mode == PREFIX_POOL:  # a custom op, so the check also runs inside a compiled graph
            index = checked_index(args.prefix_index, prefix_k.shape[0], "prefix_index")
        return reference.prefix_attention(
            args.q, args.k, args.v, prefix_k, prefix_v, prefix_index=index, key_padding_mask=args.key_padding_mask,
            causal=args.causal, scale=args.scale, softcap=args.softcap or None,
            window=None if args.window < 0 else args.window, dropout_p=args.dropout_p,
            dropout_seed=args.dropout_seed, attn_bias=args.attn_bias, prefix_bias=args.prefix_bias, return_lse=True)


BACKEND = ReferenceBackend
