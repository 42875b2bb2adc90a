"""LayerPrefix: one layer's learned prefix, what prompt modules build and fastprompt's attention reads.

Defined here, in the prompts layer, so that prompts never import the integrations that consume it
(fastprompt.integrations.transformers_attention re-exports it under its historical name)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

__all__ = ["LayerPrefix"]


@dataclass
class LayerPrefix:
    """One layer's learned prefix, stored once.

    key/value: `[Hkv, P, D]` shared by the batch | `[B, Hkv, P, D]` per sample | `[N, Hkv, P, D]` a pool read through
    `index` (`[B]` or `[B, S]`, -1 = empty slot). Prefix keys are never rotated and always visible.
    """

    key: Tensor
    value: Tensor
    index: Optional[Tensor] = None
