"""gather_prompts: hard selection of prompt-pool entries, out[b, s] = pool[index[b, s]] (-1 -> zeros).

The backward scatter-adds into the pool gradient (index_add semantics) and never builds a [B, N, ...] broadcast.
Registered as the torch.library custom ops fastprompt::gather_prompts / fastprompt::gather_prompts_backward so it
traces under torch.compile (fake impls) and has autograd. The backends and their
interface: fastprompt/ops/gather_mix_backends.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gather_mix_backends import backend_class, plain_torch_path, resolve_backend
from .gather_mix_inputs import check_index, check_pool
from .index_range import check_index_values, checked_index

__all__ = ["gather_prompts"]


@torch.library.custom_op("fastprompt::gather_prompts", mutates_args=())
def _gather_op(pool: Tensor, index: Tensor, backend: str) -> Tensor:
    check_index_values(index, pool.shape[0], "index")  # runs on real tensors under torch.compile too
    return backend_class(backend).gather_forward(pool, index)


@_gather_op.register_fake
def _(pool, index, backend):
    return pool.new_empty((index.shape[0], pool.shape[1]))


@torch.library.custom_op("fastprompt::gather_prompts_backward", mutates_args=())
def _gather_backward_op(grad_out: Tensor, index: Tensor, num_entries: int, backend: str) -> Tensor:
    return backend_class(backend).gather_backward(grad_out, index, num_entries)


@_gather_backward_op.register_fake
def _(grad_out, index, num_entries, backend):
    return grad_out.new_empty((num_entries, grad_out.shape[1]))


def _setup_context(ctx, inputs, output):
    pool, index, backend = inputs
    ctx.save_for_backward(index)
    ctx.num_entries = pool.shape[0]
    ctx.backend = backend


def _backward(ctx, grad_out):
    (index,) = ctx.saved_tensors
    return _gather_backward_op(grad_out.contiguous(), index, ctx.num_entries, ctx.backend), None, None


_gather_op.register_autograd(_backward, setup_context=_setup_context)


def gather_prompts(pool: Tensor, index: Tensor, *, backend: str = "auto") -> Tensor:
    """Select pool entries by index.

    pool: [N, ...] floating; index: [B] or [B, S] integer in [-1, N) (-1 = empty slot, gives zeros).
    Returns [B, ...] or [B, S, ...] in pool's dtype. Gradient flows to pool only (scatter-add per entry).
    backend: "auto" | "cuda" | "triton" | "torch" | "reference".
    """
    check_pool(pool)
    check_index(index, pool, "index", (1, 2))
    backend = resolve_backend(backend, pool, index)
    if backend_class(backend).DIFFERENTIATED_BY_AUTOGRAD:  # the reference
        return backend_class(backend).gather(pool, checked_index(index, pool.shape[0], "index"))
    if plain_torch_path(backend, pool) and pool.device.type == "cpu" and index.dtype in _SELECT_INDEX_DTYPES:
        return _cpu_gather(pool, index)
    entry_shape = pool.shape[1:]
    flat_pool = pool.reshape(pool.shape[0], -1)
    flat_index = index.reshape(-1).long().contiguous()
    if plain_torch_path(backend, pool):
        out = _plain_gather(flat_pool, flat_index, check_index_values(flat_index, pool.shape[0], "index"))
    else:
        out = _gather_op(flat_pool, flat_index, backend)
    return out.reshape(*index.shape, *entry_shape)


def _plain_gather(flat_pool: Tensor, flat_index: Tensor, has_empty: bool) -> Tensor:
    """The torch backend as plain autograd-tracked ops: index_select (backward: zeros + index_add_, the same
    scatter-add as the custom op's, in the same order), empty slots zeroed by an out-of-place masked_fill."""
    if not has_empty:
        return flat_pool.index_select(0, flat_index)
    out = flat_pool.index_select(0, flat_index.clamp_min(0))
    return out.masked_fill((flat_index < 0)[:, None], 0)


_SELECT_INDEX_DTYPES = (torch.int64, torch.int32)  # what index_select takes as it is


def _cpu_gather(pool: Tensor, index: Tensor) -> Tensor:
    """The plain torch path on the CPU, with no separate range check in the common call.

    On the CPU index_select bounds-checks every entry against [0, N) itself (IndexError, before any output is
    formed), so an index with no empty slot needs neither the aminmax pass of check_index_values nor flattened
    views of the pool: at prompt-pool sizes those cost as much as the gather (what `pool[index]` does not pay).
    Only an index index_select refuses is looked at: -1 entries (empty slots) take the masked gather, anything
    else raises check_index_values' ValueError. Backward: index_select's own (zeros + index_add_ into the pool
    gradient). On CUDA an out-of-range index_select is a device-side assert, so CUDA keeps the explicit check."""
    flat = index if index.dim() == 1 else index.reshape(-1)
    try:
        out = pool.index_select(0, flat)
    except IndexError:
        if not check_index_values(flat, pool.shape[0], "index"):  # raises for values outside [-1, N)
            raise
        empty = (flat < 0).view(-1, *([1] * (pool.dim() - 1)))
        out = pool.index_select(0, flat.clamp_min(0)).masked_fill(empty, 0)
    return out if index.dim() == 1 else out.reshape(*index.shape, *pool.shape[1:])
