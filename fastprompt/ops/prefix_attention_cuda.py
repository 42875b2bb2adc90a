"""CUDA backend of prefix_attention: csrc/ kernels through fastprompt._C (interface: BACKEND_INTERFACE.md).

Forward: one tensor-core kernel (mma.sync, fp32 accumulation) in two tile shapes, chosen by the number of query rows
per kv head (G * Lq): <= 16 -> one-warp "decode" CTAs with split-KV over the key axis (flash-decoding; the prefix
tiles are the first splits) and a log-sum-exp merge kernel; larger -> four-warp "prefill" CTAs (64 rows), still
split along keys when the grid would underfill the GPU. Rows are the G query heads x Lq positions of one kv head,
so each K/V tile is read once per GQA group. fp16/bf16 inputs (fp32 prefixes are cast once), head dims 64, 128 and 256 (Gemma).

Backward: delegated to the Triton backend (fastprompt.ops.prefix_attention_triton.backward). It consumes the
same (out, lse) this forward produces; a CUDA backward is not written yet.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from .._cuda_build_info import arch_covers, extension, extension_error

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128, 256)

_device_ok_cache: dict = {}


def _device_reason(device: torch.device) -> Optional[str]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_ok_cache:
        archs = extension().build_info()["archs"]
        major, minor = torch.cuda.get_device_capability(index)
        _device_ok_cache[index] = None if arch_covers(archs, major, minor) else (
            f"fastprompt._C was compiled for sm_{', sm_'.join(map(str, archs))} and cannot run on this "
            f"sm_{major}{minor} GPU (rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor})")
    return _device_ok_cache[index]


def _triton_backward_reason(q, k, v, prefix_k, prefix_index, prefix_mode, key_padding_mask, causal, softcap,
                            window) -> Optional[str]:
    try:
        triton_backend = importlib.import_module("fastprompt.ops.prefix_attention_triton")
    except ImportError as exc:
        return f"the CUDA backend's backward runs on Triton, which is unavailable ({exc})"
    reason = triton_backend.supports(q, k, v, prefix_k, prefix_index, prefix_mode, key_padding_mask, causal, softcap,
                                     window, True)
    return None if reason is None else f"the CUDA backend's backward runs on Triton, which cannot: {reason}"


def supports(q, k, v, prefix_k, prefix_index, prefix_mode, key_padding_mask, causal, softcap, window,
             needs_grad, dropout_p: float = 0.0) -> Optional[str]:
    if dropout_p > 0.0:
        return "the CUDA kernels have no attention dropout (the Triton backend fuses it)"
    if extension() is None:
        return extension_error()
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "the CUDA kernels need CUDA tensors"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the CUDA kernels take float16/bfloat16, got {q.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"the CUDA kernels need k and v in q's dtype {q.dtype}, got {k.dtype} and {v.dtype}"
    if prefix_k is not None and prefix_k.dtype not in (torch.float32,) + SUPPORTED_DTYPES:
        return f"the CUDA kernels take a float32/float16/bfloat16 prefix, got {prefix_k.dtype}"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not compiled (CUDA kernels cover {SUPPORTED_HEAD_DIMS})"
    if prefix_index is not None and prefix_index.dtype != torch.int64:
        return f"the CUDA kernels take an int64 prefix_index, got {prefix_index.dtype}"
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        return f"the CUDA kernels take a bool key_padding_mask, got {key_padding_mask.dtype}"
    if q.shape[0] * k.shape[1] >= 65536:
        return "batch * kv heads must be < 65536 for the CUDA grid"
    reason = _device_reason(q.device)
    if reason is not None:
        return reason
    if needs_grad:
        return _triton_backward_reason(q, k, v, prefix_k, prefix_index, prefix_mode, key_padding_mask, causal,
                                       softcap, window)
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
            prefix_index: Optional[Tensor], prefix_mode: int, key_padding_mask: Optional[Tensor], causal: bool,
            scale: float, softcap: float, window: int, *, num_splits: int = 0,
            force_config: int = -1) -> tuple[Tensor, Tensor]:
    """(out [B, Hq, Lq, D] in q.dtype, lse [B, Hq, Lq] float32). num_splits=0: heuristic; force_config
    -1 auto, 0 decode tiles, 1 prefill tiles (tests use the last two to cover every path)."""
    if prefix_mode == 0:
        prefix_k = prefix_v = prefix_index = None
    elif prefix_k.dtype != q.dtype:  # e.g. fp32 prefix parameters under bf16 autocast: a small [E, Hkv, P, D] cast
        prefix_k, prefix_v = prefix_k.to(q.dtype), prefix_v.to(q.dtype)
    return tuple(extension().prefix_attention_fwd(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, bool(causal), float(scale),
        float(softcap or 0.0), int(window if window is not None else -1), int(num_splits), int(force_config)))


def backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta, causal,
             scale, softcap, window):
    """Delegated to the Triton backward (same lse convention: natural log, fp32, -inf for empty rows)."""
    triton_backend = importlib.import_module("fastprompt.ops.prefix_attention_triton")
    return triton_backend.backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode,
                                   key_padding_mask, lse, delta, causal, scale, softcap, window)


def plan(B, Hq, Hkv, Lq, Lk, D, S=0, P=0, num_splits=0, force_config=-1, sm_count=None):
    """(config 0=decode/1=prefill, num_splits, block_m, block_n) the forward would pick; for benchmarks."""
    if sm_count is None:
        sm_count = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    return tuple(extension().prefix_attention_plan(B, Hq, Hkv, Lq, Lk, D, S, P, num_splits, force_config, sm_count))
