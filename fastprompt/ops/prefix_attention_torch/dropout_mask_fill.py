"""The attention-dropout mask of fastprompt.attention_dropout, written in place: the torch path's fast generator.

Same decisions, bit for bit, as `attention_dropout.keep_mask` / `keep_mask_elementwise` and the Triton kernels
(Philox4x32-10, counter (j >> 2, i, b*Hq + h, offset), key (seed_lo, seed_hi), word j & 3): only the way the
integer arithmetic is laid out differs, so that the mask of a `[rows, queries, keys]` block costs about as much
as `torch.bernoulli_` over it, and allocates almost nothing:

- Philox runs on blocks of BLOCK_WORDS counters in six 64-bit buffers reused across blocks, with in-place /
  `out=` ops only. On the CPU the ops are numpy's (uint64, on the tensors' own memory): its elementwise integer
  ops cost a fraction of torch's per call and run faster, which together make Philox about 1.4x quicker here;
  elsewhere they are torch's (int64, where multiplication wraps and keeps all 64 bits of a 32x32-bit product).
- The first two rounds run on the small broadcast pieces: a counter word that only varies along rows, queries or
  key groups stays that small until the rounds mix them (round 1 touches no full-size array, round 2 two).
- A round is ten full-size ops: the two 32x32 -> 64-bit products, their high words by a shift, the XORs, one
  mask per new word. The low words stay unmasked until they are read (only their low 32 bits ever matter, and
  XOR and the final compare read only those).
- The result is the keep mask as bool (`u >= 2 * threshold`, the same as `(u >> 1) >= threshold`).

`pack_bits` / `unpack_bits` keep such a mask between forward and backward at one bit per decision (8 decisions per
int64 word folded into a byte by one multiplication, and spread back by SWAR byte arithmetic): far cheaper than
running Philox again in backward, at 1/32 of the memory of the float scores.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch import Tensor

from ...attention_dropout import PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_MASK32, PHILOX_ROUND_A, PHILOX_ROUND_B, PHILOX_ROUNDS, dropout_threshold

BLOCK_WORDS = 1 << 16  # Philox counters per block: big enough that the per-op overhead is small, small enough
# that the six 64-bit work buffers (3 MiB) stay in cache


class _TorchOps:
    """Philox's integer ops on int64 tensors (any device); the high word by an arithmetic shift, masked later."""

    @staticmethod
    def empty(n, device):
        return torch.empty(n, dtype=torch.int64, device=device)

    @staticmethod
    def array(t: Tensor):
        return t

    @staticmethod
    def const(c: int):
        return c

    @staticmethod
    def mul(a, c, out):
        return torch.mul(a, c, out=out)

    @staticmethod
    def high(a, out):
        return torch.bitwise_right_shift(a, 32, out=out)

    @staticmethod
    def xor_(a, b):
        return a.bitwise_xor_(b)

    @staticmethod
    def xor(a, b, out):
        return torch.bitwise_xor(a, b, out=out)

    clean_high = False  # an arithmetic shift: the high word of a product past 2**63 comes sign-extended

    @staticmethod
    def and_(a, c):
        return a.bitwise_and_(c)

    @staticmethod
    def ge(a, c, out):
        return torch.ge(a, c, out=out)

    @staticmethod
    def flags(t: Tensor):
        return t


class _NumpyOps:
    """The same ops through numpy on the CPU tensors' memory (uint64, so the shift is logical); constants as
    np.uint64 so that no promotion rule ever turns an operand into a float."""

    @staticmethod
    def empty(n, device):
        return np.empty(n, dtype=np.uint64)

    @staticmethod
    def array(t: Tensor):
        return t.numpy().view(np.uint64)  # int64 values in [0, 2**32): the same bits

    @staticmethod
    def const(c: int):
        return np.uint64(c)

    @staticmethod
    def mul(a, c, out):
        return np.multiply(a, c, out=out)

    _32 = np.uint64(32)

    @staticmethod
    def high(a, out):
        return np.right_shift(a, _NumpyOps._32, out=out)

    @staticmethod
    def xor_(a, b):
        return np.bitwise_xor(a, b, out=a)

    @staticmethod
    def xor(a, b, out):
        return np.bitwise_xor(a, b, out=out)

    clean_high = True  # a logical shift: the high word comes with zeros above it

    @staticmethod
    def and_(a, c):
        return np.bitwise_and(a, c, out=a)

    @staticmethod
    def ge(a, c, out):
        return np.greater_equal(a, c, out=out)

    @staticmethod
    def flags(t: Tensor):
        return t.numpy()


