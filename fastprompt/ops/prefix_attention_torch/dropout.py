"""Exact PyTorch prefix attention with attention dropout: the torch backend's path when dropout_p > 0.

PyTorch's fused CPU kernel draws its own dropout mask (and cannot regenerate it), so with dropout the torch backend
runs the explicit composition of prefix_attention_torch, chunked over queries: each chunk of at most
CHUNK_SCORES scores computes its sequence block `[B, Hkv, G, m, Lk]` and prefix block `[B, Hkv, G, m, (S,) P]`
(never joined, never a `[B, H, Lq, P + Lk]` matrix, never a concatenated or B-fold K/V) and backward recomputes
them from the saved log-sum-exp. With Z the keep mask and r = 1 / (1 - p):

    forward:  out = r (Z * P) V,  lse as without dropout (the softmax's own)
    backward: dV = r (Z * P)^T dO,  dS = P * (r Z * (dO V^T) - delta),  delta = rowsum(dO * O) - dlse

The mask: forward draws it from the seed (dropout_mask_fill.py: the Philox mask of
fastprompt.attention_dropout, the same bits as the Triton kernels and the reference) and returns it packed, one bit per
decision (`kept_mask_bytes`, 1/32 of the float scores); backward unpacks it instead of running Philox again (on the
CPU, Philox in torch ops costs more than the rest of the attention). Without the packed mask backward regenerates
it from the seed, with the same result.

Every score-sized block lives in a few buffers allocated once per call and reused by every chunk, and is worked on
in place (matmuls write into them with `out=`, scale and r ride on the matmuls' alpha, masks and biases are added
or multiplied in, never `masked_fill`, which is several times slower on the CPU).

Layouts: the sequence blocks are batched over (b, kv head) rows, `[B*Hkv, G*m, Lk]`. A shared prefix `[Hkv, P, D]`
is batched over kv heads with the batch's queries as rows, `[Hkv, B*G*m, P]` (one matmul per chunk, no copy of the
prefix per row); a per-sample or pool prefix per (b, kv head) row, `[B*Hkv, G*m, S*P]` (a pool's selected
entries laid end to end: the selection itself).
"""
from __future__ import annotations

import math

import torch

from ...attention_dropout import dropout_scale
from .dropout_mask_fill import KeepMaskFiller, pack_bits, packed_size, unpack_bits
from ..prefix_attention_inputs import PREFIX_NONE, PREFIX_POOL, PREFIX_SHARED
from .cpu_flash import hidden_positions
from .explicit import accumulator_dtype, prefix_grads_per_entry

NEG_INF = float("-inf")
LOG2E, LN2 = 1.0 / math.log(2.0), math.log(2.0)  # scores are kept in log2 units: exp2 is twice as fast as exp here
CHUNK_SCORES = 1 << 21  # scores (all heads and batch rows) per query chunk: bounds the score-sized buffers


