"""CODA-Prompt (Smith et al., CVPR 2023): per-layer prefixes that are a per-row weighted sum of learned components,
grown by one slice per task.

Semantics of the reference implementation (GT-RIPL/CODA-Prompt, models/zoo.py CodaPrompt and vit.py):
- in each prompted layer l (published: 0-4) a component pool P_l `[N, length, Hkv*D]`, keys K_l `[N, hidden]` and
  attention vectors A_l `[N, hidden]`; row b's weights are alpha_bn = cos(q_b * A_ln, K_ln) (no softmax), its
  prompt sum_n alpha_bn P_ln `[length, Hkv*D]`, whose first length/2 tokens are the key prefix and the rest the
  value prefix (each token's width split into heads: `reshape(B, -1, H, D).permute(0, 2, 1, 3)`);
- the pool is split into `num_tasks` slices of N / num_tasks components; during task t the slices 0..t are used,
  slices < t frozen (the reference detaches them in training), later slices unused; `next_task()` moves on;
- a new slice starts orthonormal and orthogonal to every earlier component of its layer (components flattened,
  keys, attention vectors; the reference's Gram-Schmidt; here the earlier slices' span is projected out exactly,
  so the new slice is orthogonal to it even where trained earlier slices are no longer orthogonal to each other);
- in training the orthogonality penalty ortho_mu * sum_l [o(K_l) + o(A_l) + o(P_l flattened)], with
  o(T) = mean((T T^T - I)^2) over the slices in use, is stored in `aux_loss` (added to outputs.loss by the
  integration).
`query_pass="one_stage"` (opt-in; OS-Prompt, Kim et al. ECCV 2024, whose code is CODA-Prompt's with this change, a
different method from the exact two-pass default): layer l's weights take as query the [CLS] of the hidden state
entering layer l in the prompted pass itself (OS-Prompt's `x_querry = x_block[:, 0, :]`, not detached: the loss
reaches the lower layers' prompts through it). No frozen first pass runs. At layer 0 that [CLS] is the [CLS] token
plus its position embedding, the same for every image, so layer 0's mixture is the same for every row, as in
OS-Prompt's code. (OS-Prompt's weights are cos(q, K) without attention vectors; here they keep CODA's A.)
`last_weights` holds {layer: [B, f] weights} of the last call, in both modes.
Each slice is its own parameter, so a frozen slice has requires_grad False and no gradient: an optimizer step
(momentum, weight decay included) leaves it unchanged. `task_count` is a buffer: save / load keeps the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastprompt.ops.mix_prompts import mix_prompts

from .base import QUERY_MODES, PromptConfig, PromptModule, check_query_pass, layer_prefix_class, normalize_layers, \
    register_prompt


@dataclass
class CodaPromptConfig(PromptConfig):
    pool_size: int = 100
    length: int = 8
    layers: Tuple[int, ...] = (0, 1, 2, 3, 4)
    num_tasks: int = 10
    ortho_mu: float = 0.0
    query: str = "cls"
    add_aux_loss: bool = True
    seed: int = 0
    query_pass: str = "two_pass"  # or "one_stage" (OS-Prompt; fastprompt.prompts.base.QUERY_PASSES)

    prompt_type = "CodaPrompt"

    def validate(self) -> None:
        super().validate()
        if self.num_tasks < 1 or self.pool_size < self.num_tasks or self.pool_size % self.num_tasks:
            raise ValueError(f"pool_size ({self.pool_size}) must be a positive multiple of num_tasks "
                             f"({self.num_tasks}): each task adds pool_size / num_tasks components")
        if self.length < 2 or self.length % 2:
            raise ValueError(f"length must be even and >= 2 (split into key and value halves), got {self.length}")
        if self.ortho_mu < 0:
            raise ValueError(f"ortho_mu must be >= 0, got {self.ortho_mu}")
        self.layers = normalize_layers(tuple(self.layers), self.num_layers)
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {self.query!r}")
        check_query_pass(self)


def _after_load(module, incompatible_keys) -> None:
    module._apply_freezing()


@register_prompt
class CodaPrompt(PromptModule):
    """`CodaPrompt(model_or_config, pool_size=100, length=8, layers=(0, 1, 2, 3, 4), num_tasks=10, ortho_mu=0.0)`;
    call `prompt.next_task()` between tasks."""

    config_class = CodaPromptConfig

    def __init__(self, config, **kwargs):
        if kwargs.get("layers") is not None:
            kwargs["layers"] = tuple(kwargs["layers"])
        config = self._make_config(config, kwargs)
        super().__init__(config)
        c = self.config
        self.layers = c.layers
        per_task = c.pool_size // c.num_tasks
        width = c.num_kv_heads * c.head_dim
        slices = lambda *shape: nn.ParameterList(  # noqa: E731
            [nn.Parameter(torch.zeros(len(self.layers), per_task, *shape)) for _ in range(c.num_tasks)])
        self.components = slices(c.length, width)
        self.keys = slices(c.hidden_size)
        self.attention_vectors = slices(c.hidden_size)
        self.register_buffer("task_count", torch.zeros((), dtype=torch.long))
        self._init_slice(0)
        self._apply_freezing()
        self.register_load_state_dict_post_hook(_after_load)

    @property
    def placement(self) -> str:
        return "prefix"

    @property
    def needs_query(self) -> bool:
        return True

    @property
    def task(self) -> int:
        return int(self.task_count)

    def num_input_tokens(self) -> int:
        return 0

    # ---- tasks ---------------------------------------------------------------------------------------------
    def next_task(self) -> int:
        """Freeze the current slice and start the next one (orthogonal to all earlier ones); returns its task."""
        task = self.task + 1
        if task >= self.config.num_tasks:
            raise ValueError(f"CodaPrompt was built for num_tasks={self.config.num_tasks}; task {task} has no slice")
        self._init_slice(task)
        self.task_count.fill_(task)
        self._apply_freezing()
        return task

    def _apply_freezing(self) -> None:
        task = self.task
        for slices in (self.components, self.keys, self.attention_vectors):
            for t, p in enumerate(slices):
                p.requires_grad_(t >= task)  # later slices stay trainable so that an optimizer made now sees them
                if t < task:
                    p.grad = None

    @torch.no_grad()
    def _init_slice(self, task: int) -> None:
        g = torch.Generator().manual_seed(self.config.seed + 7919 * task)
        for slices in (self.components, self.keys, self.attention_vectors):
            new = slices[task]
            old = torch.cat([slices[t] for t in range(task)], dim=1) if task else None
            for i in range(new.shape[0]):
                earlier = old[i].reshape(old.shape[1], -1) if old is not None else None
                rows = _orthonormal_rows(new.shape[1], new[i].numel() // new.shape[1], earlier, g)
                new[i].copy_(rows.reshape(new[i].shape).to(new.dtype))

    # ---- the prefixes --------------------------------------------------------------------------------------
    def _in_use(self, slices, position: Optional[int] = None) -> Tensor:
        """[L_sel, f, ...] (or [f, ...] for the layer at `position`): slices 0..task, the earlier ones without
        gradient."""
        task = self.task
        parts = [slices[t] if position is None else slices[t][position] for t in range(task + 1)]
        parts = [p.detach() if t < task else p for t, p in enumerate(parts)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0 if position is not None else 1)

    def weights(self, query: Tensor, position: Optional[int] = None) -> Tensor:
        """[L_sel, B, f] (or [B, f] for the layer at `position`): alpha_bn = cos(q_b * A_n, K_n)."""
        keys = self._in_use(self.keys, position)
        attention = self._in_use(self.attention_vectors, position)
        if query is None or query.dim() != 2 or query.shape[1] != keys.shape[-1]:
            raise ValueError(f"CodaPrompt needs a query [B, {keys.shape[-1]}] (the integration computes it), got "
                             f"{getattr(query, 'shape', query)}")
        if position is not None:
            keys, attention = keys[None], attention[None]
        q = query.to(keys.dtype)
        attended = F.normalize(q[None, :, None, :] * attention[:, None], dim=-1)  # [L, B, f, d]
        weights = (attended * F.normalize(keys, dim=-1)[:, None]).sum(-1)
        return weights[0] if position is not None else weights

    def _layer_prefix(self, position: int, weights: Tensor, batch_size: int):
        """Layer `position`'s prefix from its weights [B, f]."""
        c = self.config
        if weights.shape[0] != batch_size:
            raise ValueError(f"query has {weights.shape[0]} rows, the batch has {batch_size}")
        components = self._in_use(self.components, position)  # [f, length, Hkv*D]
        mixed = mix_prompts(components, weights.to(components.dtype))  # [B, length, Hkv*D]
        heads = mixed.view(batch_size, c.length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        half = c.length // 2
        return layer_prefix_class()(key=heads[:, :, :half], value=heads[:, :, half:])

    def layer_prefixes(self, batch_size, *, query=None, task_ids=None) -> Dict[int, object]:
        weights = self.weights(query)
        self.last_weights = {layer: weights[i].detach() for i, layer in enumerate(self.layers)}
        prefixes = {layer: self._layer_prefix(i, weights[i], batch_size) for i, layer in enumerate(self.layers)}
        self.aux_loss = self.orthogonality_penalty() if (self.training and self.config.ortho_mu > 0) else None
        return prefixes

    @property
    def query_layers(self) -> Tuple[int, ...]:
        """One-stage: every prompted layer reads its own query (OS-Prompt)."""
        return self.layers

    def one_stage_prefixes(self, batch_size, layer, query, *, task_ids=None) -> Dict[int, object]:
        if layer is None:
            self.last_weights = {}
            self.aux_loss = self.orthogonality_penalty() if (self.training and self.config.ortho_mu > 0) else None
            return {}
        if layer not in self.layers:
            raise ValueError(f"CodaPrompt has no prefix in layer {layer} (its layers: {self.layers})")
        position = self.layers.index(layer)
        weights = self.weights(query, position)
        self.last_weights = {**(self.last_weights or {}), layer: weights.detach()}
        return {layer: self._layer_prefix(position, weights, batch_size)}

    def orthogonality_penalty(self) -> Tensor:
        """ortho_mu * sum over layers of o(K) + o(A) + o(P flattened), o(T) = mean((T T^T - I)^2)."""
        total = 0.0
        for slices in (self.keys, self.attention_vectors, self.components):
            used = self._in_use(slices)
            flat = used.reshape(used.shape[0], used.shape[1], -1)
            eye = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
            total = total + ((flat @ flat.transpose(1, 2) - eye) ** 2).mean(dim=(1, 2)).sum()
        return self.config.ortho_mu * total


def _orthonormal_rows(count: int, dim: int, earlier, generator) -> Tensor:
    """[count, dim] orthonormal rows, orthogonal to the rows of `earlier` ([s, dim] or None), in float64."""
    used = 0 if earlier is None else earlier.shape[0]
    if used + count > dim:
        raise ValueError(f"CodaPrompt: {used + count} orthogonal components do not fit in {dim} dimensions")
    rows = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    if earlier is not None:
        basis = torch.linalg.qr(earlier.double().t()).Q  # [dim, s]: spans the earlier components
        for _ in range(2):  # twice: classical projection loses orthogonality once, not twice
            rows = rows - (rows @ basis) @ basis.t()
    rows = torch.linalg.qr(rows.t()).Q.t()  # orthonormal, still in the complement
    if earlier is not None:
        rows = rows - (rows @ basis) @ basis.t()
        rows = F.normalize(rows, dim=-1)
    return rows
