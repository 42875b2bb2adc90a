"""Several prefix prompts on one model at once, each in its own layers: `PromptStack(prompt_a, prompt_b, ...)`.

What DualPrompt does with its G and E prompts, for any prefix prompts: e.g. a PTuningV2 prefix shared by all
inputs in the lower layers and a PromptPool or CodaPrompt in the layers above. Each member builds its own layers'
prefixes once per step; the stack hands their union to the attention (a layer holds one member's prefix: the
members' layers must not overlap). The members share the query (the same frozen-model pass; their `query` modes
must agree), optional `task_ids=` reach the members that accept them, and the members' auxiliary losses (key-pull,
orthogonality) are summed. Saved and loaded as one prompt: the config lists the members' configs, the weights are
`members.<i>.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn

from .base import PromptConfig, PromptModule, prompt_class, register_prompt


@dataclass
class PromptStackConfig(PromptConfig):
    members: Tuple[dict, ...] = ()  # each member's config (to_dict), in order
    add_aux_loss: bool = True  # add the members' summed auxiliary losses (each as its own add_aux_loss says)

    prompt_type = "PromptStack"


def _member_from_dict(data: dict) -> PromptModule:
    cls = prompt_class(data.get("prompt_type", ""))
    return cls(cls.config_class.from_dict(data))


@register_prompt
class PromptStack(PromptModule):
    """`PromptStack(prompt_a, prompt_b, ...)`: prefix prompts in disjoint layers of one model."""

    config_class = PromptStackConfig

    def __init__(self, *prompts):
        if len(prompts) == 1 and isinstance(prompts[0], PromptStackConfig):  # load_prompt rebuilding a saved stack
            config = prompts[0]
            prompts = tuple(_member_from_dict(dict(d)) for d in config.members)
        else:
            config = None
        if len(prompts) < 2 or not all(isinstance(p, PromptModule) for p in prompts):
            raise TypeError("PromptStack takes two or more fastprompt prompt modules, got "
                            f"{[type(p).__name__ for p in prompts]}")
        for p in prompts:
            if p.placement != "prefix":
                raise ValueError(f"PromptStack holds prefix prompts; {type(p).__name__} has placement "
                                 f"{p.placement!r} (an input-level prompt cannot be stacked yet)")
            if getattr(p.config, "encoder", None) == "custom":
                raise ValueError(f"PromptStack cannot save / load a {type(p).__name__} with a custom encoder")
        dims = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        first = prompts[0].config
        for p in prompts[1:]:
            bad = [d for d in dims if getattr(p.config, d) != getattr(first, d)]
            if bad:
                raise ValueError(f"PromptStack members were built for different models ({', '.join(bad)} differ)")
        seen: Dict[int, str] = {}
        for p in prompts:
            for layer in p.layers:
                if layer in seen:
                    raise ValueError(f"PromptStack members overlap in layer {layer} ({seen[layer]} and "
                                     f"{type(p).__name__}); each layer takes one member's prefix")
                seen[layer] = type(p).__name__
        if any(p.one_stage for p in prompts):
            raise ValueError("PromptStack members with query_pass='one_stage' cannot be stacked yet (the stack's "
                             "members share one two-pass query); DualPrompt(query_pass='one_stage') has G and E")
        modes = {p.query_mode for p in prompts if p.needs_query}
        if len(modes) > 1:
            raise ValueError(f"PromptStack members ask for different queries {sorted(modes)}; they share one pass")
        if any(p.needs_task_ids for p in prompts):
            raise ValueError("PromptStack members that need task_ids cannot be stacked yet")
        if config is None:
            config = PromptStackConfig(**{d: getattr(first, d) for d in dims}, model_type=first.model_type,
                                       embedding_size=first.embedding_size,
                                       members=tuple(p.config.to_dict() for p in prompts))
        super().__init__(config)
        self.members = nn.ModuleList(prompts)
        self.layers = tuple(sorted(seen))
        self._query_mode = modes.pop() if modes else "mean"

    @property
    def placement(self) -> str:
        return "prefix"

    @property
    def needs_query(self) -> bool:
        return any(p.needs_query for p in self.members)

    @property
    def query_mode(self) -> str:
        return self._query_mode

    @property
    def accepts_task_ids(self) -> bool:
        return any(getattr(p, "accepts_task_ids", False) for p in self.members)

    @property
    def num_tasks(self) -> int:
        return min(p.num_tasks for p in self.members if getattr(p, "accepts_task_ids", False))

    def num_input_tokens(self) -> int:
        return 0

    def layer_prefixes(self, batch_size, *, query=None, task_ids=None) -> Dict[int, object]:
        prefixes = {}
        total: Optional[object] = None
        for p in self.members:
            takes = task_ids if getattr(p, "accepts_task_ids", False) else None
            prefixes.update(p.layer_prefixes(batch_size, query=query if p.needs_query else None, task_ids=takes))
            if p.aux_loss is not None and getattr(p.config, "add_aux_loss", True):
                total = p.aux_loss if total is None else total + p.aux_loss
        self.aux_loss = total
        return prefixes

    def check_compatible(self, model_or_config) -> None:
        for p in self.members:
            p.check_compatible(model_or_config)
