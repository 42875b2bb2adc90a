"""The query pass of prompt pools / selectors, made cheap: stop at the query layer, and reuse what it computed.

A pool's query is the frozen model's encoding of the input WITHOUT prompts (fastprompt.integrations.prompt_attach
.compute_query runs the whole model under no_grad for it: one extra forward per step). With `query_layer=k` on the
prompt's config the query is read from the hidden state entering layer k:

- the query pass runs the embeddings and layers [0, k) only: layer k (the last layer's output when k = num_layers)
  records the hidden state and raises a private exception that this module catches, so nothing above layer k runs;
- when every prompt enters at layer >= k (prefix placement, min(prompt.layers) >= k), the real pass's layers below
  k would compute exactly what the query pass computed (they see no prompt): for the real pass, layer 0 returns the
  recorded hidden state and layers 1..k-1 pass it through, so layers [0, k) run once per step, not twice.

Both are done by one forward installed on layers [0, k] when the prompt is attached (`install`, recorded in the
attach's one record of replaced methods, which detach restores), which runs the layer as usual unless the CURRENT
call asked it to stop or to hand on a hidden state. What a call asks is bound to
that call (call_context), never set on the shared layers: a model serving several threads runs each thread's
query pass and reuse without the others seeing them.

The reuse is exact, and taken only when it is: no cache is being filled (past_key_values None, use_cache not True;
the call then runs with use_cache=False so no cache misses the skipped layers), no hidden states / attentions are
requested, nothing below layer k needs a gradient (frozen embeddings and lower layers, inputs_embeds without
grad), and the query came from the pass (not from `prompt_query=`). Otherwise the lower layers are recomputed.

Vision Transformers (fastprompt.integrations.vision) take the query from the model's own output instead of the
raw hidden state: their query pass runs with layers >= k handing their input on ("through", the hidden state
entering layer k recorded by layer k, "tap"), so the model's final norm / pooling head turn it into the pre-logits
of the model cut to its first k layers (`truncated_at`); the forward is then installed on every layer.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .cache_compat import get_cache
from .call_context import CallLocal
from .patched_method import ReplacedMethods
from .transformers_attention import find_layers, hf_model

__all__ = ["compute", "compute_query", "masked_mean", "reusing_lower_layers", "skipping_lower_layers", "truncated_at",
           "LowerLayers", "query_layer_of", "layers_of", "install"]

# layer -> what the current call asks of it: ("stop_before" | "stop_after" | "first" | "through" | "tap", hidden,
# a list that "tap" appends the layer's input to, or None)
_LAYER_ROLES = CallLocal("fastprompt_query_pass_layer_roles")


class _QueryReady(Exception):
    """Raised by the hook at the query layer: carries its hidden state out of the model's forward."""

    def __init__(self, hidden: Tensor):
        super().__init__("fastprompt query pass stop")
        self.hidden = hidden


@dataclass
class LowerLayers:
    """What the query pass computed: the hidden state entering layer `k` of the real pass."""

    k: int
    hidden: Tensor


def query_layer_of(prompt) -> Optional[int]:
    return getattr(prompt.config, "query_layer", None)


def layers_of(model):
    """The model's transformer layers (the ModuleList the query pass runs a prefix of)."""
    return find_layers(hf_model(model))[1]


def compute(model, state, prompt, kw: Dict[str, Any]) -> Tuple[Tensor, Optional[LowerLayers]]:
    """(query [B, hidden], the lower layers' output for the real pass to reuse, or None)."""
    k = query_layer_of(prompt)
    mode = prompt.query_mode
    if k is None or mode == "embeddings":
        query = compute_query(model, state, mode, kw.get("input_ids"), kw.get("attention_mask"),
                              kw.get("inputs_embeds"), kw.get("token_type_ids"))
        return query, None
    layers = layers_of(model)
    hidden = _hidden_entering(model, state, layers, k, kw)
    mask = kw.get("attention_mask")
    if mode == "mean":
        query = masked_mean(hidden, mask)
    elif mode == "cls":
        query = hidden[:, 0]
    elif mode == "last":
        if mask is None:
            query = hidden[:, -1]
        else:
            real = mask.to(torch.long)
            last = real.shape[1] - 1 - torch.argmax(real.flip(1), dim=1)
            query = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        raise ValueError(f"unknown query mode {mode!r}")
    reuse = LowerLayers(k, hidden) if _can_reuse(model, prompt, layers, k, kw) else None
    return query, reuse


