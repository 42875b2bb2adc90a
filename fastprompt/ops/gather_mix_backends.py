"""The backends of the prompt-selection ops (gather_prompts, mix_prompts) and the choice among them.

As for prefix_attention (prefix_attention_backend / _dispatch): each backend is a class that declares where it
runs (DEVICES, DEVICE_HINT) and says why it is unavailable (`unavailable`); `not_supported_reasons(*tensors)` is
the generic check over both. Backends: "cuda" (the optional extension, fastprompt/ops/gather_mix_cuda.py),
"triton" (fastprompt/kernels/gather_mix.py: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "torch"
(exact PyTorch composition, any device) and "reference" (fastprompt.reference_prompts, differentiated by plain
autograd). `auto` walks the device's priority list (cuda, triton, torch on CUDA; torch elsewhere); an explicit
backend that cannot run the call raises a RuntimeError that lists every backend's reasons.

A backend implements, on the flattened layout (pool [N, F], index int64 [M] / [B, K]):
gather_forward(pool, index) -> [M, F]; gather_backward(grad_out [M, F], index, num_entries) -> [N, F];
mix_forward(pool, weights [B, K], index None | [B, K]) -> [B, F];
mix_backward(grad_out [B, F], pool, weights, index) -> (dpool [N, F], dweights [B, K]).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import kernels  # its gather_mix module imports triton; the package loads it on first use
from .. import reference_prompts
from ..kernels import TRITON_INSTALLED  # looked up once, outside traced code
from . import gather_mix_cuda
from .prefix_attention_dispatch import BACKENDS  # every op takes the same backend names

PRIORITY = {"cuda": ("cuda", "triton", "torch")}
DEFAULT_PRIORITY = ("torch",)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load_triton_kernels():
    """fastprompt/kernels/gather_mix.py, imported on first use (it imports triton)."""
    return kernels.gather_mix


def load_cuda_backend():
    """The wrapper of the optional CUDA extension (gather_mix_cuda), or None when the extension is absent or
    unusable."""
    try:
        return gather_mix_cuda if gather_mix_cuda.available() else None
    except Exception:  # an extension that fails its own probe is treated as absent
        return None


class GatherMixBackend:
    NAME = ""
    DESCRIPTION = ""
    DEVICES: Optional[tuple] = None  # device types it runs on; None = any
    DEVICE_HINT = ""
    DIFFERENTIATED_BY_AUTOGRAD = False  # True: the op calls gather / mix directly (the reference)

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return None

    @classmethod
    def devices(cls) -> Optional[tuple]:
        return cls.DEVICES

    @classmethod
    def not_supported_reasons(cls, *tensors: Tensor) -> list:
        reasons = []
        devices = cls.devices()
        if devices is not None:
            found = sorted({t.device.type for t in tensors if t.device.type not in devices})
            if found:
                reasons.append(f"{cls.DESCRIPTION} need {' or '.join(d.upper() for d in devices)} tensors, got "
                               f"{', '.join(found)}{cls.DEVICE_HINT}")
        missing = cls.unavailable()
        if missing is not None:
            reasons.append(missing)
        return reasons


class TorchGatherMix(GatherMixBackend):
    NAME = "torch"
    DESCRIPTION = "the torch ops"

    @staticmethod
    def gather_forward(pool: Tensor, index: Tensor) -> Tensor:
        live = index >= 0
        out = pool.index_select(0, index.clamp_min(0))
        return out.masked_fill_(~live[:, None], 0)  # out is index_select's fresh result

    @staticmethod
    def gather_backward(grad_out: Tensor, index: Tensor, num_entries: int) -> Tensor:
        acc_dtype = grad_out.dtype if grad_out.dtype in (torch.float32, torch.float64) else torch.float32
        # Empty slots (-1) add into a scratch row N that is dropped afterwards: no host sync to filter them out and
        # no zeroed copy of grad_out.
        target = torch.where(index >= 0, index, num_entries)
        dpool = torch.zeros((num_entries + 1, grad_out.shape[1]), dtype=acc_dtype, device=grad_out.device)
        dpool.index_add_(0, target, grad_out if grad_out.dtype == acc_dtype else grad_out.to(acc_dtype))
        return dpool[:num_entries].to(grad_out.dtype)

    @staticmethod
    def mix_forward(pool: Tensor, weights: Tensor, index: Optional[Tensor]) -> Tensor:
        if index is None:
            return weights @ pool
        live = index >= 0
        w = weights.masked_fill(~live, 0)
        picked = pool.index_select(0, index.clamp_min(0).reshape(-1)).reshape(*index.shape, pool.shape[1])
        return torch.einsum("bk,bkf->bf", w, picked)

    @staticmethod
    def mix_backward(grad_out: Tensor, pool: Tensor, weights: Tensor,
                     index: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
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


class KernelGatherMix(GatherMixBackend):
    """A backend whose four functions live in a kernel module loaded on first use (`kernels()`), which implements
    the flattened-layout interface of this module's docstring."""

    @classmethod
    def kernels(cls):
        raise NotImplementedError

    @classmethod
    def gather_forward(cls, pool, index):
        return cls.kernels().gather_forward(pool, index)

    @classmethod
    def gather_backward(cls, grad_out, index, num_entries):
        return cls.kernels().gather_backward(grad_out, index, num_entries)

    @classmethod
    def mix_forward(cls, pool, weights, index):
        return cls.kernels().mix_forward(pool, weights, index)

    @classmethod
    def mix_backward(cls, grad_out, pool, weights, index):
        return cls.kernels().mix_backward(grad_out, pool, weights, index)


