"""Prompt tuning (Lester et al. 2021): P learned embeddings placed before the input embeddings.

Initialization: "random" (normal, scaled like the model's word embeddings when given), "vocab" (rows sampled from
the word-embedding matrix), or "text" (the embeddings of a tokenized text, repeated to P tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from transformers import AutoTokenizer

from .base import PromptConfig, PromptModule, register_prompt

INITS = ("random", "vocab", "text")


@dataclass
class PromptTuningConfig(PromptConfig):
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    init_std: float = 0.02
    seed: int = 0

    prompt_type = "PromptTuning"

    def validate(self) -> None:
        super().validate()
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs init_text")


def _word_embedding_weight(word_embeddings) -> Optional[Tensor]:
    if word_embeddings is None:
        return None
    if hasattr(word_embeddings, "get_input_embeddings"):
        word_embeddings = word_embeddings.get_input_embeddings()
        if not isinstance(word_embeddings, nn.Embedding):  # a Vision Transformer's patch embeddings: no word table
            return None
    weight = getattr(word_embeddings, "weight", word_embeddings)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError("word_embeddings must be an nn.Embedding, a model, or a [V, d] tensor")
    return weight.detach()


@register_prompt
class PromptTuning(PromptModule):
    """`PromptTuning(model_or_config, num_virtual_tokens=20, init="random"|"vocab"|"text", init_text=...,
    word_embeddings=..., tokenizer=...)`. Passing a model supplies the word embeddings for "vocab"/"text" init."""

    config_class = PromptTuningConfig

    def __init__(self, config, *, word_embeddings=None, tokenizer=None, **kwargs):
        if word_embeddings is None and hasattr(config, "get_input_embeddings"):
            word_embeddings = config
        config = self._make_config(config, kwargs)
        super().__init__(config)
        c = self.config
        self.embedding = nn.Parameter(torch.empty(c.num_virtual_tokens, c.input_width))
        self._initialize(_word_embedding_weight(word_embeddings), tokenizer)

    @torch.no_grad()
    def _initialize(self, table: Optional[Tensor], tokenizer) -> None:
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        if table is not None and table.shape[1] != c.input_width:
            raise ValueError(f"word_embeddings width {table.shape[1]} != the prompt width {c.input_width} "
                             "(the model's embedding_size, else hidden_size)")
        if c.init == "random":
            std = float(table.float().std()) if table is not None else c.init_std
            self.embedding.copy_(torch.randn(self.embedding.shape, generator=g) * std)
            return
        if table is None:
            raise ValueError(f"init={c.init!r} needs the model's word embeddings: pass the model or word_embeddings=")
        if c.init == "vocab":
            ids = torch.randint(0, table.shape[0], (c.num_virtual_tokens,), generator=g)
        else:
            if tokenizer is None:
                if not c.tokenizer_name_or_path:
                    raise ValueError("init='text' needs tokenizer= or tokenizer_name_or_path")
                tokenizer = AutoTokenizer.from_pretrained(c.tokenizer_name_or_path)
            ids = tokenizer(c.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"init_text {c.init_text!r} tokenizes to no tokens")
            reps = -(-c.num_virtual_tokens // len(ids))
            ids = torch.tensor((ids * reps)[: c.num_virtual_tokens])
        self.embedding.copy_(table[ids.to(table.device)].to(self.embedding.dtype).cpu())

    def num_input_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def input_prompts(self, batch_size, *, query=None, task_ids=None) -> Tensor:
        return self.embedding
