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

from typing import Optional

import torch

from .._cuda_build_info import arch_covers, extension, extension_error
from .prefix_attention_backend import PrefixAttentionBackend
from .prefix_attention_inputs import PrefixAttentionArgs
from .prefix_attention_triton import BACKEND as TRITON_BACKEND  # runs this backend's backward

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


def _triton_backward_reasons(args: PrefixAttentionArgs) -> list:
    return [f"the CUDA backend's backward runs on Triton, which cannot: {reason}"
            for reason in TRITON_BACKEND.not_supported_reasons(args, True)]


class CudaBackend(PrefixAttentionBackend):
    NAME = "cuda"
    DESCRIPTION = "the CUDA kernels"
    DEVICES = ("cuda",)
    DTYPES = (torch.float16, torch.bfloat16)
    HEAD_DIMS = (64, 128, 256)

    @classmethod
    def unavailable(cls) -> Optional[str]:
        return extension_error() if extension() is None else None

    @classmethod
    def call_reasons(cls, args: PrefixAttentionArgs, needs_grad: bool) -> list:
        q = args.q
        if args.prefix_k is not None and args.prefix_k.dtype not in (torch.float32,) + cls.DTYPES:
            return [f"the CUDA kernels take a float32/float16/bfloat16 prefix, got {args.prefix_k.dtype}"]
        if args.prefix_index is not None and args.prefix_index.dtype != torch.int64:
            return [f"the CUDA kernels take an int64 prefix_index, got {args.prefix_index.dtype}"]
        if args.key_padding_mask is not None and args.key_padding_mask.dtype != torch.bool:
            return [f"the CUDA kernels take a bool key_padding_mask, got {args.key_padding_mask.dtype}"]
        if q.shape[0] * args.k.shape[1] >= 65536:
            return ["batch * kv heads must be < 65536 for the CUDA grid"]
        reason = _device_reason(q.device)
        if reason is not None:
            return [reason]
        return _triton_backward_reasons(args) if needs_grad else []

    @classmethod
    def forward(cls, args: PrefixAttentionArgs, *, num_splits: int = 0, force_config: int = -1):
        """(out [B, Hq, Lq, D] in q.dtype, lse [B, Hq, Lq] float32, None). num_splits=0: heuristic; force_config
        -1 auto, 0 decode tiles, 1 prefill tiles (tests use the last two to cover every path)."""
        a = args
        prefix_k, prefix_v, prefix_index = a.prefix_k, a.prefix_v, a.prefix_index
        if a.prefix_mode == 0:
            prefix_k = prefix_v = prefix_index = None
        elif prefix_k.dtype != a.q.dtype:  # fp32 prefix parameters under bf16 autocast: a small [E, Hkv, P, D] cast
            prefix_k, prefix_v = prefix_k.to(a.q.dtype), prefix_v.to(a.q.dtype)
        out, lse = extension().prefix_attention_fwd(
            a.q, a.k, a.v, prefix_k, prefix_v, prefix_index, a.key_padding_mask, bool(a.causal), float(a.scale),
            float(a.softcap), int(a.window), int(num_splits), int(force_config))
        return out, lse, None

    @classmethod
    def backward(cls, args: PrefixAttentionArgs, grad_out, out, lse, delta, kept):
        """Delegated to the Triton backward (same lse convention: natural log, fp32, -inf for empty rows)."""
        return TRITON_BACKEND.backward(args, grad_out, out, lse, delta, kept)


BACKEND = CudaBackend


def plan(B, Hq, Hkv, Lq, Lk, D, S=0, P=0, num_splits=0, force_config=-1, sm_count=None):
    """(config 0=decode/1=prefill, num_splits, block_m, block_n) the forward would pick; for benchmarks."""
    if sm_count is None:
        sm_count = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    return tuple(extension().prefix_attention_plan(B, Hq, Hkv, Lq, Lk, D, S, P, num_splits, force_config, sm_count))
