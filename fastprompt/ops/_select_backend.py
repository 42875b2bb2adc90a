"""Backend resolution shared by gather_prompts and mix_prompts (the prompt-selection ops).

Backends: "cuda" (fastprompt/ops/gather_mix_cuda.py, optional, CUDA tensors only), "triton" (fastprompt/kernels/gather_mix.py,
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch" (exact PyTorch composition) and "reference"
(fastprompt.reference_prompts, plain autograd). "auto" picks cuda, then triton, then torch.
"""

from __future__ import annotations

import importlib
import os

import torch

from fastprompt.kernels import TRITON_INSTALLED

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_triton_kernels():
    """fastprompt/kernels/gather_mix.py, imported on first use (it imports triton)."""
    return importlib.import_module("fastprompt.kernels.gather_mix")


def load_cuda_backend():
    """The optional CUDA extension wrapper, or None when it is absent or unusable."""
    try:
        module = importlib.import_module("fastprompt.ops.gather_mix_cuda")
    except ImportError:
        return None
    try:
        return module if module.available() else None
    except Exception:  # an extension that fails its own probe is treated as absent
        return None


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return the concrete backend for these tensors, or raise a clear error."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        if on_cuda:
            if load_cuda_backend() is not None:
                return "cuda"
            if TRITON_INSTALLED:
                return "triton"
        return "torch"
    if backend == "cuda":
        if not on_cuda:
            raise RuntimeError("backend='cuda' needs CUDA tensors")
        if load_cuda_backend() is None:
            raise RuntimeError("backend='cuda' is unavailable: fastprompt.ops.gather_mix_cuda is missing or not built")
    if backend == "triton":
        if not TRITON_INSTALLED:
            raise RuntimeError("backend='triton' needs the triton package")
        if not on_cuda and not _interpreting():
            raise RuntimeError(
                "backend='triton' got CPU tensors: Triton kernels run on CUDA tensors, or on the CPU only under "
                "TRITON_INTERPRET=1 (set it before triton is imported)"
            )
    return backend


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


# Pools of these dtypes are gathered / mixed by plain autograd-tracked indexing and matmuls on the torch backend
# in eager mode (index_select forward, index_add_ backward): what `pool[index]` and `weights @ pool` do, with no
# custom-op dispatch (which costs more than the work at prompt-pool sizes). Half precision keeps the custom ops,
# whose backward accumulates in float32; torch.compile keeps them too (their bodies check the index at run time).
PLAIN_TORCH_DTYPES = (torch.float32, torch.float64)


def plain_torch_path(backend: str, pool: torch.Tensor) -> bool:
    return backend == "torch" and pool.dtype in PLAIN_TORCH_DTYPES and not torch.compiler.is_compiling()
