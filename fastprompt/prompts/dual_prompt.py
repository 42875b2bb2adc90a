"""DualPrompt (Wang et al., ECCV 2022): a G(eneral)-prompt shared by all tasks and an E(xpert)-prompt pool, both as
prefixes (prefix-tuning style: separate key and value prefixes per layer, prepended before the sequence keys, never
masked, no position).

Semantics of the reference implementation (dualprompt-pytorch, use_prefix_tune_for_{g,e}_prompt):
- the G-prompt `[L_g, 2, Hkv, g_length, D]` sits in `g_layers` (published: 0-1), the same for every input;
- the E-prompt pool `[L_e, 2, N, Hkv, e_length, D]` with one learned key per entry `[N, hidden]` sits in `e_layers`
  (published: 2-4); one entry per row (top-1): in training the current task's entry (pass `task_ids=`, the
  reference's prompt mask), at inference the entry whose key is closest in cosine to the query, the frozen model's
  [CLS] pre-logits;
- the key-pull loss `-pull_constraint_coeff * mean_b cos(q_b, key_{chosen_b})` (the reference's reduce_sim with
  top-1) is stored in `aux_loss` and added to outputs.loss by the integration (`add_aux_loss`);
- parameters and keys start uniform in [-1, 1] (`prompt_init='uniform'`).
The pool is handed to attention as it is, with the [B] index of each row's entry (read in place, never gathered).
G and E layers must not overlap (the published split does not).

`query_pass="one_stage"` (opt-in; OS-Prompt's one-stage query, a different method from the exact two-pass
default): the query is the [CLS] of the hidden state entering the first E-layer in the prompted pass itself (below
it only the G-prompt acts), not detached (OS-Prompt's code takes `x_block[:, 0, :]` as it is); the one entry it
picks serves every E-layer, as the two-pass query's does. No frozen first pass runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import QUERY_MODES, PromptConfig, PromptModule, check_query_pass, layer_prefix_class, normalize_layers, \
    register_prompt


@dataclass
class DualPromptConfig(PromptConfig):
    g_length: int = 5
    g_layers: Tuple[int, ...] = (0, 1)
    e_length: int = 5
    e_layers: Tuple[int, ...] = (2, 3, 4)
    pool_size: int = 10
    query: str = "cls"
    pull_constraint_coeff: float = 1.0
    add_aux_loss: bool = True
    seed: int = 0
    query_pass: str = "two_pass"  # or "one_stage" (OS-Prompt; fastprompt.prompts.base.QUERY_PASSES)

    prompt_type = "DualPrompt"

    def validate(self) -> None:
        super().validate()
        if self.g_length < 1 or self.e_length < 1 or self.pool_size < 1:
            raise ValueError(f"g_length, e_length and pool_size must be >= 1, got {self.g_length}, {self.e_length}, "
                             f"{self.pool_size}")
        self.g_layers = normalize_layers(tuple(self.g_layers), self.num_layers, "g_layers") if self.g_layers else ()
        self.e_layers = normalize_layers(tuple(self.e_layers), self.num_layers, "e_layers")
        shared = set(self.g_layers) & set(self.e_layers)
        if shared:
            raise ValueError(f"g_layers and e_layers overlap in layers {sorted(shared)}; DualPrompt puts each layer's "
                             "prefix in one of them")
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {self.query!r}")
        check_query_pass(self)


@register_prompt
class DualPrompt(PromptModule):
    """`DualPrompt(model_or_config, g_length=5, g_layers=(0, 1), e_length=5, e_layers=(2, 3, 4), pool_size=10,
    pull_constraint_coeff=1.0)`; call the patched model with `task_ids=` in training (the current task's
    E-prompt), without at inference (key matching)."""

    config_class = DualPromptConfig
    accepts_task_ids = True  # optional: given, they pick the E-prompt (training); absent, the keys do

    def __init__(self, config, **kwargs):
        for name in ("g_layers", "e_layers"):
            if kwargs.get(name) is not None:
                kwargs[name] = tuple(kwargs[name])
        config = self._make_config(config, kwargs)
        super().__init__(config)
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        uniform = lambda *shape: nn.Parameter(torch.rand(shape, generator=g) * 2 - 1)  # noqa: E731
        self.g_prompt = uniform(len(c.g_layers), 2, c.num_kv_heads, c.g_length, c.head_dim) if c.g_layers else None
        self.e_pool = uniform(len(c.e_layers), 2, c.pool_size, c.num_kv_heads, c.e_length, c.head_dim)
        self.e_keys = uniform(c.pool_size, c.hidden_size)
        self.layers = tuple(sorted(c.g_layers + c.e_layers))
        self.last_index: Optional[Tensor] = None

    @property
    def placement(self) -> str:
        return "prefix"

    @property
    def needs_query(self) -> bool:
        return True

    @property
    def num_tasks(self) -> int:
        """Task ids index the E-prompt pool: one entry per task."""
        return self.config.pool_size

    def num_input_tokens(self) -> int:
        return 0

    def similarity(self, query: Tensor) -> Tensor:
        """[B, N]: cosine between each row's query and each E-prompt key."""
        if query is None or query.dim() != 2 or query.shape[1] != self.e_keys.shape[1]:
            raise ValueError(f"DualPrompt needs a query [B, {self.e_keys.shape[1]}] (the integration computes it), "
                             f"got {getattr(query, 'shape', query)}")
        return F.normalize(query.to(self.e_keys.dtype), dim=-1) @ F.normalize(self.e_keys, dim=-1).t()

    def select(self, query: Tensor, task_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(E-prompt index [B], cosine of its key [B]): the task's entry when task_ids is given, else the best key."""
        sim = self.similarity(query)
        index = sim.argmax(dim=-1) if task_ids is None else task_ids.to(device=sim.device, dtype=torch.long)
        return index, sim.gather(1, index[:, None])[:, 0]

    def layer_prefixes(self, batch_size, *, query=None, task_ids=None) -> Dict[int, object]:
        return {**self._g_prefixes(), **self._e_prefixes(batch_size, query, task_ids)}

    def _g_prefixes(self) -> Dict[int, object]:
        LayerPrefix = layer_prefix_class()
        return {layer: LayerPrefix(key=self.g_prompt[i, 0], value=self.g_prompt[i, 1])
                for i, layer in enumerate(self.config.g_layers)}

    def _e_prefixes(self, batch_size, query, task_ids) -> Dict[int, object]:
        LayerPrefix = layer_prefix_class()
        c = self.config
        index, chosen = self.select(query, task_ids)
        if index.shape[0] != batch_size:
            raise ValueError(f"query has {index.shape[0]} rows, the batch has {batch_size}")
        self.aux_loss = -c.pull_constraint_coeff * chosen.mean()
        self.last_index = index.detach()
        return {layer: LayerPrefix(key=self.e_pool[i, 0], value=self.e_pool[i, 1], index=index)
                for i, layer in enumerate(c.e_layers)}

    @property
    def query_layers(self) -> Tuple[int, ...]:
        """One-stage: the first E-layer, whose entering [CLS] picks the E-prompt of every E-layer."""
        return (self.config.e_layers[0],)

    def one_stage_prefixes(self, batch_size, layer, query, *, task_ids=None) -> Dict[int, object]:
        if layer is None:
            self.aux_loss = None
            self.last_index = None
            return self._g_prefixes()
        if layer not in self.query_layers:
            raise ValueError(f"DualPrompt reads its one-stage query entering layer {self.query_layers[0]}, not {layer}")
        return self._e_prefixes(batch_size, query, task_ids)
