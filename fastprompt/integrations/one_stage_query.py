"""The one-stage query of OS-Prompt (Kim, Li, Panda, "One-stage Prompt-based Continual Learning", ECCV 2024) for
query-selected prefix prompts (DualPrompt, CodaPrompt, PromptPool with `query_pass="one_stage"`): one forward
instead of two.

The reference implementations (and fastprompt's default, `query_pass="two_pass"`) run the frozen model once
without prompts to get the query, then the prompted model. OS-Prompt takes the query from the prompted pass itself:
in its code (a fork of CODA-Prompt's), the ViT calls `prompt.forward(q, i, x_block)` before block i and the prompt
uses `x_block[:, 0, :]`, the [CLS] of the hidden state ENTERING block i, as the query of block i's prompt, without
detaching it. This is a different method (the query sees the lower layers' prompts, and gradients flow through it),
so it is opt-in; the exact two-pass query stays the default.

How it runs here, without a second pass and without touching the shared model's state:
- at attach, each layer in `prompt.query_layers` gets a forward pre-hook (a module-level function, so the model
  still deep-copies and pickles), idle unless the current call bound a plan to that layer (call_context);
- per call, a `OneStagePrefixes` mapping is bound as the call's layer prefixes. It starts with the prefixes that need
  no query (DualPrompt's G-prompt) and is filled by the hooks as the pass goes up: entering layer l, the hook reads
  the query from the hidden state and adds the prefixes it decides (CODA: layer l's; DualPrompt / PromptPool, which
  pick once for all their layers: every E-layer's). The attention of layer l reads the mapping after the hook ran.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .call_context import CallLocal
from .transformers_attention import find_layers, hf_model

__all__ = ["OneStagePrefixes", "install", "remove", "reading_queries", "check_one_stage", "is_one_stage"]

# layer module -> (the call's OneStagePrefixes, the layer's index), for the call in flight on this thread / task
_PLANS = CallLocal("fastprompt_one_stage_query_plans")


def _layers(model):
    return find_layers(hf_model(model))[1]


class OneStagePrefixes(dict):
    """{layer index: LayerPrefix} of one call, filled as the pass goes up (one object per call, never shared).

    `for_batch` makes the attention integration take it as it is (not a normalized copy), so the prefixes the
    hooks add during the pass are the ones the attention reads."""

    def __init__(self, prompt, batch_size: int, task_ids: Optional[Tensor], mode: str):
        super().__init__(prompt.one_stage_prefixes(batch_size, None, None, task_ids=task_ids))
        self.prompt, self.batch_size, self.task_ids, self.mode = prompt, batch_size, task_ids, mode

    def for_batch(self, batch: int) -> "OneStagePrefixes":
        if batch != self.batch_size:
            raise ValueError(f"fastprompt: the one-stage prefixes were made for {self.batch_size} rows, the layer "
                             f"sees {batch}")
        return self

    def read_query(self, layer_idx: int, hidden: Tensor) -> None:
        """Entering layer `layer_idx`: its hidden state's [CLS] (or token mean) is the query (not detached)."""
        query = hidden[:, 0] if self.mode == "cls" else hidden.mean(dim=1)
        self.update(self.prompt.one_stage_prefixes(self.batch_size, layer_idx, query, task_ids=self.task_ids))


def _read_query_hook(layer, args, kwargs):
    plan = _PLANS.get(layer)
    if plan is None:
        return None
    prefixes, layer_idx = plan
    hidden = args[0] if args else kwargs.get("hidden_states")
    if hidden is None:
        raise ValueError(f"fastprompt: the one-stage query found no hidden_states entering layer {layer_idx}")
    prefixes.read_query(layer_idx, hidden)
    return None


def _query_layer_modules(model, prompt):
    layers = _layers(model)
    return [(i, layers[i]) for i in prompt.query_layers]


def install(model, prompt) -> None:
    """At attach: the idle pre-hook on each layer whose entering hidden state gives a query."""
    if not prompt.one_stage:
        return
    for _, layer in _query_layer_modules(model, prompt):
        if _read_query_hook not in layer._forward_pre_hooks.values():
            layer.register_forward_pre_hook(_read_query_hook, with_kwargs=True)


def remove(model) -> None:
    for layer in _layers(model):
        for key, hook in list(layer._forward_pre_hooks.items()):
            if hook is _read_query_hook:
                del layer._forward_pre_hooks[key]
                layer._forward_pre_hooks_with_kwargs.pop(key, None)


def reading_queries(model, prefixes: OneStagePrefixes):
    """Context for the prompted pass: the query layers' hooks fill `prefixes`."""
    plans = {layer: (prefixes, i) for i, layer in _query_layer_modules(model, prefixes.prompt)}
    return _PLANS.bound_many(plans)


def check_one_stage(model, prompt, leading_tokens: int) -> None:
    """At attach: what the one-stage query needs of the model."""
    name = type(prompt).__name__
    if prompt.placement != "prefix":
        raise ValueError(f"fastprompt: {name}(query_pass='one_stage') needs prefix placement")
    if prompt.query_mode == "cls" and leading_tokens < 1:
        raise ValueError(f"fastprompt: {name}(query_pass='one_stage', query='cls') reads the [CLS] of a hidden "
                         f"state, and {type(model).__name__} has no [CLS] token; use query='mean'")
    layers = _layers(model)
    if not all(0 <= i < len(layers) for i in prompt.query_layers):
        raise ValueError(f"fastprompt: {name} reads one-stage queries entering layers {prompt.query_layers}, but "
                         f"{type(model).__name__} has {len(layers)} layers")


def is_one_stage(prompt) -> bool:
    return bool(getattr(prompt, "one_stage", False))