class _QueryLayerForward:
    """Installed as the forward of layers [0, k]: the layer's own forward unless the current call asks otherwise.

    A plain object holding the layer and the forward it stands in front of (the layer's own instance attribute
    before install, e.g. an accelerate hook, or None for its class's), so the model pickles and deep-copies."""

    def __init__(self, layer, inner):
        self.layer = layer
        self.inner = inner

    def __call__(self, *args, **kwargs):
        layer = self.layer
        role = _LAYER_ROLES.get(layer)
        if role is not None:
            kind, hidden = role
            hidden_states = args[0] if args else kwargs.get("hidden_states")
            if kind == "stop_before":
                raise _QueryReady(hidden_states)
            if kind == "first":  # layer 0: what layers [0, k) computed in the query pass
                return hidden
            if kind == "through":  # layers 1..k-1: already included (vision query pass: layers above k, cut off)
                return hidden_states
            if kind == "tap":  # vision query pass: layer k records the hidden state entering it, and is cut off
                hidden.append(hidden_states)
                return hidden_states
        out = self.inner(*args, **kwargs) if self.inner is not None else type(layer).forward(layer, *args, **kwargs)
        if role is not None and role[0] == "stop_after":
            raise _QueryReady(out[0] if isinstance(out, (tuple, list)) else out)
        return out

    def __repr__(self):
        return f"<fastprompt query-pass forward of {type(self.layer).__name__}>"


def install(model, prompt, methods: ReplacedMethods, *, every_layer: bool = False) -> None:
    """At attach time: layers [0, k] of a prompt with `query_layer=k` (every layer with `every_layer`: a vision
    model's query pass cuts off the layers above k) take a `_QueryLayerForward` (idle unless a call binds a role to
    them), each replacement recorded in `methods`, the attach's one record (detach restores it). Installing twice
    changes nothing."""
    k = query_layer_of(prompt)
    if k is None or prompt.query_mode == "embeddings" or k < 0:
        return
    layers = layers_of(model)
    count = len(layers) if every_layer else min(k, len(layers) - 1) + 1
    for layer in list(layers)[:count]:
        if methods.installed(layer, "forward") is not None:
            continue
        methods.replace(layer, "forward", _QueryLayerForward(layer, layer.__dict__.get("forward")))


def _hidden_entering(model, state, layers, k: int, kw) -> Tensor:
    """Run embeddings + layers [0, k) without prompts under no_grad; the hidden state entering layer k."""
    if k < len(layers):
        stop = {layers[k]: ("stop_before", None)}
    else:
        stop = {layers[k - 1]: ("stop_after", None)}
    call = state.bound_forward
    params = inspect.signature(call).parameters
    kwargs = {"attention_mask": kw.get("attention_mask")}
    if kw.get("inputs_embeds") is not None:
        kwargs["inputs_embeds"] = kw["inputs_embeds"]
    else:
        kwargs["input_ids"] = kw.get("input_ids")
    for name in ("token_type_ids", "position_ids"):
        if kw.get(name) is not None and name in params:
            kwargs[name] = kw[name]
    if "use_cache" in params:
        kwargs["use_cache"] = False
    try:
        with torch.no_grad(), _LAYER_ROLES.bound_many(stop):
            call(**kwargs)
    except _QueryReady as ready:
        return ready.hidden
    raise RuntimeError(f"fastprompt: the query pass never reached layer {k} of {type(model).__name__}")