class KeepMaskFiller:
    """Fills `[rows, queries, keys]` bool blocks with the keep decisions of one seed and dropout_p.

    One per op call: it holds the seed as Python ints (read once) and the work buffers, reused by every block it
    fills."""

    def __init__(self, seed: Tensor, dropout_p: float):
        self.k0, self.k1, self.offset = (int(w) for w in seed.tolist())
        self.twice_threshold = 2 * dropout_threshold(dropout_p)  # (u >> 1) >= t  <=>  u >= 2t
        self.device = seed.device
        self.ops = _NumpyOps if seed.device.type == "cpu" else _TorchOps
        self._buffers = None

    def _work(self, words: int):
        if self._buffers is None or self._buffers[0].shape[0] < words:
            self._buffers = [self.ops.empty(words, self.device) for _ in range(6)]
        return self._buffers

    def fill(self, out: Tensor, rows: Tensor, queries: Tensor, key_start: int) -> Tensor:
        """out `[R, m, n]` bool, contiguous: out[r, i, t] = keep decision of (row rows[r], query queries[i],
        key key_start + t). rows, queries: int64 `[R]`, `[m]` with values in [0, 2**32)."""
        num_rows, num_queries, num_keys = out.shape
        lines = num_rows * num_queries
        if lines == 0 or num_keys == 0:
            return out
        ops = self.ops
        first, last = key_start >> 2, (key_start + num_keys - 1) >> 2
        groups = last - first + 1
        direct = key_start % 4 == 0 and num_keys % 4 == 0  # the key groups tile out's rows: written in place
        flat = out.view(lines, num_keys)
        block = max(1, BLOCK_WORDS // groups)
        buffers = self._work(min(block, lines) * groups)
        scratch = None if direct else torch.empty(min(block, lines), 4 * groups, dtype=torch.bool, device=out.device)
        lead = key_start - 4 * first
        rounds = _GroupRounds(self, torch.arange(first, last + 1, dtype=torch.int64, device=out.device)[None, :])
        lined = _LineRounds(self, rows, queries, rounds)
        twice = ops.const(self.twice_threshold)
        for start in range(0, lines, block):
            stop = min(lines, start + block)
            n = stop - start
            words = self._philox_block(lined, start, stop, rounds, buffers)
            target = ops.flags(flat[start:stop].view(n, groups, 4) if direct else scratch[:n].view(n, groups, 4))
            for lane, word in enumerate(words):
                ops.ge(word, twice, target[:, :, lane])
            if not direct:
                flat[start:stop].copy_(scratch[:n, lead:lead + num_keys])
        return out

    def _philox_block(self, lined: "_LineRounds", start: int, stop: int, rounds: "_GroupRounds", buffers):
        """The four output words (each with its low 32 bits right) for counters (group, query, row, offset) of
        lines [start, stop) times the key groups."""
        ops, m = self.ops, PHILOX_MASK32
        mask = ops.const(m)
        n, groups = stop - start, rounds.groups
        x0, x1, x2, x3, prod_a, prod_b = (b[:n * groups].reshape(n, groups) for b in buffers)
        # round 2: the per-group and per-line pieces of round 1 meet in two full-size words
        ops.xor(lined.c1[start:stop], rounds.c0_2, x0)  # c0 = hi(c2 * B) ^ c1 ^ k0
        ops.xor(lined.c2_2[start:stop], rounds.c3_1, x2)  # c2 = hi(c0 * A) ^ c3 ^ k1
        # round 3: c1 and c3 are still small pieces, and clean: so is the result where the high words are
        ops.mul(x2, ops.const(PHILOX_ROUND_B), prod_b)
        ops.mul(x0, ops.const(PHILOX_ROUND_A), prod_a)
        ops.xor_(ops.high(prod_b, x0), rounds.c1_3_key)
        ops.xor_(ops.high(prod_a, x2), lined.c3_3_key[start:stop])
        if not ops.clean_high:
            ops.and_(x0, mask)
            ops.and_(x2, mask)
        c0, c1, c2, c3 = x0, prod_b, x2, prod_a
        free_a, free_b = x1, x3
        for r in range(3, PHILOX_ROUNDS):  # rounds 4..10, all full size
            k0, k1 = rounds.key(r)
            ops.mul(c2, ops.const(PHILOX_ROUND_B), free_b)
            ops.mul(c0, ops.const(PHILOX_ROUND_A), free_a)
            # the new c0 goes where c2 was, the new c2 where c0 was; the products are the new (unmasked) c1, c3
            ops.and_(ops.xor_(ops.xor_(ops.high(free_b, c2), c1), ops.const(k0)), mask)
            ops.and_(ops.xor_(ops.xor_(ops.high(free_a, c0), c3), ops.const(k1)), mask)
            c0, c1, c2, c3, free_a, free_b = c2, free_b, c0, free_a, c3, c1
        return c0, ops.and_(c1, mask), c2, ops.and_(c3, mask)


class _GroupRounds:
    """The pieces of rounds 1 to 3 that depend on the key group alone (c0 = group, c3 = offset), and the round
    keys."""

    def __init__(self, filler: KeepMaskFiller, group: Tensor):
        m, ops = PHILOX_MASK32, filler.ops
        self.groups = group.shape[1]
        self._keys = [(filler.k0, filler.k1)]
        for _ in range(PHILOX_ROUNDS - 1):
            k0, k1 = self._keys[-1]
            self._keys.append(((k0 + PHILOX_KEY_A) & m, (k1 + PHILOX_KEY_B) & m))
        group_a = group * PHILOX_ROUND_A
        c2_1 = ((group_a >> 32) & m) ^ filler.offset ^ filler.k1  # round 1: c2 = hi(c0 * A) ^ c3 ^ k1
        self.c3_1 = ops.array(group_a & m)  # round 1: c3 = lo(c0 * A)
        group_b = c2_1 * PHILOX_ROUND_B  # round 2's product of c2
        self.c0_2 = ops.array(((group_b >> 32) & m) ^ self.key(1)[0])  # round 2: c0 = this ^ c1 (per line)
        self.c1_3_key = ops.array((group_b & m) ^ self.key(2)[0])  # round 2's c1 = lo(c2 * B), with round 3's k0

    def key(self, r: int):
        """(k0, k1) of round r + 1 (round 1 uses the seed itself)."""
        return self._keys[r]


class _LineRounds:
    """The pieces of rounds 1 to 3 that depend on the line (row, query) alone, for every line of a fill at once:
    `[lines, 1]` arrays sliced per block."""

    def __init__(self, filler: KeepMaskFiller, rows: Tensor, queries: Tensor, rounds: _GroupRounds):
        m, ops = PHILOX_MASK32, filler.ops
        line = torch.arange(rows.shape[0] * queries.shape[0], dtype=torch.int64, device=rows.device)[:, None]
        row, query = rows[line // queries.shape[0]], queries[line % queries.shape[0]]
        line_b = row * PHILOX_ROUND_B  # round 1, c2 = row, c1 = query
        c0_1 = ((line_b >> 32) & m) ^ query ^ filler.k0
        self.c1 = ops.array(line_b & m)  # round 1's c1
        line_a = c0_1 * PHILOX_ROUND_A  # round 2's product of c0
        self.c2_2 = ops.array(((line_a >> 32) & m) ^ rounds.key(1)[1])  # round 2: c2 = this ^ c3 (per group)
        self.c3_3_key = ops.array((line_a & m) ^ rounds.key(2)[1])  # round 2's c3 = lo(c0 * A), with round 3's k1


# pack_bits / unpack_bits: 8 bools (bytes 0 / 1) of an int64 word <-> one byte, bit k = bool k (little-endian)
_GATHER = sum(1 << (56 - 7 * k) for k in range(8))  # byte k's bit 0 lands on bit 56 + k, nothing else reaches byte 7
_SPREAD = 0x0101010101010101  # a byte copied into all eight bytes
_SELECT = 0x8040201008040201 - (1 << 64)  # byte k keeps bit k (as a signed int64 constant)
_LOW7 = 0x7F7F7F7F7F7F7F7F  # + 0x7F per byte: a nonzero byte (at most 0x80) sets its top bit, and carries nowhere
_TOP = 0x8080808080808080 - (1 << 64)
_ONES = 0x0101010101010101


def packed_size(count: int) -> int:
    """Bytes that `count` packed decisions take (a multiple of 8, so every block is whole int64 words)."""
    return (count + 63) // 64 * 8


def pack_bits(keep: Tensor, out: Tensor) -> Tensor:
    """keep: bool, contiguous, numel a multiple of 64 (padding False), 8-byte aligned; out: uint8 `[numel / 8]`."""
    if sys.byteorder != "little":  # the byte <-> bool order below assumes little-endian words
        return out.copy_(_pack_any_order(keep))
    words = keep.view(torch.int64)
    gathered = torch.mul(words, _GATHER).bitwise_right_shift_(56)  # top byte: bit k = bool k
    return out.copy_(gathered)  # int64 -> uint8 keeps the low byte


def unpack_bits(packed: Tensor, out: Tensor) -> Tensor:
    """packed: uint8 `[n]`; out: uint8 `[8 n]`, 8-byte aligned, filled with 0 / 1 (bool k of byte j at 8 j + k)."""
    if sys.byteorder != "little":
        return out.copy_(_unpack_any_order(packed))
    words = out.view(torch.int64)
    words.copy_(packed)  # uint8 -> int64: the byte in the low byte, zeros above
    words.mul_(_SPREAD).bitwise_and_(_SELECT).add_(_LOW7).bitwise_and_(_TOP)  # byte k: 0x80 iff bit k was set
    return out.view(torch.int64).bitwise_right_shift_(7).bitwise_and_(_ONES).view(torch.uint8)


def _pack_any_order(keep: Tensor) -> Tensor:
    bits = keep.view(-1, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32, device=keep.device)
    return bits.sum(dim=1).to(torch.uint8)


def _unpack_any_order(packed: Tensor) -> Tensor:
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    return ((packed.to(torch.int32)[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
