"""Multi-task prompts, driven by task_ids [B]; rows of one batch may belong to different tasks.

variant "selector" (multitask prompt tuning): a shared pool P = {p_i} of N prompts [length, d]; per task t a
selector S_t(x) = softmax(W_t · E(x) + b_t) over the pool; the row's prompt is sum_i S_t,i(x) · p_i, placed before
the input. E(x) is the query (the frozen model's encoding of x, see PromptPool, or "embeddings": the masked mean
of the input embeddings). Each row uses its own task's W_t, b_t (gathered by task id), so a mixed batch computes,
row by row, what each task's rows would compute alone.
variant "mpt" (Wang et al. 2023, as in PEFT): a shared prompt P* [length, d] and per task a rank-r matrix
u_t v_tᵀ; task prompt = P* ⊙ (u_t v_tᵀ). The T task prompts are built once per step and gathered by task id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastprompt.ops.gather_prompts import gather_prompts
from fastprompt.ops.mix_prompts import mix_prompts

from .base import QUERY_MODES, PromptConfig, PromptModule, check_task_ids, register_prompt

VARIANTS = ("selector", "mpt")


@dataclass
class MultiTaskPromptConfig(PromptConfig):
    num_tasks: int = 2
    variant: str = "selector"
    pool_size: int = 8  # selector: prompts in the shared pool
    length: int = 10
    rank: int = 1  # mpt: rank of u_t v_tᵀ
    query: str = "mean"  # selector: how E(x) is computed
    placement: str = "input"
    init_std: float = 0.02
    seed: int = 0

    prompt_type = "MultiTaskPrompt"

    def validate(self) -> None:
        super().validate()
        if self.num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {self.num_tasks}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.pool_size < 1 or self.length < 1 or self.rank < 1:
            raise ValueError("pool_size, length and rank must be >= 1")
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {self.query!r}")
        if self.placement != "input":
            raise ValueError("MultiTaskPrompt supports placement='input' only")


@register_prompt
class MultiTaskPrompt(PromptModule):
    """`MultiTaskPrompt(model_or_config, num_tasks=T, variant="selector"|"mpt", pool_size=8, length=10, rank=1,
    query="mean")`; call the patched model with task_ids=LongTensor[B]."""

    config_class = MultiTaskPromptConfig
    needs_task_ids = True

    def __init__(self, config, **kwargs):
        config = self._make_config(config, kwargs)
        super().__init__(config)
        c = self.config
        g = torch.Generator().manual_seed(c.seed)
        d = c.hidden_size
        if c.variant == "selector":
            self.pool = nn.Parameter(torch.randn(c.pool_size, c.length, d, generator=g) * c.init_std)
            self.selector_weight = nn.Parameter(torch.randn(c.num_tasks, c.pool_size, d, generator=g) / d**0.5)
            self.selector_bias = nn.Parameter(torch.zeros(c.num_tasks, c.pool_size))
        else:
            self.shared_prompt = nn.Parameter(torch.randn(c.length, d, generator=g) * c.init_std)
            # u_t v_tᵀ starts near all-ones: every task starts from the shared prompt.
            scale = c.rank**-0.5
            self.task_cols = nn.Parameter(scale + 0.02 * torch.randn(c.num_tasks, c.length, c.rank, generator=g))
            self.task_rows = nn.Parameter(scale + 0.02 * torch.randn(c.num_tasks, c.rank, d, generator=g))

    @property
    def needs_query(self) -> bool:
        return self.config.variant == "selector"

    def num_input_tokens(self) -> int:
        return self.config.length

    def check_query(self, query, batch_size):
        d = self.config.hidden_size
        if query is None:
            raise ValueError("the selector variant needs a query [B, hidden_size] (the integration computes it)")
        if not isinstance(query, Tensor) or query.dim() != 2 or query.shape[1] != d:
            raise ValueError(f"wrong query width: expected [B, {d}], got {tuple(getattr(query, 'shape', ()))}")
        if query.shape[0] != batch_size:
            raise ValueError(f"query has {query.shape[0]} rows, the batch has {batch_size}")

    def selector_weights(self, query: Tensor, task_ids: Tensor) -> Tensor:
        """S_t(x) for each row's own task: [B, N]."""
        w = gather_prompts(self.selector_weight, task_ids)  # [B, N, d]
        b = gather_prompts(self.selector_bias, task_ids)  # [B, N]
        logits = torch.einsum("bnd,bd->bn", w, query.to(w.dtype)) + b
        return torch.softmax(logits, dim=-1)

    def task_prompts(self) -> Tensor:
        """mpt: all T task prompts [T, length, d] = P* ⊙ (u_t v_tᵀ)."""
        return self.shared_prompt[None] * torch.bmm(self.task_cols, self.task_rows)

    def input_prompts(self, batch_size, *, query=None, task_ids=None) -> Tensor:
        task_ids = check_task_ids(task_ids, self.config.num_tasks, batch_size, self._device())
        if self.config.variant == "mpt":
            return gather_prompts(self.task_prompts(), task_ids)  # [B, length, d]
        self.check_query(query, batch_size)
        weights = self.selector_weights(query, task_ids)
        self.last_weights = weights.detach()
        return mix_prompts(self.pool, weights.to(self.pool.dtype))  # [B, length, d]

    def _device(self):
        return next(self.parameters()).device
