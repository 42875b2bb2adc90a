"""CUDA kernels for gather_prompts / mix_prompts (csrc/gather_prompts.cu, csrc/mix_prompts.cu) in the flattened
layout the ops use:

    gather_forward(pool [N, F], index [M] int64)          -> [M, F]            (pool dtype; -1 -> zeros)
    gather_backward(grad_out [M, F], index [M], N)        -> [N, F]            (grad_out dtype; fp32 atomics inside)
    mix_forward(pool [N, F], weights [B, K], index)       -> [B, F]            (index None: K == N, dense)
    mix_backward(grad_out [B, F], pool, weights, index)   -> ([N, F] pool dtype, [B, K] weights dtype)

Kernels take float32/float16/bfloat16 pools and accumulate in fp32; weights are computed in fp32. float64 (tests,
CPU-precision runs) falls back to the exact torch composition here, so any CUDA tensor is accepted.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._cuda_build_info import extension

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    return extension() is not None and torch.cuda.is_available()


def _kernel_ok(*tensors: Tensor) -> bool:
    return all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in tensors)


def gather_forward(pool: Tensor, index: Tensor) -> Tensor:
    index = index.reshape(-1).to(torch.int64)
    if not _kernel_ok(pool):
        out = pool.index_select(0, index.clamp_min(0))
        return out.masked_fill((index < 0)[:, None], 0)
    return extension().gather_fwd(pool, index)


def gather_backward(grad_out: Tensor, index: Tensor, num_entries: int) -> Tensor:
    index = index.reshape(-1).to(torch.int64)
    if not _kernel_ok(grad_out):
        dpool = torch.zeros((num_entries, grad_out.shape[1]), dtype=grad_out.dtype, device=grad_out.device)
        return dpool.index_add_(0, index.clamp_min(0), grad_out.masked_fill((index < 0)[:, None], 0))
    return extension().gather_bwd(grad_out, index, int(num_entries)).to(grad_out.dtype)


def _entries(pool: Tensor, weights: Tensor, index: Optional[Tensor]) -> Tensor:
    if index is None:
        return pool.unsqueeze(0).expand(weights.shape[0], *pool.shape)
    return pool.index_select(0, index.clamp_min(0).reshape(-1)).reshape(*index.shape, pool.shape[1]) * (
        index >= 0)[..., None].to(pool.dtype)


def mix_forward(pool: Tensor, weights: Tensor, index: Optional[Tensor]) -> Tensor:
    if index is not None:
        index = index.to(torch.int64)
    if not _kernel_ok(pool):
        return torch.einsum("bk,bkf->bf", weights.to(pool.dtype), _entries(pool, weights, index))
    return extension().mix_fwd(pool, weights.float(), index)


def mix_backward(grad_out: Tensor, pool: Tensor, weights: Tensor, index: Optional[Tensor]):
    if index is not None:
        index = index.to(torch.int64)
    if not _kernel_ok(pool, grad_out):
        w = weights.to(pool.dtype)
        dweights = torch.einsum("bf,bkf->bk", grad_out.to(pool.dtype), _entries(pool, weights, index))
        contrib = w[:, :, None] * grad_out[:, None, :].to(pool.dtype)
        if index is None:
            dpool = contrib.sum(0)
        else:
            live = (index >= 0)[..., None].to(pool.dtype)
            dpool = torch.zeros_like(pool).index_add_(0, index.clamp_min(0).reshape(-1),
                                                     (contrib * live).reshape(-1, pool.shape[1]))
        return dpool, dweights.to(weights.dtype)
    dpool, dweights = extension().mix_bwd(grad_out.to(pool.dtype), pool, weights.float(), index)
    return dpool.to(pool.dtype), dweights.to(weights.dtype)
