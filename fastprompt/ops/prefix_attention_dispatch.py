"""Which backend runs a `prefix_attention` call: what each backend declares it supports, and the choice.

Modelled on xformers' ops/fmha: every backend is a class (prefix_attention_backend.PrefixAttentionBackend) that
states its capabilities as class attributes and says from them why it cannot run a call. `auto` walks the priority list of the call's device and takes the first backend with
no reason; an explicit backend that has reasons, or `auto` with no backend left, raises one error that lists every
backend's reasons. BACKEND_INTERFACE.md says what a backend implements and what a new one touches.
"""
from __future__ import annotations


from . import prefix_attention_cuda, prefix_attention_reference, prefix_attention_torch, prefix_attention_triton
from .prefix_attention_inputs import PrefixAttentionArgs

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")
# `auto`'s order per device type: the CUDA kernels where they cover the call, Triton otherwise, the exact torch
# path last; on the CPU (and any other device) the torch path (the Triton interpreter is for tests).
PRIORITY = {"cuda": ("cuda", "triton", "torch")}
DEFAULT_PRIORITY = ("torch",)
# A dict lookup, which torch.compile traces. The backend modules import nothing heavy (triton and the CUDA extension
# load on first use); one that cannot run here says so in its reasons (`unavailable`).
_CLASSES = {"cuda": prefix_attention_cuda.BACKEND, "triton": prefix_attention_triton.BACKEND,
            "torch": prefix_attention_torch.BACKEND, "reference": prefix_attention_reference.BACKEND}


def backend_class(name: str):
    """The class implementing backend `name`."""
    return _CLASSES[name]


def not_supported_reasons(name: str, args: PrefixAttentionArgs, needs_grad: bool) -> list:
    return _CLASSES[name].not_supported_reasons(args, needs_grad)


def _every_reason(args: PrefixAttentionArgs, needs_grad: bool) -> str:
    lines = []
    for name in BACKENDS[1:]:
        reasons = not_supported_reasons(name, args, needs_grad)
        lines.append(f"  {name}: " + ("; ".join(reasons) if reasons else "can run it"))
    return "\n".join(lines)


def resolve_backend(backend: str, args: PrefixAttentionArgs, needs_grad: bool) -> str:
    """The backend that runs this call: `backend` itself when it can, auto's first choice that can; else a
    ValueError that lists every backend's reasons."""
    if not isinstance(backend, str):
        raise TypeError(f"prefix_attention: `backend` must be a string from {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"prefix_attention: `backend` must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reasons = not_supported_reasons(backend, args, needs_grad)
        if reasons:
            raise ValueError(f"prefix_attention: backend={backend!r} cannot run this call: {'; '.join(reasons)}\n"
                             f"every backend:\n{_every_reason(args, needs_grad)}")
        return backend
    for name in PRIORITY.get(args.q.device.type, DEFAULT_PRIORITY):
        if not not_supported_reasons(name, args, needs_grad):
            return name
    raise ValueError(f"prefix_attention: no backend can run this call on {args.q.device.type}:\n"
                     f"{_every_reason(args, needs_grad)}")
