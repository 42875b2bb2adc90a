"""Prefix tuning (Li & Liang 2021): learned key/value prefixes in the attention of every (or chosen) layer.

With `reparameterize` (the paper's training setup) the prefix is Embedding(P, d) -> Linear(d, h) -> tanh ->
Linear(h, L·2·Hkv·D), computed once per step; without it the [L, 2, Hkv, P, D] prefix is a parameter.
The prefix is handed to attention as one [Hkv, P, D] K and V per layer, shared by the batch (never expanded to
B rows); real tokens keep their own positions. `prefix_dropout` drops prefix entries in training (one mask
shared by the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import PromptConfig, PromptModule, layer_prefix_class, normalize_layers, register_prompt


@dataclass
class PrefixTuningConfig(PromptConfig):
    num_virtual_tokens: int = 10
    layers: Optional[Tuple[int, ...]] = None  # None = every layer
    reparameterize: bool = True
    encoder_hidden_size: int = 512
    prefix_dropout: float = 0.0
    init_std: float = 0.02
    seed: int = 0

    prompt_type = "PrefixTuning"

    def validate(self) -> None:
        super().validate()
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout}")
        if self.layers is not None:
            self.layers = normalize_layers(self.layers, self.num_layers)


@register_prompt
class PrefixTuning(PromptModule):
    """`PrefixTuning(model_or_config, num_virtual_tokens=10, layers=None, reparameterize=True,
    encoder_hidden_size=512, prefix_dropout=0.0)`."""

    config_class = PrefixTuningConfig

    def __init__(self, config, **kwargs):
        if "layers" in kwargs and kwargs["layers"] is not None:
            kwargs["layers"] = tuple(kwargs["layers"])
        config = self._make_config(config, kwargs)
        super().__init__(config)
        c = self.config
        self.layers = normalize_layers(c.layers, c.num_layers)
        g = torch.Generator().manual_seed(c.seed)
        shape = (len(self.layers), 2, c.num_kv_heads, c.num_virtual_tokens, c.head_dim)
        if c.reparameterize:
            self.embedding = nn.Parameter(torch.randn(c.num_virtual_tokens, c.hidden_size, generator=g))
            self.encoder = nn.Sequential(
                nn.Linear(c.hidden_size, c.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(c.encoder_hidden_size, len(self.layers) * 2 * c.num_kv_heads * c.head_dim),
            )
            self.prefix = None
        else:
            self.embedding = None
            self.encoder = None
            self.prefix = nn.Parameter(torch.randn(shape, generator=g) * c.init_std)

    @property
    def placement(self) -> str:
        return "prefix"

    def prefix_kv(self) -> Tensor:
        """[L_sel, 2, Hkv, P, D]: K (index 0) and V (index 1) of each chosen layer, in `self.layers` order."""
        c = self.config
        if self.prefix is not None:
            kv = self.prefix
        else:
            flat = self.encoder(self.embedding)  # [P, L_sel * 2 * Hkv * D]
            kv = flat.view(c.num_virtual_tokens, len(self.layers), 2, c.num_kv_heads, c.head_dim)
            kv = kv.permute(1, 2, 3, 0, 4).contiguous()
        if self.training and c.prefix_dropout > 0:
            kv = F.dropout(kv, p=c.prefix_dropout, training=True)
        return kv

    def layer_prefixes(self, batch_size, *, query=None, task_ids=None) -> Dict[int, object]:
        LayerPrefix = layer_prefix_class()
        kv = self.prefix_kv()
        return {layer: LayerPrefix(key=kv[i, 0], value=kv[i, 1]) for i, layer in enumerate(self.layers)}

    def num_input_tokens(self) -> int:
        return 0