def _can_reuse(model, prompt, layers, k: int, kw) -> bool:
    if k < 1 or prompt.placement != "prefix":
        return False
    prompt_layers = getattr(prompt, "layers", ())
    if not prompt_layers or min(prompt_layers) < k:
        return False  # a prompt below k changes what the lower layers compute
    if get_cache(kw) is not None or kw.get("use_cache") is True:  # `cache` or `past_key_values`
        return False  # the skipped layers would leave no cache entries
    if kw.get("output_hidden_states") or kw.get("output_attentions"):
        return False  # the skipped layers' own outputs are asked for
    embeds = kw.get("inputs_embeds")
    if embeds is not None and embeds.requires_grad:
        return False
    if kw.get("position_ids") is not None and kw.get("position_ids").shape[0] != _batch(kw):
        return False
    if torch.is_grad_enabled():
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        lower = [p for layer in layers[:k] for p in layer.parameters()]
        lower += list(emb.parameters()) if emb is not None else []
        if any(p.requires_grad for p in lower):
            return False  # unfrozen lower weights: their gradient needs the real pass through them
    return True


def _batch(kw) -> int:
    t = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    return t.shape[0]


def reusing_lower_layers(model, reuse: Optional[LowerLayers], kw: Dict[str, Any], signature: inspect.Signature):
    """Context for the real pass: layers [0, k) hand on `reuse.hidden` instead of computing (nullcontext when
    there is nothing to reuse). Sets use_cache=False in `kw` when the forward takes it."""
    if reuse is None:
        return nullcontext()
    if "use_cache" in signature.parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        kw["use_cache"] = False
    return _skip_lower_layers(layers_of(model), reuse)


def _skip_lower_layers(layers, reuse: LowerLayers):
    roles = {layers[i]: ("first", reuse.hidden) if i == 0 else ("through", None) for i in range(reuse.k)}
    return _LAYER_ROLES.bound_many(roles)


def skipping_lower_layers(model, reuse: Optional[LowerLayers]):
    """Context for a real pass that takes no use_cache (vision): layers [0, k) hand on `reuse.hidden`."""
    return nullcontext() if reuse is None else _skip_lower_layers(layers_of(model), reuse)


@contextmanager
def truncated_at(model, k: int):
    """Context for a vision query pass: layers >= k hand their input on unchanged, so the model's output is that of
    the model cut to layers [0, k) (its final norm / pooling head still applied). Yields a list that holds the
    hidden state entering layer k once the pass has run (empty when k = num_layers)."""
    layers = layers_of(model)
    entering: list = []
    roles = {layers[i]: ("tap", entering) if i == k else ("through", None) for i in range(k, len(layers))}
    with _LAYER_ROLES.bound_many(roles):
        yield entering


# ----------------------------------------------------------------------------------------------------------------
# the query


def compute_query(model, state, mode: str, input_ids, attention_mask, inputs_embeds,
                  token_type_ids=None) -> Tensor:
    """[B, hidden]: the frozen model's encoding of the input, without prompts, under no_grad."""
    with torch.no_grad():
        if mode == "embeddings":
            embeds = inputs_embeds if inputs_embeds is not None else model.get_input_embeddings()(input_ids)
            return masked_mean(embeds, attention_mask)
        base = getattr(model, "base_model", model)
        call = state.bound_forward if (base is model and state is not None) else base
        if getattr(model.config, "is_encoder_decoder", False):
            call = model.get_encoder()  # the decoder needs a target: the query is the encoder's encoding
        kwargs = dict(attention_mask=attention_mask)
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        params = inspect.signature(call).parameters
        if token_type_ids is not None and "token_type_ids" in params:
            kwargs["token_type_ids"] = token_type_ids
        if "use_cache" in params:
            kwargs["use_cache"] = False
        out = call(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if mode == "mean":
            return masked_mean(hidden, attention_mask)
        if mode == "cls":
            return hidden[:, 0]
        if mode == "last":
            if attention_mask is None:
                return hidden[:, -1]
            mask = attention_mask.to(torch.long)
            length = mask.shape[1]
            last = length - 1 - torch.argmax(mask.flip(1), dim=1)  # last real token (left or right padding)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        raise ValueError(f"unknown query mode {mode!r}")


def masked_mean(hidden: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
