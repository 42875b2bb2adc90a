"""Prefix attention on the CPU through PyTorch's fused flash-attention kernel, in two parts merged by lse.

PyTorch's CPU flash kernel (`aten::_scaled_dot_product_flash_attention_for_cpu`) is much faster than composing
matmul + softmax, handles GQA without repeat_kv, and returns the log-sum-exp. Attention over `[prefix; seq]`
splits exactly into attention over the prefix and attention over the sequence, merged by their lse
(FlashInfer's cascade merge): out = Σ exp(lse_part - lse) · out_part with lse = logaddexp(lse_prefix, lse_seq).
For backward, the kernel's backward called with the MERGED out and lse gives each part's exact share of the
gradient (P = exp(s - lse) are then the global probabilities and rowsum(dO·O) the global row term).

A shared prefix is attended by all B·Lq queries of a head at once (queries folded into one long row block), so
it is never copied per row; a pool's selected entries are gathered per row (the selection itself). The
sequence part gets an additive mask of at most `[B, 1, Lq, Lk]` that never spans the prefix.
Not used with softcap (the kernel has none) or when the lse output itself is differentiated.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..prefix_attention_inputs import PREFIX_NONE, PREFIX_POOL, PREFIX_SHARED

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")


def applicable(q: Tensor, softcap: float) -> bool:
    return q.device.type == "cpu" and softcap == 0.0 and q.shape[-1] > 0


def kernel_layout(t: Tensor) -> Tensor:
    """t itself when its last dim is unit-stride, else a contiguous copy. The fused kernel reads each row of D
    values as one contiguous run whatever the tensor's last-dim stride (PyTorch <= 2.13 gives silently wrong
    results for e.g. `x[..., ::2]`); every other dim may have any stride, so the usual layouts are never copied."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _kernel_inputs(*tensors):
    return tuple(None if t is None else kernel_layout(t) for t in tensors)


def hidden_positions(lq: int, lk: int, causal: bool, window: int, device):
    """`[Lq, Lk]` bool, True where bottom-right causality or the sliding window hide sequence key j from query i;
    None when neither applies."""
    if not causal and window <= 0:
        return None
    qpos = torch.arange(lq, device=device)[:, None] + (lk - lq)
    kpos = torch.arange(lk, device=device)[None, :]
    hidden = torch.zeros(lq, lk, dtype=torch.bool, device=device)
    if causal:
        hidden |= kpos > qpos
    if window > 0:
        hidden |= (qpos - kpos) >= window
        if not causal:
            hidden |= (kpos - qpos) >= window
    return hidden


def _sequence_mask(q: Tensor, lk: int, key_padding_mask, causal: bool, window: int):
    """(additive mask or None, use the kernel's is_causal, rows with no visible sequence key [B, 1, Lq] or None)."""
    lq = q.shape[2]
    if key_padding_mask is None and window < 0 and (not causal or lq == lk or (lq == 1 and lk > 0)):
        # top-left is_causal equals bottom-right when Lq == Lk; a single (decode) query sees every key
        return None, causal and lq > 1, None
    hidden = hidden_positions(lq, lk, causal, window, q.device)
    if hidden is not None:
        hidden = hidden[None, None]
    if key_padding_mask is not None:
        padded = (~key_padding_mask)[:, None, None, :]
        hidden = padded if hidden is None else (hidden | padded)
    mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, NEG_INF)
    return mask, False, hidden.all(dim=-1)


def _prefix_problem(q: Tensor, prefix_k, prefix_v, prefix_index, mode):
    """The prefix part as a plain attention problem: (q, k, v, additive mask, rows with no prefix key [B])."""
    batch, hq, lq, dim = q.shape
    if mode == PREFIX_SHARED:  # one problem per head over all B·Lq queries
        return q.transpose(0, 1).reshape(1, hq, batch * lq, dim), prefix_k, prefix_v, None, None
    if mode != PREFIX_POOL:
        return q, prefix_k, prefix_v, None, None
    index = prefix_index.clamp(min=0)
    slots, plen = prefix_index.shape[1], prefix_k.shape[2]

    def rows(prefix):  # [B, S, Hkv, P, D] -> [B, Hkv, S*P, D]
        return prefix[index].permute(0, 2, 1, 3, 4).reshape(batch, prefix.shape[1], slots * plen, dim)

    empty_slot = (prefix_index < 0).repeat_interleave(plen, dim=1)[:, None, None, :]
    mask = torch.zeros(empty_slot.shape, dtype=q.dtype, device=q.device).masked_fill_(empty_slot, NEG_INF)
    return q, rows(prefix_k), rows(prefix_v), mask, (prefix_index < 0).all(dim=1)


