"""Memory layouts the ops must read correctly: a tensor re-laid out differentiably, so that gradients still reach
the contiguous leaf the float64 reference is fed with."""
from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "transposed", "strided")


def relayout(t, layout: str):
    """`t`'s values in another memory layout (a differentiable view of a fresh buffer).

    transposed: dims -3 and -2 swapped in memory ([B, L, H, D] memory viewed as [B, H, L, D], as transformers
    passes q/k/v); strided: every other element of a [..., 2·D] buffer (last-dim stride 2, e.g. `x[..., ::2]`)."""
    if t is None or layout == "contiguous":
        return t
    if layout == "transposed":
        return t.transpose(-3, -2).contiguous().transpose(-3, -2)
    if layout == "strided":
        return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]
    raise ValueError(layout)


def check_layout(t, layout: str) -> None:
    """Assert that relayout really produced the layout (the test would prove nothing otherwise)."""
    if t is None or t.shape[-1] < 2 or t.numel() == 0:
        return
    if layout == "strided":
        assert t.stride(-1) == 2, t.stride()
    elif layout == "transposed" and t.shape[-3] > 1 and t.shape[-2] > 1:
        assert not t.is_contiguous() and t.transpose(-3, -2).is_contiguous()
