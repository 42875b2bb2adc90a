"""mix_prompts: soft mixture of prompt-pool entries.

Dense: weights [B, N] -> out[b] = sum_n weights[b, n] * pool[n]  (a matmul on the flattened pool).
Sparse: weights [B, k], index [B, k] -> out[b] = sum_j weights[b, j] * pool[index[b, j]]  (-1 = empty slot).
Gradients reach pool and weights. Custom ops fastprompt::mix_prompts / fastprompt::mix_prompts_backward.
The backends and their interface: fastprompt/ops/gather_mix_backends.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .gather_mix_backends import backend_class, plain_torch_path, resolve_backend
from .gather_mix_inputs import check_index, check_pool
from .index_range import check_index_values, checked_index

__all__ = ["mix_prompts"]


@torch.library.custom_op("fastprompt::mix_prompts", mutates_args=())
def _mix_op(pool: Tensor, weights: Tensor, index: Optional[Tensor], backend: str) -> Tensor:
    if index is not None:  # runs on real tensors under torch.compile too
        check_index_values(index, pool.shape[0], "index")
    return backend_class(backend).mix_forward(pool, weights, index)


@_mix_op.register_fake
def _(pool, weights, index, backend):
    return pool.new_empty((weights.shape[0], pool.shape[1]))


@torch.library.custom_op("fastprompt::mix_prompts_backward", mutates_args=())
def _mix_backward_op(
    grad_out: Tensor, pool: Tensor, weights: Tensor, index: Optional[Tensor], backend: str
) -> Tuple[Tensor, Tensor]:
    return backend_class(backend).mix_backward(grad_out, pool, weights, index)


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
    if backend_class(backend).DIFFERENTIATED_BY_AUTOGRAD:  # the reference
        return backend_class(backend).mix(pool, weights,
                                          None if index is None else checked_index(index, pool.shape[0], "index"))
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