def _unfold_shared(t: Tensor, batch: int) -> Tensor:
    """[1, Hq, B*Lq, ...] -> [B, Hq, Lq, ...] (a view)."""
    hq = t.shape[1]
    return t.reshape(hq, batch, -1, *t.shape[3:]).transpose(0, 1)


def _empty_sequence_part(q: Tensor):
    """(out, lse) of attention over zero sequence keys: the kernel divides by Lk = 0 (SIGFPE), so no call."""
    lse = torch.full(q.shape[:3], NEG_INF, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                     device=q.device)
    return torch.zeros(q.shape, dtype=q.dtype, device=q.device), lse


def merge_parts(out_seq, lse_seq, out_pre, lse_pre, prefix_empty):
    """(out, lse) of attention over [prefix; sequence] from its two parts (FlashInfer's cascade merge): lse =
    logaddexp(lse_pre, lse_seq), out = Σ exp(lse_part − lse)·out_part, merged in place into `out_seq` (the
    kernel's own fresh output) when it is in the lse precision. `prefix_empty`: bool [B], rows whose prefix part
    has no key (their lse_pre becomes -inf), or None when every row sees its prefix keys."""
    if prefix_empty is not None:
        lse_pre = lse_pre.masked_fill(prefix_empty[:, None, None], NEG_INF)
    lse = torch.logaddexp(lse_pre, lse_seq)
    if prefix_empty is None and out_seq.dtype == lse.dtype:
        # Every row sees its P >= 1 prefix keys, so lse is finite (finite inputs) and the guards below are no-ops:
        # the prefix part's weight exp(lse_pre - lse) is sigmoid(lse_pre - lse_seq) (1 where no sequence key is
        # visible), and the merge is one lerp in place: three small ops, which is what a decode step pays for.
        return out_seq.lerp_(out_pre, torch.sigmoid(lse_pre - lse_seq)[..., None]), lse
    if prefix_empty is None:
        w_pre = torch.exp(lse_pre - lse)[..., None]
        w_seq = torch.exp(lse_seq - lse)[..., None]
    else:
        finite = torch.isfinite(lse)
        safe = torch.where(finite, lse, torch.zeros_like(lse))
        w_pre = torch.exp(lse_pre - safe).masked_fill_(~finite, 0.0)[..., None]
        w_seq = torch.exp(lse_seq - safe).masked_fill_(~finite, 0.0)[..., None]
    if out_seq.dtype == w_seq.dtype:  # merge in place into the kernel's own (fresh) output
        return out_seq.mul_(w_seq).addcmul_(out_pre, w_pre), lse
    return out_pre.to(w_pre.dtype) * w_pre + out_seq.to(w_seq.dtype) * w_seq, lse  # low precision: in lse's


def forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, window):
    batch = q.shape[0]
    q, k, v, prefix_k, prefix_v = _kernel_inputs(q, k, v, prefix_k, prefix_v)
    seq_empty = None
    if k.shape[2] == 0:
        out_seq, lse_seq = _empty_sequence_part(q)
    else:
        mask, is_causal, seq_empty = _sequence_mask(q, k.shape[2], key_padding_mask, causal, window)
        out_seq, lse_seq = _flash(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        if seq_empty is not None:  # the kernel reports lse 0 for a row with every key masked
            lse_seq = lse_seq.masked_fill(seq_empty, NEG_INF)
    if prefix_mode == PREFIX_NONE:
        out, lse = out_seq, lse_seq
    else:
        if prefix_mode == PREFIX_SHARED:
            # Forward only: the shared prefix read through a batch-stride-0 view (no gradient is formed here, so
            # nothing per row is built), which spares the folded copy of q that the backward needs.
            pq, pk, pv, pmask, prefix_empty = (q, prefix_k.expand(batch, *prefix_k.shape[1:]),
                                               prefix_v.expand(batch, *prefix_v.shape[1:]), None, None)
        else:
            pq, pk, pv, pmask, prefix_empty = _prefix_problem(q, prefix_k, prefix_v, prefix_index, prefix_mode)
        out_pre, lse_pre = _flash(pq, pk, pv, 0.0, False, attn_mask=pmask, scale=scale)
        out, lse = merge_parts(out_seq, lse_seq, out_pre, lse_pre, prefix_empty)
    if seq_empty is not None or prefix_mode == PREFIX_POOL or (prefix_mode == PREFIX_NONE and k.shape[2] == 0):
        empty = torch.isneginf(lse)  # only a mask, empty pool slots or no key at all can hide every key of a row
        out = out.masked_fill_(empty[..., None], 0.0)  # out is fresh here (kernel output or the merge)
    return out if out.dtype == q.dtype else out.to(q.dtype), lse  # in the kernel's layout, which follows q's


def _dense(t: Tensor) -> Tensor:
    """t itself when it is [B, H, L, D] or [B, L, H, D] in memory (the kernel reads either: transformers hands over
    the latter), else a contiguous copy (e.g. an expanded gradient)."""
    return t if t.is_contiguous() or t.transpose(1, 2).is_contiguous() else t.contiguous()


def _as_rows(t: Tensor):
    """[B, L, D] -> a [B·L, D] view when the memory layout allows it, else None."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


# Score blocks up to this size cover a whole GQA group at once (S <= 128 at B=8, P=32, G=4): where the per-head
# calls cost more than the work; larger blocks stay per head, so the layer's allocations stay small.
_GROUP_BLOCK_BYTES = 512 << 10


def _heads(t: Tensor, j: int, g: int):
    """Query heads j..j+g-1 of t [B, H, L(, D)] as one [B, g·L(, D)] view, or None when the memory layout does not
    allow it (g = 1 always does)."""
    if g == 1:
        return t[:, j]
    try:
        return t[:, j:j + g].view(t.shape[0], g * t.shape[2], *t.shape[3:])
    except RuntimeError:
        return None


def _head_block(q, grad_out, out, lse, delta, group: int, plen: int) -> int:
    """How many query heads one step of the written-out prefix backward covers: the whole GQA group when its
    score block is small (short sequences, where per-call overhead dominates the per-head loop) and q, dO, lse
    and the row term's inputs fold into one [B, G·Lq, ...] view ([B, H, L, D] memory), else one head."""
    batch, _, lq, _ = q.shape
    if group == 1 or batch * group * lq * plen * q.element_size() > _GROUP_BLOCK_BYTES:
        return 1
    folded = (q, grad_out, lse) + ((out,) if delta is None else (delta,))
    return group if all(_heads(t, 0, group) is not None for t in folded) else 1


# Score blocks (all heads) up to this size hand the shared prefix's backward to the fused kernel (_kernel_prefix_
# backward): at these sizes (S <= 64 at B=8, Hq=8, P=32; P <= 8 at S=256; the 4-layer h256 model at S=128) the
# written-out loop's ~15 small ops per head cost more than the work, and q / dO in transformers' [B, L, H, D] order
# do not fold into a GQA group's rows. Larger blocks go to the kernel in chunks of batch rows, each within this size,
# where that was measured faster than the written-out loop: MHA (B=8 S=128/256 fwd+bwd step 0.93-0.96x of the
# loop's time) and GQA whose whole group's block is within _GROUP_BLOCK_BYTES (S=128: 0.97x). GQA with larger group
# blocks (S=256/512 at B=8, P=32) keeps the loop: even in time (0.98-1.00x) and the kernel's fresh dq share is a
# second dq, 1.2x the layer's new bytes (the attention layer's 0.41x of the PEFT path's would be 0.50x). Only when
# one row's block is larger than this does the loop run for MHA too; its buffers stay per head.
_KERNEL_BLOCK_BYTES = 512 << 10
# Whether an MQA prefix in [B, H, L, D] memory takes _single_kv_head_prefix_backward (tests switch it off to reach
# the other strategies with one KV head).
_FOLD_SINGLE_KV_HEAD = True
# Its dq share per kernel call (chunks of batch rows): B=8 S=256 Hq=4 D=128 in one call, like a 1024-token row.
_FOLD_DQ_BYTES = 4 << 20


def _kernel_prefix_backward(grad_out, q, out, lse, prefix_k, prefix_v, scale, dq):
    """The shared prefix's share of the backward by PyTorch's fused kernel, the prefix read through a batch-stride-0
    view (as in forward: no per-row copy of it), with the merged out and lse (so the kernel's probabilities are the
    global ones, see the module docstring). The kernel returns its own dq share, added into `dq`, and per-row
    prefix gradients `[B, Hkv, P, D]` (small at these sizes), summed over the batch."""
    batch = q.shape[0]
    pk, pv = prefix_k.expand(batch, *prefix_k.shape[1:]), prefix_v.expand(batch, *prefix_v.shape[1:])
    dq_prefix, dpk, dpv = _flash_backward(grad_out, q, pk, pv, out, lse, 0.0, False, scale=scale)
    dq.add_(dq_prefix)
    return dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)


