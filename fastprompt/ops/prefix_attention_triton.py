"""Triton backend of `prefix_attention` (BACKEND_INTERFACE.md): checks and the calls into fastprompt.kernels.

The kernels (fastprompt/kernels/prefix_attention_{fwd,bwd}.py) cover the whole contract: no prefix, shared, per-sample and
pooled prefixes (empty -1 slots included), GQA/MQA, any key padding, bottom-right causal, sliding window, softcap,
Lq != Lk, any P, head dims up to 256, fp16/bf16/fp32, attention dropout (Philox mask regenerated per tile), and
additive score biases over sequence and prefix keys (T5's relative position bias). TritonBackend's capabilities and
`call_reasons` name what remains (other dtypes, CPU tensors without the interpreter, sizes past the kernels' index
arithmetic, old GPUs).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .. import kernels  # its kernel modules import triton; the package loads them on first use
from ..kernels import TRITON_INSTALLED  # looked up once, outside traced code
from .prefix_attention_backend import PrefixAttentionBackend
from .prefix_attention_inputs import PrefixAttentionArgs

_MAX_GRID_YZ = 65535  # CUDA grid limit on axes 1 and 2 (heads, batch)
_INT32_MAX = 2**31 - 1


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(PrefixAttentionBackend):
    NAME = "triton"
    DESCRIPTION = "triton kernels"
    DEVICES = ("cuda",)
    DEVICE_HINT = " (CPU tensors only under TRITON_INTERPRET=1)"
    DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    MAX_HEAD_DIM = 256
    SUPPORTS_BIAS = True
    BIAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    SUPPORTS_DROPOUT = True

    @classmethod
    def unavailable(cls):
        return None if TRITON_INSTALLED else "triton is not installed"

    @classmethod
    def devices(cls):
        return ("cuda", "cpu") if _interpreting() else cls.DEVICES

    @classmethod
    def call_reasons(cls, args: PrefixAttentionArgs, needs_grad: bool) -> list:
        q, k, v, prefix_k = args.q, args.k, args.v, args.prefix_k
        reasons = []
        if args.key_padding_mask is not None and args.key_padding_mask.dtype != torch.bool:
            reasons.append(f"key_padding_mask must be bool for the triton kernels, got {args.key_padding_mask.dtype}")
        batch, hq = q.shape[0], q.shape[1]
        if batch > _MAX_GRID_YZ or hq > _MAX_GRID_YZ:
            reasons.append(f"triton launch grid takes at most {_MAX_GRID_YZ} batch rows and heads, got B={batch}, "
                           f"Hq={hq}")
        # Within one (batch, head) slice the kernels index rows with int32 arithmetic.
        spans = [q.shape[2] * q.stride(2), k.shape[2] * k.stride(2), v.shape[2] * v.stride(2)]
        if prefix_k is not None:
            spans.append(prefix_k.shape[2] * prefix_k.stride(2))
        if max(spans) > _INT32_MAX:
            reasons.append("a (batch, head) slice spans more than 2**31 elements, past the kernels' int32 row "
                           "indexing")
        for name, bias in (("attn_bias", args.attn_bias), ("prefix_bias", args.prefix_bias)):
            # The kernels add (query * row stride) and (key * column stride) in int32 before the int64 (b, h) base.
            if bias is not None and max(bias.shape[2] * bias.stride(2), bias.shape[3] * bias.stride(3)) > _INT32_MAX:
                reasons.append(f"`{name}` spans more than 2**31 elements along a query row or key column (int32 "
                               "indexing)")
        if q.is_cuda:
            major, minor = torch.cuda.get_device_capability(q.device)
            if (major, minor) < (7, 5):
                reasons.append(f"triton kernels need compute capability 7.5+, got {major}.{minor}")
            elif q.dtype == torch.bfloat16 and major < 8:
                reasons.append(f"bfloat16 triton kernels need compute capability 8.0+, got {major}.{minor}")
        return reasons

    @classmethod
    def _check(cls, args: PrefixAttentionArgs, needs_grad: bool):
        reasons = cls.not_supported_reasons(args, needs_grad)
        if reasons:
            raise ValueError(f"prefix_attention: the triton backend cannot run this call: {'; '.join(reasons)}")

    @classmethod
    def forward(cls, args: PrefixAttentionArgs):
        cls._check(args, False)
        a = args
        batch, hq, lq, _ = a.q.shape
        if batch == 0 or hq == 0:
            return (torch.zeros_like(a.q), torch.full((batch, hq, lq), float("-inf"), dtype=torch.float32,
                                                      device=a.q.device), None)
        with _on_device(a.q):
            out, lse = kernels.prefix_attention_forward(
                a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_index, a.key_padding_mask, bool(a.causal),
                float(a.scale), float(a.softcap), _effective_window(a.window, lq, a.k.shape[2]), float(a.dropout_p),
                a.dropout_seed, a.attn_bias, a.prefix_bias)
        return out, lse, None

    @classmethod
    def backward(cls, args: PrefixAttentionArgs, grad_out, out, lse, delta, kept):
        """The kernels regenerate forward's dropout mask from the same seed, tile by tile."""
        cls._check(args, True)
        a = args
        batch, hq, lq, _ = a.q.shape
        if batch == 0 or hq == 0:
            dpk = None if a.prefix_k is None else torch.zeros_like(a.prefix_k)
            dpv = None if a.prefix_v is None else torch.zeros_like(a.prefix_v)
            return torch.zeros_like(a.q), torch.zeros_like(a.k), torch.zeros_like(a.v), dpk, dpv
        with _on_device(a.q):
            return kernels.prefix_attention_backward(
                grad_out, a.q, a.k, a.v, a.prefix_k, a.prefix_v, a.prefix_index, int(a.prefix_mode),
                a.key_padding_mask, lse.float(), delta.float(), bool(a.causal), float(a.scale), float(a.softcap),
                _effective_window(a.window, lq, a.k.shape[2]), float(a.dropout_p), a.dropout_seed, a.attn_bias,
                a.prefix_bias)


def _effective_window(window: int, lq: int, lk: int) -> int:
    # A window wider than any query-key distance is no window; this also keeps it inside int32 for the kernels.
    return -1 if window <= 0 or window > lq + lk else int(window)


def _on_device(t):
    # Triton launches on the current CUDA device: make it the tensors' device (multi-GPU, device_map="auto").
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


BACKEND = TritonBackend
