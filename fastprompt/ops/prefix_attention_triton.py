"""Triton backend of `prefix_attention` (BACKEND_INTERFACE.md): checks and the calls into fastprompt.kernels.

The kernels (fastprompt/kernels/prefix_attention_{fwd,bwd}.py) cover the whole contract: no prefix, shared, per-sample and
pooled prefixes (empty -1 slots included), GQA/MQA, any key padding, bottom-right causal, sliding window, softcap,
Lq != Lk, any P, head dims up to 256, fp16/bf16/fp32, attention dropout (Philox mask regenerated per tile), and
additive score biases over sequence and prefix keys (T5's relative position bias; `supports_bias`, reached through
prefix_attention_triton_bias). `supports` names what remains (other dtypes, CPU tensors without the interpreter,
sizes past the kernels' index arithmetic).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from fastprompt.kernels import TRITON_INSTALLED

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_MAX_GRID_YZ = 65535  # CUDA grid limit on axes 1 and 2 (heads, batch)
_INT32_MAX = 2**31 - 1
_BIAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(q, k, v, prefix_k, prefix_index, prefix_mode, key_padding_mask, causal, softcap, window,
             needs_grad, dropout_p: float = 0.0) -> Optional[str]:
    if not TRITON_INSTALLED:
        return "triton is not installed"
    if not q.is_cuda and not _interpreting():
        return "triton needs CUDA tensors or TRITON_INTERPRET=1"
    if q.dtype not in _KERNEL_DTYPES:
        return f"triton kernels take float16, bfloat16 or float32 inputs, got {q.dtype}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"triton kernels need k and v in q's dtype {q.dtype}, got {k.dtype} and {v.dtype}"
    if prefix_k is not None and prefix_k.dtype not in _KERNEL_DTYPES:
        return f"triton kernels take a float16, bfloat16 or float32 prefix, got {prefix_k.dtype}"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"triton kernels support head dims up to {_MAX_HEAD_DIM}, got {q.shape[-1]}"
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        return f"key_padding_mask must be bool for the triton kernels, got {key_padding_mask.dtype}"
    if prefix_index is not None and (prefix_index.dtype.is_floating_point or prefix_index.dtype == torch.bool):
        return f"prefix_index must be an integer tensor, got {prefix_index.dtype}"
    batch, hq = q.shape[0], q.shape[1]
    if batch > _MAX_GRID_YZ or hq > _MAX_GRID_YZ:
        return f"triton launch grid takes at most {_MAX_GRID_YZ} batch rows and heads, got B={batch}, Hq={hq}"
    # Within one (batch, head) slice the kernels index rows with int32 arithmetic.
    spans = [q.shape[2] * q.stride(2), k.shape[2] * k.stride(2), v.shape[2] * v.stride(2)]
    if prefix_k is not None:
        spans.append(prefix_k.shape[2] * prefix_k.stride(2))
    if max(spans) > _INT32_MAX:
        return "a (batch, head) slice spans more than 2**31 elements, past the kernels' int32 row indexing"
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        if (major, minor) < (7, 5):
            return f"triton kernels need compute capability 7.5+, got {major}.{minor}"
        if q.dtype == torch.bfloat16 and major < 8:
            return f"bfloat16 triton kernels need compute capability 8.0+, got {major}.{minor}"
    return None


def supports_bias(q, attn_bias, prefix_bias) -> Optional[str]:
    """None when the kernels can read these (already validated, `[1|B, Hq, Lq, N]`) biases, else a reason."""
    for name, bias in (("attn_bias", attn_bias), ("prefix_bias", prefix_bias)):
        if bias is None:
            continue
        if bias.dtype not in _BIAS_DTYPES:
            return f"triton kernels take a float16, bfloat16, float32 or float64 `{name}`, got {bias.dtype}"
        # The kernels add (query * row stride) and (key * column stride) in int32 before the int64 (b, h) base.
        spans = (bias.shape[2] * bias.stride(2), bias.shape[3] * bias.stride(3))
        if max(spans) > _INT32_MAX:
            return f"`{name}` spans more than 2**31 elements along a query row or key column (int32 indexing)"
    return None


def _check(q, k, v, prefix_k, prefix_index, prefix_mode, key_padding_mask, causal, softcap, window, needs_grad):
    reason = supports(q, k, v, prefix_k, prefix_index, prefix_mode, key_padding_mask, causal, softcap, window,
                      needs_grad)
    if reason is not None:
        raise ValueError(f"prefix_attention: the triton backend cannot run this call: {reason}")


def _effective_window(window: int, lq: int, lk: int) -> int:
    # A window wider than any query-key distance is no window; this also keeps it inside int32 for the kernels.
    return -1 if window <= 0 or window > lq + lk else int(window)


def _on_device(t):
    # Triton launches on the current CUDA device: make it the tensors' device (multi-GPU, device_map="auto").
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_bias(q, attn_bias, prefix_bias):
    reason = supports_bias(q, attn_bias, prefix_bias)
    if reason is not None:
        raise ValueError(f"prefix_attention: the triton backend cannot run this call: {reason}")


def forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, causal, scale, softcap,
            window, dropout_p=0.0, dropout_seed=None, attn_bias=None, prefix_bias=None):
    """(out, lse); attn_bias / prefix_bias: validated `[1|B, Hq, Lq, Lk]` / `[1|B, Hq, Lq, S*P]` or None."""
    _check(q, k, v, prefix_k, prefix_index, prefix_mode, key_padding_mask, causal, softcap, window, False)
    _check_bias(q, attn_bias, prefix_bias)
    from fastprompt.kernels.prefix_attention_fwd import prefix_attention_forward

    batch, hq, lq, _ = q.shape
    if batch == 0 or hq == 0:
        return torch.zeros_like(q), torch.full((batch, hq, lq), float("-inf"), dtype=torch.float32, device=q.device)
    with _on_device(q):
        return prefix_attention_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, bool(causal),
                                        float(scale), float(softcap), _effective_window(window, lq, k.shape[2]),
                                        float(dropout_p), dropout_seed, attn_bias, prefix_bias)


def backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, prefix_mode, key_padding_mask, lse, delta, causal,
             scale, softcap, window, dropout_p=0.0, dropout_seed=None, attn_bias=None, prefix_bias=None):
    _check(q, k, v, prefix_k, prefix_index, prefix_mode, key_padding_mask, causal, softcap, window, True)
    _check_bias(q, attn_bias, prefix_bias)
    from fastprompt.kernels.prefix_attention_bwd import prefix_attention_backward

    batch, hq, lq, _ = q.shape
    if batch == 0 or hq == 0:
        dpk = None if prefix_k is None else torch.zeros_like(prefix_k)
        dpv = None if prefix_v is None else torch.zeros_like(prefix_v)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dpk, dpv
    with _on_device(q):
        return prefix_attention_backward(grad_out, q, k, v, prefix_k, prefix_v, prefix_index, int(prefix_mode),
                                         key_padding_mask, lse.float(), delta.float(), bool(causal), float(scale),
                                         float(softcap), _effective_window(window, lq, k.shape[2]),
                                         float(dropout_p), dropout_seed, attn_bias, prefix_bias)
