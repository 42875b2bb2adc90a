"""The attention-dropout mask of `prefix_attention`, as a pure function of (seed, offset, b, h, i, j).

Every backend and the reference must drop exactly the same probabilities, and backward must regenerate the
mask forward used without storing it. So the mask comes from a counter-based generator, Philox4x32-10 (Salmon et
al. 2011; the generator FlashAttention, cuRAND and Triton's `tl.randint` use), keyed by a seed drawn per call:

    element (b, h, i, j): batch row b, query head h (of Hq), query i, key j over [prefix slots; sequence]
                          (prefix slot s key p is j = s*P + p; sequence key n is j = S*P + n)
    counter = (j >> 2, i, b*Hq + h, offset), key = (seed_lo, seed_hi)
    u       = word (j & 3) of Philox4x32-10(counter, key)       (one Philox call serves 4 neighbouring keys)
    keep    = (u >> 1) >= threshold,  threshold = round(p * 2**31)  ->  P(keep) = 1 - threshold / 2**31

The kept probabilities are scaled by 1 / (1 - p). The seed is three int64 words `[seed_lo, seed_hi, offset]`
(each in [0, 2**32)) drawn from torch's default generator of the inputs' device at call time, so
`torch.manual_seed` makes a run reproducible; the seed stays a tensor on that device (no host sync, CUDA-graph and
torch.compile friendly) and is saved for backward. fastprompt/kernels/prefix_attention_dropout.py is the Triton twin of
`keep_mask`; tests check both against Random123's published Philox4x32-10 answers.

The torch implementation works in int64 (torch has no full uint32 arithmetic): a 32x32-bit product fits in 64 bits,
wrapping past 2**63 without losing a bit.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

PHILOX_ROUNDS = 10
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_MASK32 = 0xFFFFFFFF


def check_dropout_p(dropout_p) -> float:
    """dropout_p as a float in [0, 1), or a clear error."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not math.isfinite(dropout_p) \
            or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"prefix_attention: `dropout_p` must be a float in [0, 1) (the probability of dropping an "
                         f"attention probability; 0 in eval), got {dropout_p!r}")
    return float(dropout_p)


def draw_dropout_seed(device) -> Tensor:
    """`[seed_lo, seed_hi, offset]` int64 on `device`, drawn from that device's default generator."""
    return torch.randint(0, 2**32, (3,), dtype=torch.int64, device=device)


def dropout_threshold(dropout_p: float) -> int:
    """keep iff (u >> 1) >= threshold; an int32 so the Triton kernels take it as a plain integer argument."""
    return min(int(round(dropout_p * 2**31)), 2**31 - 1)


def dropout_scale(dropout_p: float) -> float:
    """What kept probabilities are multiplied by: 1 / P(keep), with P(keep) exactly as the threshold makes it."""
    return 2**31 / (2**31 - dropout_threshold(dropout_p))


def _mul_hi_lo(multiplier: int, x: Tensor):
    """(high, low) 32-bit words of multiplier * x for x in [0, 2**32), in int64.

    The product can pass 2**63: int64 multiplication wraps (two's complement on every torch device), which keeps
    all 64 bits of the true product, so both words are exact after masking (the known-answer tests check it)."""
    product = x * multiplier
    return (product >> 32) & PHILOX_MASK32, product & PHILOX_MASK32


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values (broadcastable); k0, k1 ints or 0-d int64 tensors.
    Returns the four output words, as Random123 and Triton's `philox_impl` define them."""
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & PHILOX_MASK32
        k1 = (k1 + PHILOX_KEY_B) & PHILOX_MASK32
    return c0, c1, c2, c3


def keep_mask(seed: Tensor, dropout_p: float, row: Tensor, query: Tensor, key_start: int, num_keys: int) -> Tensor:
    """Keep decisions for keys j in [key_start, key_start + num_keys) (the last dim of the result).

    row = b * Hq + h and query = i are int64 tensors broadcastable against each other, with a trailing dim of 1;
    the result has their broadcast shape with the last dim num_keys. One Philox call per group of 4 keys."""
    seed = seed.to(torch.int64)
    k0, k1, offset = seed[0], seed[1], seed[2]
    first_group, last_group = key_start >> 2, (key_start + num_keys - 1) >> 2
    groups = torch.arange(first_group, last_group + 1, dtype=torch.int64, device=seed.device)
    shape = torch.broadcast_shapes(row.shape, query.shape, groups.shape)
    c0 = groups.expand(shape)
    c1 = query.expand(shape)
    c2 = row.expand(shape)
    c3 = offset.expand(shape)
    words = torch.stack(philox4x32(c0, c1, c2, c3, k0, k1), dim=-1).flatten(-2)  # key order: 4*group + word
    start = key_start - 4 * first_group
    words = words[..., start:start + num_keys]
    return (words >> 1) >= dropout_threshold(dropout_p)


def keep_mask_elementwise(seed: Tensor, dropout_p: float, row: Tensor, query: Tensor, key: Tensor) -> Tensor:
    """The same decisions computed one element at a time (word j & 3 of the Philox call for counter j >> 2), for
    any broadcastable index tensors; the reference uses this form."""
    seed = seed.to(torch.int64)
    words = philox4x32(key >> 2, query, row, seed[2], seed[0], seed[1])
    lane = key & 3
    word = torch.where(lane == 0, words[0], torch.where(lane == 1, words[1],
                                                        torch.where(lane == 2, words[2], words[3])))
    return (word >> 1) >= dropout_threshold(dropout_p)


def row_ids(batch: int, heads: int, device) -> Tensor:
    """b * Hq + h as a `[B, Hq, 1, 1]` int64 tensor."""
    b = torch.arange(batch, dtype=torch.int64, device=device)[:, None, None, None]
    h = torch.arange(heads, dtype=torch.int64, device=device)[None, :, None, None]
    return b * heads + h