def _queries_per_chunk(batch, hq, lk, prefix_keys):
    return max(1, CHUNK_SCORES // max(1, batch * hq * (lk + prefix_keys)))


def _chunk_bytes(batch, hq, m, lk, prefix_keys):
    """Packed-mask bytes of a chunk of m queries: decisions (b, h, i, j) in that order, keys j = [prefix; seq]."""
    return packed_size(batch * hq * m * (prefix_keys + lk))


def kept_mask_bytes(batch, hq, lq, lk, prefix_keys) -> int:
    """Size of the packed keep mask forward returns (chunk after chunk); also what the fake implementation
    promises. Works on symbolic sizes."""
    m = _queries_per_chunk(batch, hq, lk, prefix_keys)
    full, rest = lq // m, lq % m
    return full * _chunk_bytes(batch, hq, m, lk, prefix_keys) + _chunk_bytes(batch, hq, rest, lk, prefix_keys)


class _Problem:
    """The chunk-independent pieces: q, K/V and the prefix in the matmul layouts, masks, the mask filler, and the
    score-sized buffers every chunk reuses."""

    def __init__(self, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale,
                 softcap, window, dropout_p, dropout_seed, backward=False, attn_bias=None, prefix_bias=None):
        self.batch, self.hq, self.lq, self.dim = q.shape
        self.hkv, self.lk = k.shape[1], k.shape[2]
        self.group = self.hq // self.hkv
        self.rows = self.batch * self.hkv
        self.acc = accumulator_dtype(q.dtype)
        self.device = q.device
        self.qg = _grouped_rows(q, self.hkv, self.acc)
        self.k = k.to(self.acc).reshape(self.rows, self.lk, self.dim)  # [B*Hkv, Lk, D]
        self.v = v.to(self.acc).reshape(self.rows, self.lk, self.dim)
        self.mode, self.prefix_index = prefix_mode, prefix_index
        self.pk = self.pv = None
        self.slots = self.plen = self.prefix_keys = 0
        if prefix_mode != PREFIX_NONE:
            self.slots, self.plen = prefix_index.shape[1], prefix_k.shape[2]
            self.prefix_keys = self.slots * self.plen
            self.pk, self.pv = self._prefix_rows(prefix_k), self._prefix_rows(prefix_v)
        self.shared = prefix_mode == PREFIX_SHARED
        self.scale, self.softcap = scale, softcap
        # the masks as additive 0 / -inf biases: a broadcast add_ is much cheaper than masked_fill_ on the CPU
        self.hidden = self._bias(hidden_positions(self.lq, self.lk, causal, window, q.device))  # [Lq, Lk]
        self.padded = None if key_padding_mask is None else self._bias(~key_padding_mask[:, None, None, None, :])
        self.empty_slot = None
        if prefix_mode == PREFIX_POOL and bool((prefix_index < 0).any()):
            self.empty_slot = self._bias((prefix_index < 0)[:, None, None, None, :, None])
        self.keep_scale = dropout_scale(dropout_p)
        self.filler = KeepMaskFiller(dropout_seed, dropout_p)
        self.row_ids = torch.arange(self.batch * self.hq, dtype=torch.int64, device=q.device)  # b * Hq + h
        # additive score biases (T5's relative positions), grouped: [1|B, Hkv, G, Lq, Lk] and [1|B, Hkv, G, Lq, S*P]
        self.seq_bias = self._grouped_bias(attn_bias)
        self.pre_bias = self._grouped_bias(prefix_bias)
        self.queries_per_chunk = _queries_per_chunk(self.batch, self.hq, self.lk, self.prefix_keys)
        m = min(self.lq, self.queries_per_chunk)
        # flat score-sized buffers, viewed per chunk (a shorter last chunk takes their first elements)
        count = 2 if backward else 1  # scores / probabilities, and in backward dP / dS
        seq_size, pre_size = self.rows * self.group * m * self.lk, self.rows * self.group * m * self.prefix_keys
        flag_bytes = 8 * packed_size(self.batch * self.hq * m * (self.prefix_keys + self.lk))
        tanh_count = 1 if backward and softcap > 0 else 0
        item = torch.empty(0, dtype=self.acc).element_size()
        total = (count + 1 + tanh_count) * (seq_size + pre_size) * item + flag_bytes + 64 * 16  # + 64 B alignment each
        self._space = torch.empty(total, dtype=torch.uint8, device=q.device)  # one allocation for every buffer
        self._used = 0
        self._seq_buffers = [self._empty(seq_size) for _ in range(count)]
        self._pre_buffers = [self._empty(pre_size) for _ in range(count)] if prefix_mode != PREFIX_NONE else []
        self._tanh_buffers = [self._empty(seq_size), self._empty(pre_size)] if backward and softcap > 0 else []
        # the keep mask: a chunk's decisions over all its keys, bool as Philox writes them / as unpacked (padded to
        # whole packed words, padding False), and each block's 0 / 1 in the accumulator dtype, multiplied in
        self._flags = self._take(flag_bytes, torch.bool).zero_()
        self._keep = [self._empty(seq_size), self._empty(pre_size)]

    def _empty(self, size):
        return self._take(size, self.acc)

    def _take(self, numel, dtype):
        """The next `numel` elements of the workspace, 64-byte aligned (int64 views of bool buffers need 8)."""
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        start = self._used
        self._used += (nbytes + 63) // 64 * 64
        return self._space[start:start + nbytes].view(dtype)

    def _grouped_bias(self, bias):
        if bias is None:
            return None
        return bias.to(self.acc).reshape(bias.shape[0], self.hkv, self.group, self.lq, bias.shape[-1])

    def _bias(self, hidden):
        """A bool "hidden" mask as a float 0 / -inf bias (None stays None)."""
        if hidden is None:
            return None
        return torch.zeros(hidden.shape, dtype=self.acc, device=self.device).masked_fill_(hidden, NEG_INF)

    def _prefix_rows(self, prefix):
        """Shared: `[Hkv, P, D]`; per sample / pool: `[B*Hkv, S*P, D]` (a pool's selected entries end to end)."""
        if self.mode == PREFIX_SHARED:
            return prefix[0].to(self.acc)
        if self.mode != PREFIX_POOL:
            return prefix.to(self.acc).reshape(self.rows, self.plen, self.dim)
        selected = prefix[self.prefix_index.clamp(min=0)].to(self.acc)  # [B, S, Hkv, P, D]
        return selected.permute(0, 2, 1, 3, 4).reshape(self.rows, self.prefix_keys, self.dim)

    def _block(self, flat, m, prefix):
        """The first elements of a flat buffer as the chunk's matmul block: sequence `[B*Hkv, G*m, Lk]`, prefix
        `[B*Hkv, G*m, S*P]` or, shared, `[Hkv, B*G*m, P]`."""
        if not prefix:
            shape = (self.rows, self.group * m, self.lk)
        elif self.shared:
            shape = (self.hkv, self.batch * self.group * m, self.plen)
        else:
            shape = (self.rows, self.group * m, self.prefix_keys)
        return flat[:shape[0] * shape[1] * shape[2]].view(shape)

    def chunks(self):
        for start in range(0, self.lq, self.queries_per_chunk):
            yield start, min(self.lq, start + self.queries_per_chunk)

    # -- the chunk's operands in matmul layouts ----------------------------------------------------------------
    # (every view and reshape names its sizes: with B = 0 a -1 could be anything, and torch refuses it)

    def rows_of(self, x, start, stop):
        """`[B, Hkv, G, Lq, D]` -> the chunk's `[B*Hkv, G*m, D]` (a view when the chunk spans all queries)."""
        return x[:, :, :, start:stop].reshape(self.rows, self.group * (stop - start), x.shape[-1])

    def heads_of(self, x, start, stop):
        """`[B, Hkv, G, Lq, D]` -> the chunk's `[Hkv, B*G*m, D]` (the shared prefix's matmul rows; a copy of the
        chunk's queries, never of the prefix)."""
        return x[:, :, :, start:stop].transpose(0, 1).reshape(self.hkv, self.batch * self.group * (stop - start),
                                                              x.shape[-1])

    def prefix_rows_of(self, x, start, stop, rows=None):
        """The chunk's rows for the prefix matmuls (rows: rows_of's result, reused for a per-row prefix)."""
        if self.shared:
            return self.heads_of(x, start, stop)
        return rows if rows is not None else self.rows_of(x, start, stop)

    # -- scores, probabilities, drop masks ---------------------------------------------------------------------

    def blocks(self, which, m):
        """The `which`-th sequence and prefix buffers (None without a prefix) as a chunk of m queries' blocks."""
        seq = self._block(self._seq_buffers[which], m, False)
        pre = self._block(self._pre_buffers[which], m, True) if self._pre_buffers else None
        return seq, pre

    def scores(self, start, stop, q_rows, q_prefix_rows, keep_tanh=False):
        """The chunk's capped, biased, masked scores, in log2 units (times log2 e), in the first buffers:
        (sequence, prefix or None, tanh terms or None). q_rows, q_prefix_rows: the chunk's queries as
        rows_of / prefix_rows_of give them."""
        m = stop - start
        seq, pre = self.blocks(0, m)
        alpha = self.scale if self.softcap > 0 else self.scale * LOG2E  # softcap: converted after the cap
        torch.baddbmm(seq, q_rows, self.k.transpose(1, 2), beta=0, alpha=alpha, out=seq)
        if pre is not None:
            torch.baddbmm(pre, q_prefix_rows, self.pk.transpose(1, 2), beta=0, alpha=alpha, out=pre)
        tanh = None
        if self.softcap > 0:
            tanh = self._cap(seq, pre, m, keep_tanh)
        seq5 = self.grouped(seq, m)
        if self.seq_bias is not None:
            seq5.add_(self.seq_bias[:, :, :, start:stop], alpha=LOG2E)
        if self.pre_bias is not None:
            self.grouped(pre, m, prefix=True).add_(self.pre_bias[:, :, :, start:stop], alpha=LOG2E)
        if self.hidden is not None:
            seq5.add_(self.hidden[start:stop])
        if self.padded is not None:
            seq5.add_(self.padded)
        if self.empty_slot is not None:
            self.pool_view(pre, m).add_(self.empty_slot)
        return seq, pre, tanh

    def _cap(self, seq, pre, m, keep_tanh):
        """softcap * tanh(s / softcap) (in log2 units) in place; with keep_tanh the tanh terms (backward's 1 - t^2)
        in their own buffers."""
        kept = []
        for i, block in enumerate((seq, pre)):
            if block is None:
                continue
            block.div_(self.softcap).tanh_()
            if keep_tanh:
                kept.append(self._block(self._tanh_buffers[i], m, i == 1).copy_(block))
            block.mul_(self.softcap * LOG2E)
        if not keep_tanh:
            return None
        return kept[0], (kept[1] if len(kept) > 1 else None)

    def pool_view(self, pre, m):
        """A pool's `[B*Hkv, G*m, S*P]` prefix block as `[B, Hkv, G, m, S, P]`."""
        return pre.view(self.batch, self.hkv, self.group, m, self.slots, self.plen)

    def grouped(self, block, m, prefix=False):
        """A chunk's `[B*Hkv, G*m, N]` block, or a shared prefix's `[Hkv, B*G*m, N]`, as `[B, Hkv, G, m, N]` (a
        view)."""
        if prefix and self.shared:
            return block.view(self.hkv, self.batch, self.group, m, block.shape[-1]).transpose(0, 1)
        return block.view(self.batch, self.hkv, self.group, m, block.shape[-1])

    def prefix_grad_layout(self, grad):
        """A prefix gradient as prefix_grads_per_entry takes it: shared `[Hkv, P, D]`, per sample `[B, Hkv, P, D]`,
        pool `[B, S, Hkv, P, D]`."""
        if self.shared:
            return grad
        if self.mode != PREFIX_POOL:
            return grad.view(self.batch, self.hkv, self.plen, self.dim)
        return grad.view(self.batch, self.hkv, self.slots, self.plen, self.dim).transpose(1, 2)

    def keep_masks(self, start, stop, kept=None, save=False):
        """The chunk's keep masks as 0 / 1 in the accumulator dtype (multiplied in), laid out as the score blocks:
        `[B, Hkv, G, m, Lk]` and `[B, Hkv, G, m, S*P]` views (shared prefix: of `[Hkv, B, G, m, P]` memory) or
        None. kept: the packed mask of the whole call; save: draw the mask and pack it into kept, else unpack it
        from kept (kept None: draw it).

        One Philox pass per chunk covers both key ranges (prefix keys 0..S*P-1, then the sequence): it is their
        natural order, and a single pass halves the generator's fixed cost per call."""
        m = stop - start
        lines, keys = self.batch * self.hq, self.prefix_keys + self.lk
        count = lines * m * keys
        nbytes = packed_size(count)
        offset = (start // self.queries_per_chunk) * _chunk_bytes(self.batch, self.hq, self.queries_per_chunk,
                                                                   self.lk, self.prefix_keys)
        flags, bits = self._flags[:8 * nbytes], None if kept is None else kept[offset:offset + nbytes]
        if bits is None or save:
            queries = torch.arange(start, stop, dtype=torch.int64, device=self.device)
            self.filler.fill(flags[:count].view(lines, m, keys), self.row_ids, queries, 0)
            if save:
                flags[count:].zero_()  # a shorter last chunk: the padding bits of its last word
                pack_bits(flags, bits)
        else:
            unpack_bits(bits, flags.view(torch.uint8))
        decisions = flags[:count].view(torch.uint8).view(self.batch, self.hkv, self.group, m, keys)
        # uint8 -> float copies (the fast cast) into each block's layout
        keep_seq = self.grouped(self._block(self._keep[0], m, False), m).copy_(decisions[..., self.prefix_keys:])
        keep_pre = None
        if self.mode != PREFIX_NONE:
            keep_pre = self.grouped(self._block(self._keep[1], m, True), m, prefix=True)
            keep_pre.copy_(decisions[..., :self.prefix_keys])
        return keep_seq, keep_pre


def _grouped_rows(x, hkv, acc):
    """`[B, Hq, L, D]` -> contiguous `[B, Hkv, G, L, D]` in the accumulator dtype (one copy at most, so that every
    chunk's `[B*Hkv, G*m, D]` rows are a view whenever the chunk spans all queries or G = 1)."""
    batch, hq, length, dim = x.shape
    return x.reshape(batch, hkv, hq // hkv, length, dim).to(acc).contiguous()


def _rows_view(x, start, stop, rows):
    """The chunk's `[B*Hkv, G*m, D]` rows of a contiguous `[B, Hkv, G, L, D]` x as a view, or None where they are not
    one (G > 1 and a chunk shorter than L)."""
    part = x[:, :, :, start:stop]
    try:
        return part.view(rows, x.shape[2] * (stop - start), x.shape[-1])
    except RuntimeError:
        return None


def _max_over_keys(block5):
    if block5.shape[-1] == 0:
        return torch.full(block5.shape[:-1], NEG_INF, dtype=block5.dtype, device=block5.device)
    return block5.amax(dim=-1)


def forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap, window,
            dropout_p, dropout_seed, attn_bias=None, prefix_bias=None):
    """(out, lse, the packed keep mask for backward)."""
    pb = _Problem(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
                  window, dropout_p, dropout_seed, attn_bias=attn_bias, prefix_bias=prefix_bias)
    kept = torch.empty(kept_mask_bytes(pb.batch, pb.hq, pb.lq, pb.lk, pb.prefix_keys), dtype=torch.uint8,
                       device=q.device)
    out = torch.empty(pb.batch, pb.hkv, pb.group, pb.lq, pb.dim, dtype=pb.acc, device=q.device)
    lse = torch.empty(pb.batch, pb.hkv, pb.group, pb.lq, dtype=pb.acc, device=q.device)
    for start, stop in pb.chunks():
        m = stop - start
        q_rows = pb.rows_of(pb.qg, start, stop)
        q_pre = pb.prefix_rows_of(pb.qg, start, stop, q_rows) if pb.mode != PREFIX_NONE else None
        seq, pre, _ = pb.scores(start, stop, q_rows, q_pre)
        seq5 = pb.grouped(seq, m)
        pre5 = pb.grouped(pre, m, prefix=True) if pre is not None else None
        row_max = _max_over_keys(seq5)
        if pre5 is not None:
            row_max = torch.maximum(row_max, _max_over_keys(pre5))
        empty = torch.isinf(row_max)  # every key hidden
        safe_max = row_max.masked_fill(empty, 0.0)
        seq5.sub_(safe_max[..., None]).exp2_()
        denom = seq5.sum(dim=-1)
        if pre5 is not None:
            pre5.sub_(safe_max[..., None]).exp2_()
            denom += pre5.sum(dim=-1)
        keep_seq, keep_pre = pb.keep_masks(start, stop, kept, save=True)
        seq5.mul_(keep_seq)
        acc = torch.bmm(seq, pb.v).view(pb.batch, pb.hkv, pb.group, m, pb.dim)
        if pre5 is not None:
            pre5.mul_(keep_pre)
            acc += pb.grouped(torch.bmm(pre, pb.pv), m, prefix=True)
        # out = r (Z * P) V / denom; a row with no visible key has P = 0 and keeps out = 0
        denom.masked_fill_(empty, 1.0)
        torch.mul(acc, (pb.keep_scale / denom)[..., None], out=out[:, :, :, start:stop])
        lse[:, :, :, start:stop] = (row_max + torch.log2(denom)).mul_(LN2).masked_fill_(empty, NEG_INF)
    return out.reshape(pb.batch, pb.hq, pb.lq, pb.dim).to(q.dtype), lse.reshape(pb.batch, pb.hq, pb.lq), kept


def backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta, causal,
             scale, softcap, window, dropout_p, dropout_seed, dropout_keep=None, attn_bias=None, prefix_bias=None):
    """dropout_keep: the packed mask forward returned; None or empty: drawn again from dropout_seed."""
    pb = _Problem(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
                  window, dropout_p, dropout_seed, backward=True, attn_bias=attn_bias, prefix_bias=prefix_bias)
    kept = dropout_keep if dropout_keep is not None and dropout_keep.numel() > 0 else None
    shape = (pb.batch, pb.hkv, pb.group, pb.lq)
    dog = _grouped_rows(grad_out, pb.hkv, pb.acc)
    lse_g = lse.reshape(shape).to(pb.acc)
    safe_lse = lse_g.masked_fill(torch.isinf(lse_g), 0.0).mul_(LOG2E)  # lse = -inf: every score is -inf, P = 0
    delta_g = delta.reshape(shape).to(pb.acc)
    r = pb.keep_scale
    # dq, dk and the prefix gradients accumulate dS / scale; one multiplication by scale at the end
    dq = torch.empty(*shape, pb.dim, dtype=pb.acc, device=q.device)
    dk, dv = torch.empty_like(pb.k), torch.empty_like(pb.v)
    dpk = dpv = None
    if pb.mode != PREFIX_NONE:
        dpk, dpv = torch.empty_like(pb.pk), torch.empty_like(pb.pv)
    for start, stop in pb.chunks():
        m = stop - start
        first = 0.0 if start == 0 else 1.0  # the first chunk writes the accumulated gradients, later ones add
        q_rows, do_rows = pb.rows_of(pb.qg, start, stop), pb.rows_of(dog, start, stop)
        q_pre = do_pre = None
        if pb.mode != PREFIX_NONE:
            q_pre = pb.prefix_rows_of(pb.qg, start, stop, q_rows)
            do_pre = pb.prefix_rows_of(dog, start, stop, do_rows)
        seq, pre, tanh = pb.scores(start, stop, q_rows, q_pre, keep_tanh=True)
        dseq, dpre = pb.blocks(1, m)
        lse_c = safe_lse[:, :, :, start:stop, None]
        delta_c = delta_g[:, :, :, start:stop, None]
        keep_seq, keep_pre = pb.keep_masks(start, stop, kept)

        def score_grads(scores, dp_block, keep, tanh_term, do_block_rows, values, prefix):
            """scores <- Z * P, dp_block <- dS / scale (the chunk's sequence or prefix block)."""
            p5, dp5 = pb.grouped(scores, m, prefix), pb.grouped(dp_block, m, prefix)
            p5.sub_(lse_c).exp2_()
            torch.baddbmm(dp_block, do_block_rows, values.transpose(1, 2), beta=0, alpha=r, out=dp_block)  # r dO V^T
            dp5.mul_(keep).sub_(delta_c).mul_(p5)  # P * (r Z dP - delta)
            if tanh_term is not None:  # d tanh: 1 - t^2
                dp_block.mul_(tanh_term.square_().neg_().add_(1.0))
            p5.mul_(keep)

        score_grads(seq, dseq, keep_seq, tanh[0] if tanh else None, do_rows, pb.v, False)
        torch.baddbmm(dv, seq.transpose(1, 2), do_rows, beta=first, alpha=r, out=dv)
        torch.baddbmm(dk, dseq.transpose(1, 2), q_rows, beta=first, out=dk)
        dq_rows = _rows_view(dq, start, stop, pb.rows)  # written in place when the chunk's rows are a view
        dq_chunk = torch.bmm(dseq, pb.k, out=dq_rows) if dq_rows is not None else torch.bmm(dseq, pb.k)
        if pre is not None:
            score_grads(pre, dpre, keep_pre, tanh[1] if tanh else None, do_pre, pb.pv, True)
            torch.baddbmm(dpv, pre.transpose(1, 2), do_pre, beta=first, alpha=r, out=dpv)
            torch.baddbmm(dpk, dpre.transpose(1, 2), q_pre, beta=first, out=dpk)
            if pb.shared:
                pb.grouped(dq_chunk, m).add_(pb.grouped(torch.bmm(dpre, pb.pk), m, prefix=True))
            else:
                dq_chunk.baddbmm_(dpre, pb.pk)
        if dq_rows is None:
            dq[:, :, :, start:stop] = pb.grouped(dq_chunk, m)
    dq.mul_(scale)
    dk.mul_(scale)
    dprefix_k = dprefix_v = None
    if prefix_mode != PREFIX_NONE:
        dpk.mul_(scale)
        dprefix_k, dprefix_v = prefix_grads_per_entry(pb.prefix_grad_layout(dpk), pb.prefix_grad_layout(dpv),
                                                      prefix_mode, prefix_index, prefix_k, prefix_v, pb.acc)
    return (dq.reshape(pb.batch, pb.hq, pb.lq, pb.dim).to(q.dtype), dk.view(k.shape).to(k.dtype),
            dv.view(v.shape).to(v.dtype), dprefix_k, dprefix_v)

