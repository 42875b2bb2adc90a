"""P-tuning (Liu et al. 2021): input-level prompts produced by a small encoder over learned embeddings.

encoder "mlp": Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d) (as PEFT's PromptEncoder MLP);
encoder "lstm": 2-layer BiLSTM(d -> h) -> Linear(2h, 2h) -> ReLU -> Linear(2h, d).
The encoder runs once per step on P rows; the result is shared by the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .base import PromptConfig, PromptModule, register_prompt

ENCODERS = ("mlp", "lstm")


@dataclass
class PTuningConfig(PromptConfig):
    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: Optional[int] = None  # default: hidden_size
    encoder_dropout: float = 0.0
    init_std: float = 0.02
    seed: int = 0

    prompt_type = "PTuning"

    def validate(self) -> None:
        super().validate()
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")


@register_prompt
class PTuning(PromptModule):
    config_class = PTuningConfig

    def __init__(self, config, **kwargs):
        config = self._make_config(config, kwargs)
        super().__init__(config)
        c = self.config
        d = c.input_width  # the prompt is prepended to the word embeddings (embedding_size on ELECTRA)
        h = c.encoder_hidden_size or d
        g = torch.Generator().manual_seed(c.seed)
        self.embedding = nn.Parameter(torch.randn(c.num_virtual_tokens, d, generator=g) * c.init_std)
        if c.encoder == "mlp":
            self.lstm = None
            self.mlp = nn.Sequential(
                nn.Linear(d, h), nn.ReLU(), nn.Dropout(c.encoder_dropout), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d)
            )
        else:
            self.lstm = nn.LSTM(d, h, num_layers=2, dropout=c.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))

    def num_input_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def encode(self) -> Tensor:
        x = self.embedding
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp(x)

    def input_prompts(self, batch_size, *, query=None, task_ids=None) -> Tensor:
        return self.encode()
