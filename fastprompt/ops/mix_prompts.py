"""mix_prompts: soft mixture of prompt-pool entries.

Dense: weights [B, N] -> out[b] = sum_n weights[b, n] * pool[n]  (a matmul on the flattened pool).
Sparse: weights [B, k], index [B, k] -> out[b] = sum_j weights[b, j] * pool[index[b, j]]  (-1 = empty slot).
Gradients reach pool and weights. Custom ops fastprompt::mix_prompts / fastprompt::mix_prompts_backward.
CUDA extension interface (optional fastprompt/ops/gather_mix_cuda.py), flattened layout:
mix_forward(pool [N, F], weights [B, K], index None | [B, K] int64) -> [B, F];
mix_backward(grad_out [B, F], pool, weights, index) -> (dpool [N, F], dweights [B, K]).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._select_backend import (check_index, check_pool, load_cuda_backend, load_triton_kernels, plain_torch_path,
                              resolve_backend)
from .index_range import check_index_values, checked_index

__all__ = ["mix_prompts"]


def _torch_forward(pool: Tensor, weights: Tensor, index: Optional[Tensor]) -> Tensor:
    if index is None:
        return weights @ pool
    live = index >= 0
    w = weights.masked_fill(~live, 0)
    picked = pool.index_select(0, index.clamp_min(0).reshape(-1)).reshape(*index.shape, pool.shape[1])
    return torch.einsum("bk,bkf->bf", w, picked)


def _torch_backward(grad_out: Tensor, pool: Tensor, weights: Tensor, index: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if index is None:
        return weights.transpose(0, 1) @ grad_out, grad_out @ pool.transpose(0, 1)
    live = index >= 0
    safe = index.clamp_min(0)
    picked = pool.index_select(0, safe.reshape(-1)).reshape(*index.shape, pool.shape[1])
    dweights = torch.einsum("bf,bkf->bk", grad_out, picked).masked_fill(~live, 0)
    w = weights.masked_fill(~live, 0)
    acc_dtype = pool.dtype if pool.dtype in (torch.float32, torch.float64) else torch.float32
    contrib = (w[:, :, None] * grad_out[:, None, :]).reshape(-1, pool.shape[1]).to(acc_dtype)
    dpool = torch.zeros(pool.shape, dtype=acc_dtype, device=pool.device).index_add_(0, safe.reshape(-1), contrib)
    return dpool.to(pool.dtype), dweights


@torch.library.custom_op("fastprompt::mix_prompts", mutates_args=())
def _mix_op(pool: Tensor, weights: Tensor, index: Optional[Tensor], backend: str) -> Tensor:
    if index is not None:  # runs on real tensors under torch.compile too
        check_index_values(index, pool.shape[0], "index")
    if backend == "cuda":
        return load_cuda_backend().mix_forward(pool, weights, index)
    if backend == "triton":
        return load_triton_kernels().mix_forward(pool, weights, index)
    return _torch_forward(pool, weights, index)


@_mix_op.register_fake
def _(pool, weights, index, backend):
    return pool.new_empty((weights.shape[0], pool.shape[1]))


@torch.library.custom_op("fastprompt::mix_prompts_backward", mutates_args=())
def _mix_backward_op(
    grad_out: Tensor, pool: Tensor, weights: Tensor, index: Optional[Tensor], backend: str
) -> Tuple[Tensor, Tensor]:
    if backend == "cuda":
        dpool, dweights = load_cuda_backend().mix_backward(grad_out, pool, weights, index)
    elif backend == "triton":
        dpool, dweights = load_triton_kernels().mix_backward(grad_out, pool, weights, index)
    else:
        dpool, dweights = _torch_backward(grad_out, pool, weights, index)
    return dpool, dweights


@_mix_backward_op.register_fake
def _(grad_out, pool, weights, index, backend):
    return torch.empty_like(pool), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    pool, weights, index, backend = inputs
    ctx.save_for_backward(pool, weights, index)
    ctx.backend = backend


def _backward(ctx, grad_out):
    pool, weights, index = ctx.saved_tensors
    dpool, dweights = _mix_backward_op(grad_out.contiguous(), pool, weights, index, ctx.backend)
    return dpool, dweights, None, None


_mix_op.register_autograd(_backward, setup_context=_setup_context)


def mix_prompts(pool: Tensor, weights: Tensor, index: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """Weighted sum of pool entries per batch row.

    pool [N, ...] floating; weights [B, N] (index None) or [B, k] with index [B, k] integer in [-1, N).
    weights must have pool's dtype and device. Returns [B, ...]. Gradients for pool and weights.
    backend: "auto" | "cuda" | "triton" | "torch" | "reference".
    """
    check_pool(pool)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dtype != pool.dtype:
        raise TypeError(f"weights must have pool's dtype {pool.dtype}, got {weights.dtype}")
    if weights.device != pool.device:
        raise ValueError(f"weights is on {weights.device} but pool is on {pool.device}; put them on one device")
    if weights.dim() != 2:
        raise ValueError(f"weights must be [B, N] or [B, k], got shape {tuple(weights.shape)}")
    if index is None:
        if weights.shape[1] != pool.shape[0]:
            raise ValueError(
                f"weights must be [B, N] with N = {pool.shape[0]} pool entries when index is None, "
                f"got shape {tuple(weights.shape)}"
            )
    else:
        check_index(index, pool, "index", (2,))
        if index.shape != weights.shape:
            raise ValueError(
                f"index must have weights' shape {tuple(weights.shape)} ([B, k]), got {tuple(index.shape)}"
            )
    tensors = (pool, weights) if index is None else (pool, weights, index)
    backend = resolve_backend(backend, *tensors)
    if backend == "reference":
        from fastprompt.reference_prompts import mix_prompts as reference

        return reference(pool, weights, None if index is None else checked_index(index, pool.shape[0], "index"))
    entry_shape = pool.shape[1:]
    flat_pool = pool.reshape(pool.shape[0], -1)
    flat_index = None if index is None else index.long().contiguous()
    if index is None and plain_torch_path(backend, pool):
        # dense mixing is one matmul: plain autograd (backward: the same two matmuls as the custom op's) without
        # the custom-op dispatch, which costs more than the work at prompt-pool sizes
        out = weights @ flat_pool
    else:
        out = _mix_op(flat_pool, weights.contiguous(), flat_index, backend)
    return out.reshape(weights.shape[0], *entry_shape)
