"""Prompt pool: N prompts with learnable keys, chosen per input by a query from the frozen model.

The query q(x) is the frozen model's own encoding of the input (mean / [CLS] / last token of the last hidden
state of a first pass WITHOUT prompts, under no_grad; computed by the integration, or passed as
`prompt_query=`). `query_layer=k` takes it from the hidden state entering layer k instead: the first pass runs
layers [0, k) only, and when every prompt sits at layer >= k (prefix placement) the real pass reuses those
layers' outputs (fastprompt.integrations.query_pass). The learned encoder E (`encoder="linear" | "mlp" |
<nn.Module>`, fastprompt.prompts.encoder) maps q(x) to the vector that is matched against the keys, and is
trained with the pool.
- Hard selection (top_k = k, L2P): cosine(q, key_n), top-k entries per row; the key-pull loss
  aux_loss = -pull_constraint_coeff * mean cosine of the chosen keys (pull_reduction="l2p": summed over the k chosen
  keys, averaged over the batch, as l2p-pytorch) is stored in `self.aux_loss` (and added to outputs.loss by the
  integration when `add_aux_loss`).
- Soft mixture (top_k = None, CODA/ATTEMPT style): weights over the whole pool, "softmax" of cosine / temperature,
  or "cosine" (CODA: cos(q ⊙ A_n, key_n) with learnable attention vectors A_n, no normalization).
`query_pass="one_stage"` (opt-in, prefix placement; OS-Prompt's one-stage query, a different method from the exact
two-pass default): the query is read from the hidden state entering the first prompted layer in the prompted pass
itself (not detached, as OS-Prompt's code), and its one selection serves every prompted layer.
Placement "input": entries [N, length, d]; chosen entries (k·length tokens) or the mixture (length tokens) go
before the input. Placement "prefix": entries [L_sel, 2, N, Hkv, length, D] per chosen layer; hard selection
hands the pool itself plus the [B, k] index to attention (read in place, never gathered per row); soft mixing
builds one per-sample prefix [B, Hkv, length, D] per layer with mix_prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastprompt.ops.gather_prompts import gather_prompts
from fastprompt.ops.mix_prompts import mix_prompts

from .base import PLACEMENTS, QUERY_MODES, PromptConfig, PromptModule, check_query_pass, layer_prefix_class, \
    normalize_layers, register_prompt
from .encoder import build_encoder, check_encoder_config, encode_query, split_encoder_arg

SOFT_WEIGHTINGS = ("softmax", "cosine")
PULL_REDUCTIONS = ("mean", "l2p")


@dataclass
class PromptPoolConfig(PromptConfig):
    pool_size: int = 10
    length: int = 5
    top_k: Optional[int] = 4  # None = soft mixture over the whole pool
    placement: str = "input"
    layers: Optional[Tuple[int, ...]] = None  # prefix placement; None = every layer
    query: str = "mean"
    soft_weighting: str = "softmax"
    temperature: float = 1.0
    pull_constraint_coeff: float = 0.1
    # "mean": over rows and chosen keys; "l2p": l2p-pytorch's reduce_sim, the chosen keys' cosines summed over the
    # top-k and averaged over the batch (top_k times the mean)
    pull_reduction: str = "mean"
    # hard pools: with task_ids=, row b takes entries [t*k, (t+1)*k) of its task t instead of the best keys (the
    # prompt mask of l2p-pytorch / dualprompt-pytorch in training); without task_ids, the keys choose
    task_entries: bool = False
    add_aux_loss: bool = True
    prefix_dropout: float = 0.0
    init_std: float = 0.02
    seed: int = 0
    # the learned prompt encoder E and where its input comes from (fastprompt.prompts.encoder)
    encoder: Optional[str] = None  # None | "linear" | "mlp" | "custom" (a user nn.Module)
    encoder_hidden_size: int = 0  # mlp width; 0 = hidden_size
    encoder_activation: str = "none"
    encoder_class: str = ""  # "custom": the module's class, for the error message on load
    query_layer: Optional[int] = None  # None: the last hidden state; k: the hidden state entering layer k
    # "two_pass" (exact, the default) or "one_stage" (OS-Prompt: the query is read entering the first prompted
    # layer of the prompted pass itself; prefix placement, Vision Transformers; fastprompt.prompts.base.QUERY_PASSES)
    query_pass: str = "two_pass"

    prompt_type = "PromptPool"

    def validate(self) -> None:
        super().validate()
        if self.pool_size < 1 or self.length < 1:
            raise ValueError(f"pool_size and length must be >= 1, got {self.pool_size}, {self.length}")
        if self.top_k is not None and not 1 <= self.top_k <= self.pool_size:
            raise ValueError(f"top_k must be in [1, pool_size={self.pool_size}] or None, got {self.top_k}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {self.query!r}")
        if self.soft_weighting not in SOFT_WEIGHTINGS:
            raise ValueError(f"soft_weighting must be one of {SOFT_WEIGHTINGS}, got {self.soft_weighting!r}")
        if self.task_entries and self.top_k is None:
            raise ValueError("task_entries needs a hard pool (top_k=k): a task owns k entries")
        if self.pull_reduction not in PULL_REDUCTIONS:
            raise ValueError(f"pull_reduction must be one of {PULL_REDUCTIONS}, got {self.pull_reduction!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.layers is not None:
            if self.placement != "prefix":
                raise ValueError("layers applies to placement='prefix' only")
            self.layers = normalize_layers(self.layers, self.num_layers)
        check_encoder_config(self)
        check_query_pass(self)
        if self.query_pass == "one_stage" and self.placement != "prefix":
            raise ValueError("query_pass='one_stage' needs placement='prefix': input-level prompts enter before "
                             "layer 0, where the pass holds no image-dependent query yet")


@register_prompt
class PromptPool(PromptModule):
    """`PromptPool(model_or_config, pool_size=10, length=5, top_k=4, placement="input"|"prefix", layers=None,
    query="mean"|"cls"|"last"|"embeddings", query_layer=None, encoder=None|"linear"|"mlp"|nn.Module,
    soft_weighting="softmax"|"cosine", pull_constraint_coeff=0.1)`."""

    config_class = PromptPoolConfig

    def __init__(self, config, **kwargs):
        if kwargs.get("layers") is not None:
            kwargs["layers"] = tuple(kwargs["layers"])
        custom_encoder = split_encoder_arg(kwargs)
        config = self._make_config(config, kwargs)
        super().__init__(config)
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        self.keys = nn.Parameter(torch.empty(c.pool_size, c.hidden_size).uniform_(-1, 1, generator=g))
        if c.placement == "input":
            self.layers = ()
            self.pool = nn.Parameter(torch.randn(c.pool_size, c.length, c.input_width, generator=g) * c.init_std)
        else:
            self.layers = normalize_layers(c.layers, c.num_layers)
            shape = (len(self.layers), 2, c.pool_size, c.num_kv_heads, c.length, c.head_dim)
            self.pool = nn.Parameter(torch.randn(shape, generator=g) * c.init_std)
        if c.top_k is None and c.soft_weighting == "cosine":
            self.attention_vectors = nn.Parameter(torch.ones(c.pool_size, c.hidden_size))
        else:
            self.attention_vectors = None
        self.encoder = build_encoder(c, custom_encoder)

    @property
    def needs_query(self) -> bool:
        return True

    @property
    def hard(self) -> bool:
        return self.config.top_k is not None

    def num_input_tokens(self) -> int:
        if self.placement != "input":
            return 0
        return self.config.length * (self.config.top_k or 1)

    # ---- selection -----------------------------------------------------------------------------------------
    def check_query(self, query: Optional[Tensor], batch_size: Optional[int] = None) -> Tensor:
        if query is None:
            raise ValueError("PromptPool needs a query [B, hidden_size] (the integration computes it)")
        if not isinstance(query, Tensor) or query.dim() != 2:
            raise ValueError(f"query must be a [B, {self.keys.shape[1]}] tensor, got {getattr(query, 'shape', query)}")
        if query.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"wrong query width: query is [B, {query.shape[1]}] but the pool keys are {self.keys.shape[1]} wide"
            )
        if batch_size is not None and query.shape[0] != batch_size:
            raise ValueError(f"query has {query.shape[0]} rows, the batch has {batch_size}")
        return query.to(self.keys.dtype)

    def encode(self, query: Tensor) -> Tensor:
        """E(q): the learned encoder applied to the frozen features (the identity without an encoder)."""
        return encode_query(self.encoder, query, self.config.hidden_size).to(self.keys.dtype)

    def select(self, query: Tensor):
        """Hard: (index [B, k], cosine of the chosen keys [B, k]). Soft: (None, weights [B, N])."""
        c = self.config
        q = F.normalize(query, dim=-1)
        if self.hard:
            sim = q @ F.normalize(self.keys, dim=-1).t()  # [B, N]
            chosen_sim, index = sim.topk(c.top_k, dim=-1)
            return index, chosen_sim
        if c.soft_weighting == "softmax":
            sim = q @ F.normalize(self.keys, dim=-1).t()
            return None, torch.softmax(sim / c.temperature, dim=-1)
        # CODA-Prompt: alpha_n = cos(q ⊙ A_n, K_n)
        attended = F.normalize(query[:, None, :] * self.attention_vectors[None], dim=-1)  # [B, N, d]
        weights = (attended * F.normalize(self.keys, dim=-1)[None]).sum(-1)
        return None, weights

    @property
    def accepts_task_ids(self) -> bool:
        return bool(self.config.task_entries)

    @property
    def num_tasks(self) -> int:
        """With task_entries: task t owns entries [t*k, (t+1)*k)."""
        return self.config.pool_size // self.config.top_k

    def task_selection(self, query: Tensor, task_ids: Tensor):
        """(index [B, k] of each row's task entries, cosine of their keys [B, k])."""
        k = self.config.top_k
        index = task_ids.to(device=query.device, dtype=torch.long)[:, None] * k + torch.arange(k, device=query.device)
        sim = F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).t()
        return index, sim.gather(1, index)

    def _select_and_record(self, query: Tensor, task_ids: Optional[Tensor] = None):
        if task_ids is not None and self.config.task_entries:
            index, values = self.task_selection(query, task_ids)
        else:
            index, values = self.select(query)
        if index is not None:
            pulled = values.sum(-1).mean() if self.config.pull_reduction == "l2p" else values.mean()
            self.aux_loss = -self.config.pull_constraint_coeff * pulled
            self.last_index = index.detach()
        else:
            self.aux_loss = None
            self.last_index = None
        return index, values

    # ---- outputs -------------------------------------------------------------------------------------------
    def input_prompts(self, batch_size, *, query=None, task_ids=None) -> Tensor:
        if self.placement != "input":
            raise RuntimeError("this PromptPool has placement='prefix'; use layer_prefixes")
        query = self.encode(self.check_query(query, batch_size))
        index, values = self._select_and_record(query, task_ids)
        if index is not None:
            chosen = gather_prompts(self.pool, index)  # [B, k, length, d]
            return chosen.reshape(batch_size, -1, self.config.input_width)
        return mix_prompts(self.pool, values.to(self.pool.dtype))  # [B, length, d]

    def layer_prefixes(self, batch_size, *, query=None, task_ids=None) -> Dict[int, object]:
        if self.placement != "prefix":
            raise RuntimeError("this PromptPool has placement='input'; use input_prompts")
        LayerPrefix = layer_prefix_class()
        query = self.encode(self.check_query(query, batch_size))
        index, values = self._select_and_record(query, task_ids)
        pool = self.pool
        if self.training and self.config.prefix_dropout > 0:
            pool = F.dropout(pool, p=self.config.prefix_dropout, training=True)
        if index is not None:
            return {
                layer: LayerPrefix(key=pool[i, 0], value=pool[i, 1], index=index)
                for i, layer in enumerate(self.layers)
            }
        entries_first = pool.movedim(2, 0)  # [N, L_sel, 2, Hkv, length, D]
        mixed = mix_prompts(entries_first, values.to(pool.dtype))  # [B, L_sel, 2, Hkv, length, D]
        return {layer: LayerPrefix(key=mixed[:, i, 0], value=mixed[:, i, 1]) for i, layer in enumerate(self.layers)}

    # ---- the one-stage query -------------------------------------------------------------------------------
    @property
    def query_layers(self) -> Tuple[int, ...]:
        """One-stage: the first prompted layer, whose entering hidden state selects for every prompted layer."""
        return (self.layers[0],)

    def one_stage_prefixes(self, batch_size, layer, query, *, task_ids=None) -> Dict[int, object]:
        if layer is None:
            self.aux_loss = None
            self.last_index = None
            return {}
        if layer not in self.query_layers:
            raise ValueError(f"PromptPool reads its one-stage query entering layer {self.query_layers[0]}, not {layer}")
        return self.layer_prefixes(batch_size, query=query, task_ids=task_ids)
