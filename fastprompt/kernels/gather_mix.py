"""Triton kernels for prompt selection: hard gather and soft mixture of pool entries.

Every tensor arrives flattened: pool [N, F] (an entry is F contiguous values), index [B, K] int64 (-1 = empty
slot), weights [B, K]. "Dense" mixing uses every pool entry (K == N, index implicit = arange(N)).
Grid axis 0 walks output rows (or pool entries), axis 1 walks F in BLOCK_F tiles; small loops run over K or B.
Accumulation is fp32 for 16/32-bit inputs and fp64 for fp64 inputs (tests run in fp64 under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreter_compat

interpreter_compat.apply()  # triton < 3.8 under numpy >= 2.5 (interpreter_compat.py)

__all__ = ["gather_forward", "gather_backward", "mix_forward", "mix_backward"]


@triton.jit
def _select_mix_fwd_kernel(
    pool_ptr, index_ptr, weights_ptr, out_ptr,
    F, K,
    stride_pool, stride_index, stride_weights, stride_out,
    HAS_WEIGHTS: tl.constexpr, DENSE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # out[row, f] = sum_j w[row, j] * pool[index[row, j], f]   (w = 1 without weights; index = j when DENSE)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    in_f = offs < F
    acc = tl.zeros([BLOCK_F], dtype=ACC_DTYPE)
    for j in range(0, K):
        if DENSE:
            entry = j
        else:
            entry = tl.load(index_ptr + row * stride_index + j)
        safe = tl.maximum(entry, 0).to(tl.int64)
        # An empty slot (-1) reads nothing: its bound is 0. (A `tensor & scalar-bool` mask is refused by Triton
        # 3.9's interpreter, so liveness enters as a bound of the tensor condition.)
        live_f = offs < tl.where(entry >= 0, F, 0)
        vals = tl.load(pool_ptr + safe * stride_pool + offs, mask=live_f, other=0.0).to(ACC_DTYPE)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + row * stride_weights + j).to(ACC_DTYPE)
            vals = vals * w
        acc += vals
    tl.store(out_ptr + row * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=in_f)


@triton.jit
def _scatter_pool_grad_kernel(
    grad_ptr, index_ptr, weights_ptr, dpool_ptr,
    F, K,
    stride_grad, stride_index, stride_weights, stride_dpool,
    HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # dpool[index[row, j]] += w[row, j] * grad[row]: index_add semantics through atomics, one (row, j) each.
    pid = tl.program_id(0)
    row = pid // K
    j = pid % K
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    entry = tl.load(index_ptr + row * stride_index + j)
    safe = tl.maximum(entry, 0).to(tl.int64)
    live_f = offs < tl.where(entry >= 0, F, 0)  # empty slot: bound 0 (see _select_mix_fwd_kernel)
    g = tl.load(grad_ptr + row * stride_grad + offs, mask=live_f, other=0.0).to(ACC_DTYPE)
    if HAS_WEIGHTS:
        w = tl.load(weights_ptr + row * stride_weights + j).to(ACC_DTYPE)
        g = g * w
    tl.atomic_add(dpool_ptr + safe * stride_dpool + offs, g, mask=live_f)


@triton.jit
def _dense_pool_grad_kernel(
    grad_ptr, weights_ptr, dpool_ptr,
    F, B,
    stride_grad, stride_weights, stride_dpool,
    ACC_DTYPE: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # dpool[n] = sum_b w[b, n] * grad[b]  (weights^T @ grad), deterministic: one program per (entry, F tile).
    n = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    in_f = offs < F
    acc = tl.zeros([BLOCK_F], dtype=ACC_DTYPE)
    for b in range(0, B):
        w = tl.load(weights_ptr + b * stride_weights + n).to(ACC_DTYPE)
        g = tl.load(grad_ptr + b * stride_grad + offs, mask=in_f, other=0.0).to(ACC_DTYPE)
        acc += w * g
    tl.store(dpool_ptr + n * stride_dpool + offs, acc.to(dpool_ptr.dtype.element_ty), mask=in_f)


@triton.jit
def _weights_grad_kernel(
    grad_ptr, pool_ptr, index_ptr, dweights_ptr,
    F, K,
    stride_grad, stride_pool, stride_index, stride_dweights,
    DENSE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_F: tl.constexpr,
):
    # dweights[b, j] = <grad[b], pool[index[b, j]]>; 0 for an empty slot.
    pid = tl.program_id(0)
    b = pid // K
    j = pid % K
    if DENSE:
        entry = j
    else:
        entry = tl.load(index_ptr + b * stride_index + j)
    safe = tl.maximum(entry, 0).to(tl.int64)
    live_end = tl.where(entry >= 0, F, 0)  # empty slot: bound 0 (see _select_mix_fwd_kernel)
    acc = tl.zeros([BLOCK_F], dtype=ACC_DTYPE)
    for f0 in range(0, F, BLOCK_F):
        offs = f0 + tl.arange(0, BLOCK_F)
        in_f = offs < F
        g = tl.load(grad_ptr + b * stride_grad + offs, mask=in_f, other=0.0).to(ACC_DTYPE)
        p = tl.load(pool_ptr + safe * stride_pool + offs, mask=offs < live_end, other=0.0).to(ACC_DTYPE)
        acc += g * p
    tl.store(dweights_ptr + b * stride_dweights + j, tl.sum(acc, axis=0).to(dweights_ptr.dtype.element_ty))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_f(F: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(F)))


def _grad_buffer(shape, like: torch.Tensor) -> torch.Tensor:
    # Atomic accumulation in 16-bit loses too much; accumulate in fp32 and cast once.
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.zeros(shape, dtype=dtype, device=like.device)


def gather_forward(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """pool [N, F], index [M] int64 -> [M, F]."""
    pool = pool.contiguous()
    index = index.contiguous()
    M, F = index.shape[0], pool.shape[1]
    out = torch.empty((M, F), dtype=pool.dtype, device=pool.device)
    if M == 0 or F == 0:
        return out
    BLOCK_F = _block_f(F)
    grid = (M, triton.cdiv(F, BLOCK_F))
    _select_mix_fwd_kernel[grid](
        pool, index, pool, out, F, 1, pool.stride(0), 1, 0, out.stride(0),
        HAS_WEIGHTS=False, DENSE=False, ACC_DTYPE=_acc_dtype(pool.dtype), BLOCK_F=BLOCK_F,
    )
    return out


def gather_backward(grad_out: torch.Tensor, index: torch.Tensor, num_entries: int) -> torch.Tensor:
    """grad_out [M, F], index [M] -> dpool [num_entries, F] (scatter-add, -1 rows dropped)."""
    grad_out = grad_out.contiguous()
    index = index.contiguous()
    M, F = grad_out.shape
    dpool = _grad_buffer((num_entries, F), grad_out)
    if M and F and num_entries:
        BLOCK_F = _block_f(F)
        grid = (M, triton.cdiv(F, BLOCK_F))
        _scatter_pool_grad_kernel[grid](
            grad_out, index, grad_out, dpool, F, 1, grad_out.stride(0), 1, 0, dpool.stride(0),
            HAS_WEIGHTS=False, ACC_DTYPE=_acc_dtype(dpool.dtype), BLOCK_F=BLOCK_F,
        )
    return dpool.to(grad_out.dtype)


def mix_forward(pool: torch.Tensor, weights: torch.Tensor, index) -> torch.Tensor:
    """pool [N, F], weights [B, K], index None (K == N) or [B, K] int64 -> [B, F]."""
    pool = pool.contiguous()
    weights = weights.contiguous()
    dense = index is None
    index = weights if dense else index.contiguous()  # placeholder pointer when dense
    B, K = weights.shape
    F = pool.shape[1]
    out = torch.empty((B, F), dtype=pool.dtype, device=pool.device)
    if B == 0 or F == 0:
        return out
    BLOCK_F = _block_f(F)
    grid = (B, triton.cdiv(F, BLOCK_F))
    _select_mix_fwd_kernel[grid](
        pool, index, weights, out, F, K, pool.stride(0), 0 if dense else index.stride(0), weights.stride(0),
        out.stride(0), HAS_WEIGHTS=True, DENSE=dense, ACC_DTYPE=_acc_dtype(pool.dtype), BLOCK_F=BLOCK_F,
    )
    return out


def mix_backward(grad_out: torch.Tensor, pool: torch.Tensor, weights: torch.Tensor, index):
    """-> (dpool [N, F], dweights [B, K])."""
    grad_out = grad_out.contiguous()
    pool = pool.contiguous()
    weights = weights.contiguous()
    dense = index is None
    B, K = weights.shape
    N, F = pool.shape
    acc = _acc_dtype(pool.dtype)
    dweights = torch.zeros((B, K), dtype=weights.dtype, device=weights.device)
    if B == 0 or F == 0 or N == 0:
        return torch.zeros_like(pool), dweights
    BLOCK_F = _block_f(F)
    if dense:
        dpool = torch.empty_like(pool)
        _dense_pool_grad_kernel[(N, triton.cdiv(F, BLOCK_F))](
            grad_out, weights, dpool, F, B, grad_out.stride(0), weights.stride(0), dpool.stride(0),
            ACC_DTYPE=acc, BLOCK_F=BLOCK_F,
        )
        idx_arg, idx_stride = weights, 0
    else:
        index = index.contiguous()
        dpool_acc = _grad_buffer((N, F), pool)
        if K:
            _scatter_pool_grad_kernel[(B * K, triton.cdiv(F, BLOCK_F))](
                grad_out, index, weights, dpool_acc, F, K, grad_out.stride(0), index.stride(0),
                weights.stride(0), dpool_acc.stride(0), HAS_WEIGHTS=True, ACC_DTYPE=_acc_dtype(dpool_acc.dtype),
                BLOCK_F=BLOCK_F,
            )
        dpool = dpool_acc.to(pool.dtype)
        idx_arg, idx_stride = index, index.stride(0)
    if K:
        _weights_grad_kernel[(B * K,)](
            grad_out, pool, idx_arg, dweights, F, K, grad_out.stride(0), pool.stride(0), idx_stride,
            dweights.stride(0), DENSE=dense, ACC_DTYPE=acc, BLOCK_F=min(BLOCK_F, 256),
        )
    return dpool, dweights
