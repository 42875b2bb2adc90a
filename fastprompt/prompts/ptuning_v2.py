"""P-tuning v2 (Liu et al. 2022): deep prompts, i.e. a learned K/V prefix in every (or chosen) layer, trained
directly (no reparameterization) with prefix dropout 0.1 by default. Same forward as PrefixTuning."""

from __future__ import annotations

from dataclasses import dataclass

from .base import register_prompt
from .prefix_tuning import PrefixTuning, PrefixTuningConfig


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    num_virtual_tokens: int = 20
    reparameterize: bool = False
    prefix_dropout: float = 0.1

    prompt_type = "PTuningV2"


@register_prompt
class PTuningV2(PrefixTuning):
    """`PTuningV2(model_or_config, num_virtual_tokens=20, layers=None, prefix_dropout=0.1)`."""

    config_class = PTuningV2Config
