"""Attention dropout inside the prefix-attention kernels: the keep mask regenerated per tile, never stored.

The Triton twin of fastprompt/attention_dropout.py (which defines the mask and documents why): element
(b, h, i, j) is kept iff word (j & 3) of Philox4x32-10 at counter (j >> 2, i, b*Hq + h, offset) under key
(seed_lo, seed_hi), shifted right by one, is >= threshold. Forward and the three backward kernels call
`dropout_keep` on their own tiles, in whatever orientation, and get the same bits for the same element.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastprompt.attention_dropout import dropout_scale, dropout_threshold

PHILOX_ROUNDS = tl.constexpr(10)


@triton.jit
def load_dropout_seed(SEED, HAS_DROPOUT: tl.constexpr):
    """(seed_lo, seed_hi, offset) as uint32 scalars from the int64 seed tensor; zeros (unused) without dropout."""
    if HAS_DROPOUT:
        seed_lo = tl.load(SEED).to(tl.uint32)
        seed_hi = tl.load(SEED + 1).to(tl.uint32)
        offset = tl.load(SEED + 2).to(tl.uint32)
    else:
        seed_lo = tl.zeros([], dtype=tl.uint32)
        seed_hi = tl.zeros([], dtype=tl.uint32)
        offset = tl.zeros([], dtype=tl.uint32)
    return seed_lo, seed_hi, offset


@triton.jit
def dropout_keep(seed_lo, seed_hi, offset, row, query, key, threshold):
    """Keep decisions for the broadcast of `row` (b * Hq + h), `query` (i) and `key` (j over [prefix; sequence])."""
    zero = (row * 0 + query * 0 + key * 0).to(tl.int64)  # every counter word at the full tile shape
    c0 = (zero + (key >> 2)).to(tl.uint32)
    c1 = (zero + query).to(tl.uint32)
    c2 = (zero + row).to(tl.uint32)
    c3 = zero.to(tl.uint32) + offset
    w0, w1, w2, w3 = tl.philox_impl(c0, c1, c2, c3, seed_lo, seed_hi, PHILOX_ROUNDS)
    lane = (zero + key) & 3
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return (word >> 1).to(tl.int32) >= threshold


class DropoutArgs(NamedTuple):
    """What a launcher passes for dropout: the HAS_DROPOUT flag, the seed pointer, threshold and 1 / (1 - p)."""

    enabled: bool
    seed: object
    threshold: int
    scale: float


def dropout_args(dropout_p: float, dropout_seed, like) -> DropoutArgs:
    """Launch arguments for dropout_p (0: dropout compiled out; `like` stands in for the unused seed pointer)."""
    if not dropout_p > 0.0:
        return DropoutArgs(False, like, 0, 1.0)
    if dropout_seed is None or dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 3:
        raise ValueError("prefix_attention: dropout needs the int64 [seed_lo, seed_hi, offset] seed tensor")
    return DropoutArgs(True, dropout_seed.to(like.device).contiguous(), dropout_threshold(dropout_p),
                       dropout_scale(dropout_p))
