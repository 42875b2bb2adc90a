"""The base class of prefix_attention's backends: capabilities as class attributes, reasons from them.

Modelled on xformers' ops/fmha: a backend states what it supports (devices, dtypes, head dims, bias, dropout,
softcap, window, gradient) as class attributes and adds the limits no attribute can say (`call_reasons`: grid
sizes, int32 index spans, compute capability); `not_supported_reasons(args, needs_grad)` is the generic check over
both, which prefix_attention_dispatch asks. BACKEND_INTERFACE.md says what a backend implements.
"""
from __future__ import annotations

from typing import Optional

from .prefix_attention_inputs import FLOAT_DTYPES, PrefixAttentionArgs


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


class PrefixAttentionBackend:
    """A backend of prefix_attention. Subclasses set the capabilities below and implement forward / backward
    (BACKEND_INTERFACE.md); the base class turns the capabilities into reasons."""

    NAME = ""
    DESCRIPTION = ""  # how reasons name it, in the plural: "triton kernels", "the torch ops"
    DEVICES: Optional[tuple] = None  # device types it runs on; None = any
    DEVICE_HINT = ""  # appended to the device reason
    DTYPES: tuple = FLOAT_DTYPES  # of q, k, v and the prefix
    HEAD_DIMS: Optional[tuple] = None  # the head dims compiled; None = any (up to MAX_HEAD_DIM)
    MAX_HEAD_DIM: Optional[int] = None
    SUPPORTS_BIAS = False  # attn_bias / prefix_bias
    BIAS_DTYPES: tuple = FLOAT_DTYPES
    SUPPORTS_DROPOUT = False
    SUPPORTS_SOFTCAP = True
    SUPPORTS_WINDOW = True
    SUPPORTS_GRADIENT = True
    # True: the op calls `run(args)` outside its custom ops and autograd differentiates it (the reference)
    DIFFERENTIATED_BY_AUTOGRAD = False

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why the backend cannot run at all here (a package or extension missing), else None."""
        return None

    @classmethod
    def devices(cls) -> Optional[tuple]:
        return cls.DEVICES

    @classmethod
    def not_supported_reasons(cls, args: PrefixAttentionArgs, needs_grad: bool) -> list:
        """Every reason this backend cannot run the call (empty: it can)."""
        missing = cls.unavailable()
        reasons = [] if missing is None else [missing]
        q = args.q
        devices = cls.devices()
        if devices is not None and q.device.type not in devices:
            reasons.append(f"{cls.DESCRIPTION} need {' or '.join(d.upper() for d in devices)} tensors, got "
                           f"{q.device.type}{cls.DEVICE_HINT}")
        if q.dtype not in cls.DTYPES:
            reasons.append(f"{cls.DESCRIPTION} take {_dtype_names(cls.DTYPES)} inputs, got {q.dtype}")
        dim = q.shape[-1]
        if cls.HEAD_DIMS is not None and dim not in cls.HEAD_DIMS:
            reasons.append(f"head dim {dim} is not compiled ({cls.DESCRIPTION} cover {cls.HEAD_DIMS})")
        if cls.MAX_HEAD_DIM is not None and dim > cls.MAX_HEAD_DIM:
            reasons.append(f"{cls.DESCRIPTION} support head dims up to {cls.MAX_HEAD_DIM}, got {dim}")
        for name, bias in (("attn_bias", args.attn_bias), ("prefix_bias", args.prefix_bias)):
            if bias is None:
                continue
            if not cls.SUPPORTS_BIAS:
                reasons.append(f"{cls.DESCRIPTION} take no attn_bias / prefix_bias")
                break
            if bias.dtype not in cls.BIAS_DTYPES:
                reasons.append(f"{cls.DESCRIPTION} take a {_dtype_names(cls.BIAS_DTYPES)} `{name}`, got {bias.dtype}")
        if args.dropout_p > 0 and not cls.SUPPORTS_DROPOUT:
            reasons.append(f"{cls.DESCRIPTION} have no attention dropout")
        if args.softcap > 0 and not cls.SUPPORTS_SOFTCAP:
            reasons.append(f"{cls.DESCRIPTION} have no softcap")
        if args.window > 0 and not cls.SUPPORTS_WINDOW:
            reasons.append(f"{cls.DESCRIPTION} have no sliding window")
        if needs_grad and not cls.SUPPORTS_GRADIENT:
            reasons.append(f"{cls.DESCRIPTION} have no backward")
        if not reasons:  # the backend's own limits, asked only of an available backend whose capabilities fit
            reasons.extend(cls.call_reasons(args, needs_grad))
        return reasons

    @classmethod
    def call_reasons(cls, args: PrefixAttentionArgs, needs_grad: bool) -> list:
        """Limits the capability attributes cannot state (sizes, hardware); empty by default."""
        return []

    # What the op's custom ops ask of a backend besides forward / backward (defaults: neither applies).
    @classmethod
    def kept_mask_bytes(cls, args: PrefixAttentionArgs) -> int:
        """Size of the uint8 tensor forward returns for backward (a packed dropout mask); 0 = none."""
        return 0

    @classmethod
    def forms_row_term(cls, args: PrefixAttentionArgs, lse_has_grad: bool) -> bool:
        """True when backward hands the call to a fused kernel that forms the row term from `out` itself (the op
        then passes delta=None) and writes the gradients of q, k, v in `[B, L, H, D]` memory order."""
        return False
