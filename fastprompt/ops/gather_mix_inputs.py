"""Argument checks shared by gather_prompts and mix_prompts (the prompt-selection ops)."""
from __future__ import annotations

import torch


def check_pool(pool) -> None:
    if not isinstance(pool, torch.Tensor):
        raise TypeError(f"pool must be a torch.Tensor, got {type(pool).__name__}")
    if not pool.is_floating_point():
        raise TypeError(f"pool must be a floating-point tensor, got dtype {pool.dtype}")
    if pool.dim() < 1:
        raise ValueError("pool must have at least one dimension [N, ...], got a 0-d tensor")


def check_index(index, pool: torch.Tensor, name: str, allowed_dims, batch=None) -> None:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got dtype {index.dtype}")
    if index.dim() not in allowed_dims:
        shapes = " or ".join({1: "[B]", 2: "[B, S]"}.get(d, f"{d}-d") for d in allowed_dims)
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(index.shape)}")
    if index.device != pool.device:
        raise ValueError(f"{name} is on {index.device} but pool is on {pool.device}; put them on one device")
    # The values ([-1, N)) are checked where the op runs (fastprompt/ops/index_range.py), also under torch.compile.