def _all_rows(t: Tensor):
    """t [B, H, L(, D)] as one [1, 1, B·H·L(, D)] view, or None when the memory layout does not allow it ([B, L, H,
    D] memory, as transformers passes q, does not)."""
    try:
        return t.view(1, 1, -1, *t.shape[3:])
    except RuntimeError:
        return None


def _single_kv_head_prefix_backward(grad_out, q, out, lse, prefix_k, prefix_v, scale, dq):
    """The shared prefix's share of the backward when it has one KV head (MQA), by the fused kernel as ONE
    single-head problem over all B·Hq·Lq query rows ([B, H, L, D] memory folds into rows): the prefix is read once
    (no batch expand), the kernel returns the prefix gradients themselves (no per-row [B, 1, P, D] partials to
    sum) and runs no GQA head mapping. Measured faster than the per-head loop (B=8 S=256 fwd+bwd step, median of
    paired runs: 0.96-0.99x at P=32 Hq=4..8, 0.93-0.96x at P=200). None when q, dO, O or lse do not fold."""
    if q.shape[0] == 0:
        return None  # an empty batch: the whole-batch kernel path gives the zero prefix gradients
    folded = [_all_rows(t) for t in (grad_out, q, out, lse)]
    if any(t is None for t in folded):
        return None
    # Chunks of whole batch rows whose dq share (a fresh buffer the kernel returns) stays within _FOLD_DQ_BYTES (at
    # least one row), so the transient memory stays bounded whatever B is; the chunks' prefix gradients add up.
    batch, hq, lq, dim = q.shape
    per_row = hq * lq
    rows = max(1, _FOLD_DQ_BYTES // (per_row * dim * q.element_size()))
    dpk = dpv = None
    for b in range(0, batch, rows):
        part, n = slice(b * per_row, (b + rows) * per_row), min(rows, batch - b)
        f_do, f_q, f_out, f_lse = (t[:, :, part] for t in folded)
        dq_part, dpk_b, dpv_b = _flash_backward(f_do, f_q, prefix_k, prefix_v, f_out, f_lse, 0.0, False, scale=scale)
        dq[b:b + n].add_(dq_part.view(n, hq, lq, -1))  # dq may be in the sequence kernel's [B, L, H, D] memory
        dpk, dpv = (dpk_b, dpv_b) if dpk is None else (dpk.add_(dpk_b), dpv.add_(dpv_b))
    return dpk, dpv


def _chunked_kernel_prefix_backward(grad_out, q, out, lse, prefix_k, prefix_v, scale, dq, rows: int):
    """_kernel_prefix_backward over `rows` batch rows at a time (every head), each chunk's score block within
    _KERNEL_BLOCK_BYTES: the kernel's speed without a whole-batch dq share and per-row prefix gradients."""
    dpk = dpv = None
    for b in range(0, q.shape[0], rows):
        part = slice(b, b + rows)
        dpk_b, dpv_b = _kernel_prefix_backward(grad_out[part], q[part], out[part], lse[part], prefix_k, prefix_v,
                                               scale, dq[part])
        dpk, dpv = (dpk_b, dpv_b) if dpk is None else (dpk.add_(dpk_b), dpv.add_(dpv_b))
    return dpk, dpv


def _shared_prefix_backward(grad_out, q, out, lse, delta, prefix_k, prefix_v, scale, dq):
    """The shared prefix's share of the backward. One KV head in [B, H, L, D] memory: one folded kernel problem
    (_single_kv_head_prefix_backward). Else small score blocks: the kernel over the whole batch or over chunks of
    batch rows (MHA, or a GQA group whose block is small; see _KERNEL_BLOCK_BYTES). Else written out per query head
    (or per GQA group of heads, see _head_block) with small [B, g·Lq, P] score blocks:
    P = exp(q·pkᵀ·scale − lse), dS = P ∘ (dO·pvᵀ − delta); dq += scale·dS·pk in place; dpk = scale·Σ dSᵀ·q and
    dpv = Σ Pᵀ·dO accumulated straight into one [Hkv, P, D] (never a per-row copy). Unlike handing the prefix to
    the flash kernel's backward, it needs no folded copies of q, dO and O and no second dq; the score blocks are
    two buffers reused by every head. `delta` (rowsum(dO·O), [B, Hq, Lq]) is computed per head when None."""
    batch, hq, lq, dim = q.shape
    hkv, plen = prefix_k.shape[1], prefix_k.shape[2]
    if hkv == 1 and _FOLD_SINGLE_KV_HEAD:
        grads = _single_kv_head_prefix_backward(grad_out, q, out, lse, prefix_k, prefix_v, scale, dq)
        if grads is not None:
            return grads
    row_block = hq * lq * plen * q.element_size()  # one batch row's score block over all heads
    if batch * row_block <= _KERNEL_BLOCK_BYTES:
        return _kernel_prefix_backward(grad_out, q, out, lse, prefix_k, prefix_v, scale, dq)
    group = hq // hkv
    small_group = group == 1 or batch * group * lq * plen * q.element_size() <= _GROUP_BLOCK_BYTES
    if row_block <= _KERNEL_BLOCK_BYTES and small_group:  # the kernel over chunks of batch rows (see above)
        return _chunked_kernel_prefix_backward(grad_out, q, out, lse, prefix_k, prefix_v, scale, dq,
                                               _KERNEL_BLOCK_BYTES // row_block)
    g = _head_block(q, grad_out, out, lse, delta, group, plen)
    rows = g * lq
    pk, pv = prefix_k[0], prefix_v[0]
    dpk = torch.zeros(pk.shape, dtype=q.dtype, device=q.device)
    dpv = torch.zeros(pv.shape, dtype=q.dtype, device=q.device)
    p = torch.empty(batch, rows, plen, dtype=q.dtype, device=q.device)
    ds = torch.empty_like(p)
    row = torch.empty(batch, rows, dim, dtype=q.dtype, device=q.device) if delta is None else None
    delta_j = torch.empty(batch, rows, dtype=q.dtype, device=q.device) if delta is None else None
    dq_part = None
    for j in range(0, hq, g):
        h = j // group
        q_j, do_j, lse_j = _heads(q, j, g), _heads(grad_out, j, g), _heads(lse, j, g)  # [B, g·Lq(, D)] views
        if delta is None:
            torch.sum(torch.mul(do_j, _heads(out, j, g), out=row), dim=-1, out=delta_j)
        else:
            delta_j = _heads(delta, j, g)
        torch.bmm(q_j, pk[h].t().expand(batch, dim, plen), out=p)
        p.mul_(scale).sub_(lse_j[..., None]).exp_()  # global probabilities of the prefix keys
        torch.bmm(do_j, pv[h].t().expand(batch, dim, plen), out=ds)
        ds.sub_(delta_j[..., None]).mul_(p)
        dq_j = _heads(dq, j, g)
        if dq_j is not None:
            dq_j.baddbmm_(ds, pk[h].expand(batch, plen, dim), alpha=scale)
        else:  # dq in the kernel's [B, L, H, D] order: a group's rows do not fold; add through a [B, g, Lq, D] view
            dq_part = torch.bmm(ds, pk[h].expand(batch, plen, dim), out=dq_part)
            dq[:, j:j + g].add_(dq_part.view(batch, g, lq, dim), alpha=scale)
        # Sum over rows into the one prefix gradient: no [B, P, D] partials. One matmul over all rows when the
        # [B, g·Lq, D] view folds into rows (q/dO strided [B, L, H, D], as transformers passes them); otherwise
        # (q/dO strided [B, H, L, D]) one addbmm_ sums the per-row products in one call.
        q_rows, do_rows = _as_rows(q_j), _as_rows(do_j)
        if q_rows is not None:
            dpk[h].addmm_(ds.view(-1, plen).t(), q_rows, alpha=scale)
        else:
            dpk[h].addbmm_(ds.transpose(1, 2), q_j, alpha=scale)
        if do_rows is not None:
            dpv[h].addmm_(p.view(-1, plen).t(), do_rows)
        else:
            dpv[h].addbmm_(p.transpose(1, 2), do_j)
    return dpk.unsqueeze(0), dpv.unsqueeze(0)


def backward(grad_out, q, k, v, out, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, causal,
             scale, window, delta=None):
    """Exact gradients when the lse output carries no gradient (see the module docstring). `delta`, when given, is
    the caller's row term rowsum(dO·O) [B, Hq, Lq] (reused by the shared-prefix path; computed there otherwise)."""
    batch = q.shape[0]
    q, k, v, prefix_k, prefix_v = _kernel_inputs(q, k, v, prefix_k, prefix_v)
    # A row with no visible key has lse = -inf; +inf makes the kernel's exp(s - lse) an exact 0 instead of NaN.
    lse = lse.masked_fill(torch.isneginf(lse), float("inf")).to(torch.float64 if q.dtype == torch.float64
                                                                 else torch.float32)
    grad_out = _dense(grad_out)
    out = _dense(out)
    if k.shape[2] == 0:  # no sequence keys: no sequence share of the gradient (and no kernel call, see forward)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    else:
        mask, is_causal, _ = _sequence_mask(q, k.shape[2], key_padding_mask, causal, window)
        dq, dk, dv = _flash_backward(grad_out, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
    dprefix_k = dprefix_v = None
    if prefix_mode == PREFIX_SHARED and q.dtype in (torch.float32, torch.float64):
        dq = dq if dq.dtype == q.dtype else dq.to(q.dtype)
        if delta is not None and delta.numel() == 0:  # "not computed": the written-out path makes its own
            delta = None
        dprefix_k, dprefix_v = _shared_prefix_backward(grad_out, q, out, lse.to(q.dtype),
                                                       None if delta is None else delta.to(q.dtype), prefix_k,
                                                       prefix_v, scale, dq)
    elif prefix_mode != PREFIX_NONE:
        pq, pk, pv, pmask, _ = _prefix_problem(q, prefix_k, prefix_v, prefix_index, prefix_mode)
        if prefix_mode == PREFIX_SHARED:
            fold = lambda t: t.transpose(0, 1).reshape(1, t.shape[1], -1, *t.shape[3:])  # noqa: E731
            pgrad, pout, plse = fold(grad_out), fold(out), fold(lse)
        else:
            pgrad, pout, plse = grad_out, out, lse
        dpq, dpk, dpv = _flash_backward(pgrad, pq, pk, pv, pout, plse, 0.0, False, attn_mask=pmask, scale=scale)
        dq = dq.add_(_unfold_shared(dpq, batch) if prefix_mode == PREFIX_SHARED else dpq)  # dq is the kernel's
        if prefix_mode == PREFIX_POOL:  # scatter each row's slots back into the pool entries they read
            slots, plen = prefix_index.shape[1], prefix_k.shape[2]

            def scatter(rows, prefix):
                per_slot = rows.reshape(batch, prefix.shape[1], slots, plen, prefix.shape[3]).transpose(1, 2)
                total = torch.zeros(prefix.shape, dtype=torch.float32 if prefix.dtype != torch.float64
                                    else torch.float64, device=prefix.device)
                total.index_add_(0, prefix_index.clamp(min=0).reshape(-1), per_slot.flatten(0, 1).to(total.dtype))
                return total.to(prefix.dtype)

            dpk, dpv = scatter(dpk, prefix_k), scatter(dpv, prefix_v)
        dprefix_k, dprefix_v = dpk, dpv
    return dq, dk, dv, dprefix_k, dprefix_v
