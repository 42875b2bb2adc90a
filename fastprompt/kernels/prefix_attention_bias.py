"""Additive score biases inside the prefix-attention kernels (T5's relative position bias).

`attn_bias [1|B, Hq, Lq, Lk]` over the sequence keys and `prefix_bias [1|B, Hq, Lq, S*P]` over the prefix keys
(slot s, key p at column s*P + p; empty pool slots keep their columns), any strides, any float dtype. Each is
added to the (capped) score, so with `s` the capped score, the softmax runs over `s + bias` exactly as in
fastprompt.reference. Nothing of score size is built: each kernel loads the bias tile matching its score tile,
in its own orientation, forward and backward alike (the probabilities are recomputed from lse in backward, so
the bias enters them the same way). The bias gets no gradient (the op refuses one that requires grad).

A -inf bias hides a key like a mask does; a row whose keys are all hidden gives out 0, lse -inf (as the
reference). Scores are in the log2 domain inside the kernels, so the tile comes back multiplied by log2(e).
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from .prefix_attention_common import LOG2E_C


@triton.jit
def bias_tile(BIAS, offsets, mask, HAS_BIAS: tl.constexpr):
    """The bias at element `offsets` (any broadcast shape) in fp32 times log2(e), 0 where `mask` is False.
    Without HAS_BIAS a scalar 0 that callers never add (they test HAS_BIAS themselves)."""
    if HAS_BIAS:
        return tl.load(BIAS + offsets, mask=mask, other=0.0).to(tl.float32) * LOG2E_C
    else:
        return 0.0


class BiasArgs(NamedTuple):
    """What a launcher passes for one bias: the HAS_* flag, the pointer and the (b, h, m, n) strides."""

    enabled: bool
    tensor: object
    strides: tuple


def bias_args(bias, like) -> BiasArgs:
    """Launch arguments for a `[1|B, Hq, Lq, N]` bias or None (`like` stands in for the unused pointer). A size-1
    dim gets stride 0: a batch-broadcast bias reads row 0 for every sample, whatever stride its view carries."""
    if bias is None:
        return BiasArgs(False, like, (0, 0, 0, 0))
    strides = tuple(0 if size == 1 else stride for stride, size in zip(bias.stride(), bias.shape))
    return BiasArgs(True, bias, strides)
