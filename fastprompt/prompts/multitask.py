"""Multi-task prompts, driven by task_ids [B]; rows of one batch may belong to different tasks.

variant "selector" (multitask prompt tuning): a shared pool P = {p_i} of N prompts [length, d]; per task t a
selector S_t(x) = softmax(W_t · E(x) + b_t) over the pool; the row's prompt is sum_i S_t,i(x) · p_i, placed before
the input. E(x) is the query (the frozen model's encoding of x, see PromptPool, or "embeddings": the masked mean
of the input embeddings). Each row uses its own task's W_t, b_t (gathered by task id), so a mixed batch computes,
row by row, what each task's rows would compute alone.
variant "mpt" (Wang et al. 2023, as in PEFT): a shared prompt P* [length, d] and per task a rank-r matrix
u_t v_tᵀ; task prompt = P* ⊙ (u_t v_tᵀ). The T task prompts are built once per step and gathered by task id.

E(x) is learned with `encoder="linear" | "mlp" | <nn.Module>` (fastprompt.prompts.encoder), and `query_layer=k`
takes the frozen features from the hidden state entering layer k (the query pass runs layers [0, k) only).
`heads=fp.TaskHeads(...)` adds the per-task output layers M_t and the loss Σ_t α_t · L_t
(fastprompt.prompts.task_heads): the patched model then returns loss, task_losses, task_logits and task_rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fastprompt.ops.gather_prompts import gather_prompts
from fastprompt.ops.mix_prompts import mix_prompts

from .base import QUERY_MODES, PromptConfig, PromptModule, check_task_ids, register_prompt
from .encoder import build_encoder, check_encoder_config, encode_query, split_encoder_arg
from .task_heads import TaskHeads

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
    # selector: the learned prompt encoder E and where its input comes from (fastprompt.prompts.encoder)
    encoder: Optional[str] = None  # None | "linear" | "mlp" | "custom" (a user nn.Module)
    encoder_hidden_size: int = 0
    encoder_activation: str = "none"
    encoder_class: str = ""
    query_layer: Optional[int] = None
    # task heads M_t and loss weights α_t (fastprompt.prompts.task_heads), in task-id order
    task_heads: Optional[Tuple[dict, ...]] = None
    loss_weights: Optional[Tuple[float, ...]] = None

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
        check_encoder_config(self)
        if self.variant == "mpt" and (self.encoder is not None or self.query_layer is not None):
            raise ValueError("encoder and query_layer apply to variant='selector' only (mpt uses no query)")
        if self.task_heads is not None:
            if len(self.task_heads) != self.num_tasks:
                raise ValueError(f"{len(self.task_heads)} task heads for num_tasks={self.num_tasks}")
            if self.loss_weights is not None and len(self.loss_weights) != self.num_tasks:
                raise ValueError(f"{len(self.loss_weights)} loss weights for num_tasks={self.num_tasks}")


@register_prompt
class MultiTaskPrompt(PromptModule):
    """`MultiTaskPrompt(model_or_config, num_tasks=T, variant="selector"|"mpt", pool_size=8, length=10, rank=1,
    query="mean", query_layer=None, encoder=None|"linear"|"mlp"|nn.Module, heads=None|fp.TaskHeads(...))`; call the
    patched model with task_ids=LongTensor[B] (and labels={task name: ...} with heads). With heads, num_tasks
    defaults to the number of heads."""

    config_class = MultiTaskPromptConfig
    needs_task_ids = True

    def __init__(self, config, *, heads: Optional[TaskHeads] = None, **kwargs):
        custom_encoder = split_encoder_arg(kwargs)
        if heads is not None:
            if not isinstance(heads, TaskHeads):
                raise TypeError(f"heads must be a fastprompt TaskHeads, got {type(heads).__name__}")
            if kwargs.setdefault("num_tasks", len(heads)) != len(heads):
                raise ValueError(f"num_tasks={kwargs['num_tasks']} but heads names {len(heads)} tasks")
            kwargs["task_heads"], kwargs["loss_weights"] = heads.spec_dicts(), heads.loss_weights
        config = self._make_config(config, kwargs)
        super().__init__(config)
        c = self.config
        if heads is None and c.task_heads is not None:  # rebuilt from a saved config (load_prompt)
            heads = TaskHeads.from_spec_dicts(c.hidden_size, c.task_heads, c.loss_weights)
        if heads is not None and heads.hidden_size != c.hidden_size:
            raise ValueError(f"heads are {heads.hidden_size} wide, the model's hidden size is {c.hidden_size}")
        self.heads = heads
        self.encoder = build_encoder(c, custom_encoder)
        g = torch.Generator().manual_seed(c.seed)
        d, width = c.hidden_size, c.input_width  # query features are hidden_size; prompts live in the input width
        if c.variant == "selector":
            self.pool = nn.Parameter(torch.randn(c.pool_size, c.length, width, generator=g) * c.init_std)
            self.selector_weight = nn.Parameter(torch.randn(c.num_tasks, c.pool_size, d, generator=g) / d**0.5)
            self.selector_bias = nn.Parameter(torch.zeros(c.num_tasks, c.pool_size))
        else:
            self.shared_prompt = nn.Parameter(torch.randn(c.length, width, generator=g) * c.init_std)
            # u_t v_tᵀ starts near all-ones: every task starts from the shared prompt.
            scale = c.rank**-0.5
            self.task_cols = nn.Parameter(scale + 0.02 * torch.randn(c.num_tasks, c.length, c.rank, generator=g))
            self.task_rows = nn.Parameter(scale + 0.02 * torch.randn(c.num_tasks, c.rank, width, generator=g))

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

    @property
    def task_names(self) -> Tuple[str, ...]:
        """The heads' task names in task-id order (task0.. without heads)."""
        if self.heads is not None:
            return self.heads.names
        return tuple(f"task{t}" for t in range(self.config.num_tasks))

    def encode(self, query: Tensor) -> Tensor:
        """E(x): the learned encoder applied to the frozen features (the identity without an encoder)."""
        return encode_query(self.encoder, query, self.config.hidden_size)

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
        weights = self.selector_weights(self.encode(query), task_ids)
        self.last_weights = weights.detach()
        return mix_prompts(self.pool, weights.to(self.pool.dtype))  # [B, length, d]

    def _device(self):
        return next(self.parameters()).device