class TritonGatherMix(KernelGatherMix):
    NAME = "triton"
    DESCRIPTION = "triton kernels"
    DEVICES = ("cuda",)
    DEVICE_HINT = (" (Triton kernels run on CUDA tensors, or on the CPU only under TRITON_INTERPRET=1, set before "
                   "triton is imported)")

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return None if TRITON_INSTALLED else "backend='triton' needs the triton package"

    @classmethod
    def devices(cls):
        return ("cuda", "cpu") if _interpreting() else cls.DEVICES

    @classmethod
    def kernels(cls):
        return load_triton_kernels()


class CudaGatherMix(KernelGatherMix):
    NAME = "cuda"
    DESCRIPTION = "the CUDA kernels"
    DEVICES = ("cuda",)

    @classmethod
    def unavailable(cls) -> Optional[str]:
        if load_cuda_backend() is None:
            return "backend='cuda' is unavailable: fastprompt.ops.gather_mix_cuda is missing or not built"
        return None

    @classmethod
    def kernels(cls):
        return load_cuda_backend()


class ReferenceGatherMix(GatherMixBackend):
    NAME = "reference"
    DESCRIPTION = "the reference ops"
    DIFFERENTIATED_BY_AUTOGRAD = True

    gather = staticmethod(reference_prompts.gather_prompts)
    mix = staticmethod(reference_prompts.mix_prompts)


_CLASSES = {cls.NAME: cls for cls in (CudaGatherMix, TritonGatherMix, TorchGatherMix, ReferenceGatherMix)}


def backend_class(name: str):
    return _CLASSES[name]


def _every_reason(tensors) -> str:
    lines = []
    for name in BACKENDS[1:]:
        reasons = _CLASSES[name].not_supported_reasons(*tensors)
        lines.append(f"  {name}: " + ("; ".join(reasons) if reasons else "can run it"))
    return "\n".join(lines)


def resolve_backend(backend: str, *tensors: Tensor) -> str:
    """The concrete backend for these tensors, or a clear error (RuntimeError listing every backend's reasons
    when the named backend cannot run them)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reasons = _CLASSES[backend].not_supported_reasons(*tensors)
        if reasons:
            raise RuntimeError(f"backend={backend!r} cannot run this call: {'; '.join(reasons)}\n"
                               f"every backend:\n{_every_reason(tensors)}")
        return backend
    # The last entry of a priority list is the torch path, which runs every call: taken without asking, so the
    # common CPU call (a prompt-pool-sized gather costs a few microseconds) pays for no checks.
    priority = PRIORITY["cuda"] if all(t.is_cuda for t in tensors) else DEFAULT_PRIORITY
    for name in priority[:-1]:
        if not _CLASSES[name].not_supported_reasons(*tensors):
            return name
    return priority[-1]


# Pools of these dtypes are gathered / mixed by plain autograd-tracked indexing and matmuls on the torch backend
# in eager mode (index_select forward, index_add_ backward): what `pool[index]` and `weights @ pool` do, with no
# custom-op dispatch (which costs more than the work at prompt-pool sizes). Half precision keeps the custom ops,
# whose backward accumulates in float32; torch.compile keeps them too (their bodies check the index at run time).
PLAIN_TORCH_DTYPES = (torch.float32, torch.float64)


def plain_torch_path(backend: str, pool: Tensor) -> bool:
    return backend == "torch" and pool.dtype in PLAIN_TORCH_DTYPES and not torch.compiler.is_compiling()
