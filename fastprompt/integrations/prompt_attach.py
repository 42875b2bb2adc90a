"""Attach one of fastprompt's own prompt modules to a plain transformers model (per instance, reversible).

`attach(model, prompt)` (called by fastprompt.patch_model(model, prompt)):
- makes the prompt the submodule `model.fastprompt_prompt` (moved to the model's device),
- freezes the base model's parameters (their requires_grad flags are remembered and restored by detach),
- replaces THAT INSTANCE's `forward` (an instance attribute; the class is untouched) with one that accepts
  `task_ids=` (multi-task prompts) and `prompt_query=` (an explicit query for pools / selectors) and
  * input placement: prepends the prompt embeddings to inputs_embeds (a shared prompt is computed once per step and
    broadcast with expand), extends attention_mask with ones, token-level labels with -100, token_type_ids with
    zeros, and shifts explicit position_ids by P (prompt tokens take positions 0..P-1, as an input-level prompt);
  * prefix placement: hands per-layer prefixes to attention through
    fastprompt.integrations.transformers_attention (no cache entries, real tokens keep their positions).
- generate() works for causal LMs: the prompt enters at the prefill step; decode steps extend the mask / positions
  (input placement) or re-read the same prefixes, with the pool selection made at prefill kept per cache object.
- encoder-decoder models (T5 / mT5 / BART): input-level prompts go before the encoder input, prefixes into the
  decoder's self-attention; generate() is wrapped too (fastprompt.integrations.seq2seq_own_prompts).
The query of a pool / selector is the frozen model's own encoding of the input: a first pass without prompts under
no_grad (mean / [CLS] / last token of the last hidden state; the encoder's on an encoder-decoder model), or the
masked mean of the input embeddings.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..prompts.base import PromptModule, check_task_ids
from ..prompts.task_heads import attach_head_outputs
from . import own_prompt_generate, query_pass, seq2seq_own_prompts, timm_vit, vision
from .attach_state import PROMPT_ATTR, STATE_ATTR, AttachState, attached_prompt
from .cache_compat import cache_kwarg, cache_length, get_cache, returned_cache, set_cache
from .families import family_facts
from .placement import batch_size, model_device, place_input_prompts
from .prompt_cache import HOISTED, INLINE, PromptInCache, layout_from_lengths, mark_cache, prompt_in_cache
from .prompt_hoisting import enable_for_attached_prompt, hoisted_attached_call, set_prompt_hoisting
from .prompt_tasks import per_token_task, real_token_outputs, take_span_targets
from .query_pass import compute_query
from .seq2seq_attention import check_own_prompt_seq2seq
from .timm_vit import disable_timm_attention, enable_timm_attention
from .transformers_attention import (disable_fastprompt_attention, enable_fastprompt_attention, layer_prefixes,
                                     model_layout, own_prompt_prefixes, set_backend, text_config)

__all__ = ["attach", "detach", "attached_prompt", "compute_query"]


def _check_layer_geometry(model, prompt) -> None:
    """Refuse what a fastprompt prompt cannot do on a model whose layers differ (Gemma 4): one prefix shape for every
    layer, or virtual tokens where the model looks its input embeddings up in its vocabulary (per-layer inputs)."""
    config = text_config(model.config)
    facts = family_facts(getattr(config, "model_type", ""))
    if not (getattr(config, "is_heterogeneous", False) or (facts is not None and (
            facts.kv_shared_layers_field or facts.per_layer_input_field))):
        return
    layout = model_layout(model)
    name = f"{type(model).__name__} (model_type={layout.model_type!r})"
    if prompt.placement == "prefix" and not layout.uniform_prefixes:
        raise ValueError(
            f"fastprompt: {type(prompt).__name__} gives every layer a prefix of one shape, but the layers of {name} "
            f"differ (KV heads and head_dim per layer: {list(layout.layer_kv_shapes)}; K/V read from layers "
            f"{list(layout.kv_sources)}). Use PEFT's PrefixTuning with patch_model, which follows PEFT's per-layer rules")
    if prompt.placement == "input" and layout.per_layer_inputs:
        raise ValueError(
            f"fastprompt: {type(prompt).__name__} places virtual tokens in the input, but {name} has per-layer input "
            "embeddings (hidden_size_per_layer_input > 0) that it recovers from inputs_embeds by a vocabulary lookup "
            "virtual tokens cannot pass. Use a configuration with hidden_size_per_layer_input=0")


def attach(model, prompt: PromptModule, *, freeze_base: bool = True, backend: Optional[str] = None):
    """Attach `prompt` to `model` in place; returns the model."""
    if not isinstance(prompt, PromptModule):
        raise TypeError(f"prompt must be a fastprompt prompt module (PromptTuning, ...), got {type(prompt).__name__}")
    timm = timm_vit.is_timm_vit(model)  # timm's VisionTransformer: no config, its own adapter (timm_vit)
    if not isinstance(model, torch.nn.Module) or not (hasattr(model, "config") or timm):
        raise TypeError(f"model must be a transformers PreTrainedModel or a timm VisionTransformer, got "
                        f"{type(model).__name__}")
    if STATE_ATTR in model.__dict__:
        state = model.__dict__[STATE_ATTR]
        if state.prompt is prompt:  # patching twice with the same prompt is a no-op, except that a different
            if backend is not None and state.attention_token is not None:  # backend is applied (as for PEFT)
                set_backend(model, backend)
            return model
        raise ValueError("this model already has a fastprompt prompt attached; call unpatch_model(model) first")
    vision.check_not_composite(model)
    prompt.check_compatible(model)
    pixels = vision.is_pixel_model(model)
    if pixels:  # ViT / DeiT / DINOv2: pixel_values in (fastprompt.integrations.vision)
        vision.check_vision_prompt(model, prompt)
    elif getattr(prompt, "one_stage", False):
        raise ValueError(f"fastprompt: {type(prompt).__name__}(query_pass='one_stage') (OS-Prompt's one-stage query) "
                         f"is offered on Vision Transformers only; {type(model).__name__} takes the two-pass query "
                         "(query_pass='two_pass', optionally with query_layer=k)")
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if encoder_decoder:  # T5 / mT5 / BART: their own checks and attention plumbing
        check_own_prompt_seq2seq(model, prompt)
    if prompt.placement == "input" and not timm and model.get_input_embeddings() is None:
        raise TypeError(f"{type(model).__name__} has no input embeddings: input-level prompts cannot be placed")
    if not encoder_decoder and not timm:
        _check_layer_geometry(model, prompt)

    prompt_params = {id(p) for p in prompt.parameters()}
    requires_grad = {}
    for name, p in model.named_parameters():
        if id(p) not in prompt_params:
            requires_grad[name] = p.requires_grad
            if freeze_base:
                p.requires_grad_(False)

    token = None
    if prompt.placement == "prefix":
        kwargs = {} if backend is None else {"backend": backend}
        enable = enable_timm_attention if timm else enable_fastprompt_attention  # encoder-decoder: roles recorded
        try:
            token = enable(model, **kwargs)
        except Exception:
            _restore_requires_grad(model, requires_grad)
            raise
    elif not timm:  # causal LMs: the virtual tokens run once per step (see prompt_hoisting)
        try:
            token = enable_for_attached_prompt(model, prompt, backend)
        except Exception:
            _restore_requires_grad(model, requires_grad)
            raise

    device = model_device(model)
    if device is not None:
        prompt.to(device)
    model.add_module(PROMPT_ATTR, prompt)
    bound = model.forward
    state = AttachState(prompt, bound, inspect.signature(bound), requires_grad, token)
    object.__setattr__(model, STATE_ATTR, state)
    state.methods.replace(model, "forward", _PatchedForward(model))
    if pixels:  # vision: query_layer's forward on every layer (its query pass cuts off the layers above k)
        vision.install(model, prompt, state.methods)
    else:
        query_pass.install(model, prompt, state.methods)
    if encoder_decoder:
        seq2seq_own_prompts.install_generate(model, state)
    elif not timm:  # causal LMs with an input-level prompt: static caches get room for it (own_prompt_generate)
        if own_prompt_generate.wants_generate_wrapper(model, prompt):
            own_prompt_generate.install_generate(model, state)
    return model


def detach(model):
    """Undo attach exactly: original forward, no prompt submodule, requires_grad flags and attention restored.
    Returns the model (unchanged when nothing was attached); the prompt module stays usable on its own."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        return model
    state.methods.restore()  # the model's forward / generate and the query pass's layer forwards
    timm = timm_vit.is_timm_vit(model)
    if vision.is_pixel_model(model):
        vision.remove(model)
    set_prompt_hoisting(model, True)  # the default again: patch_model(..., hoist_prompts=False) recorded the opt-out
    if PROMPT_ATTR in model._modules:
        del model._modules[PROMPT_ATTR]
    _restore_requires_grad(model, state.requires_grad)
    if state.attention_token is not None:
        (disable_timm_attention if timm else disable_fastprompt_attention)(model, state.attention_token)
    object.__delattr__(model, STATE_ATTR)
    return model


def _restore_requires_grad(model, flags: Dict[str, bool]) -> None:
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


# ----------------------------------------------------------------------------------------------------------------
# the patched forward


class _PatchedForward:
    """The attached model's forward: the model's own arguments plus `task_ids=` and `prompt_query=`.

    A callable object rather than a closure so that the model pickles, saves with torch.save and deep-copies (a copy
    gets a forward bound to the copy). It holds the model weakly (no reference cycle through the instance's own
    attribute) and reads the attach state from the model on every call.
    """

    __wrapped_by_fastprompt__ = True
    __doc__ = "fastprompt-patched forward: the model's own arguments plus task_ids= and prompt_query=."

    def __init__(self, model):
        self._model_ref = weakref.ref(model)

    def __reduce__(self):
        return (_PatchedForward, (self._model_ref(),))

    def _state(self):
        model = self._model_ref()
        if model is None:
            raise RuntimeError("fastprompt: the model this forward belonged to no longer exists")
        state = model.__dict__.get(STATE_ATTR)
        if state is None:
            raise RuntimeError("fastprompt: this forward belongs to a model whose prompt was detached")
        return model, state

    @property
    def __signature__(self) -> inspect.Signature:
        _, state = self._state()
        signature = state.forward_signature()
        accepts_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        return _wrapped_signature(signature, accepts_var_kwargs)

    def __call__(self, *args, task_ids: Optional[Tensor] = None, prompt_query: Optional[Tensor] = None, **kwargs):
        model, state = self._state()
        signature = state.forward_signature()
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{type(model).__name__}.forward: {err}") from None
        kw = dict(bound.arguments)
        var_kw = next((n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        if var_kw is not None and var_kw in kw:
            kw.update(kw.pop(var_kw))
        return _patched_call(model, state, kw, task_ids, prompt_query)


def _wrapped_signature(signature: inspect.Signature, accepts_var_kwargs: bool) -> inspect.Signature:
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [
        inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("prompt_query", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
    params = [p for p in params if p.name not in ("task_ids", "prompt_query")] + extra
    var = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=params + var)


def _patched_call(model, state: AttachState, kw: Dict[str, Any], task_ids, prompt_query):
    if vision.is_pixel_model(model):
        return vision.patched_call(model, state, kw, task_ids, prompt_query)
    prompt = state.prompt
    encoder_side = prompt.placement == "input" and getattr(model.config, "is_encoder_decoder", False)
    if encoder_side:
        if seq2seq_own_prompts.prompt_in_encoder_outputs(kw):
            return state.bound_forward(**kw)
    batch = batch_size(kw)
    past = get_cache(kw)  # `cache` (transformers 5.24+) or `past_key_values` (older, or the deprecated alias)
    if past is not None:  # handed on under the one name the model's forward takes
        set_cache(kw, past, cache_kwarg(state.forward_signature()))
    # encoder-decoder input placement: the prompt enters with the encoder, whatever the decoder cache holds
    prefill = encoder_side or cache_length(past) == 0
    device = model_device(model)

    if prompt.needs_task_ids:
        task_ids = check_task_ids(task_ids, prompt.config.num_tasks, batch, device)
    elif task_ids is not None:
        if not getattr(prompt, "accepts_task_ids", False):  # optional task ids: DualPrompt's E-prompt in training
            raise ValueError(f"task_ids was given but {type(prompt).__name__} has no tasks")
        task_ids = check_task_ids(task_ids, prompt.num_tasks, batch, device)

    # What the cache holds of the prompt (its layout, the query / prompt rows chosen at prefill) travels in the cache
    # object itself (prompt_cache), so copies, deep copies and the cache a forward made for itself decode right
    in_cache = None if prefill else _prompt_in_decoding_cache(prompt, kw, past, batch)

    query = reuse = None
    heads = getattr(prompt, "heads", None)  # task heads (fastprompt.prompts.task_heads) take the labels
    head_labels, head_mask = (kw.pop("labels", None), kw.get("attention_mask")) if heads is not None else (None, None)
    if prompt.needs_query and (prefill or prompt.placement == "prefix"):
        if prefill:
            if prompt_query is not None:
                query = prompt_query
            else:  # query_layer=k: layers [0, k) only, their output reused below when exact
                query, reuse = query_pass.compute(model, state, prompt, kw)
        else:
            query = in_cache.query if in_cache is not None and in_cache.query is not None else prompt_query
            if query is None:
                raise ValueError("decoding step without the query chosen at prefill: pass prompt_query=")
            if query.shape[0] != batch:
                raise ValueError(
                    f"the query chosen at prefill has {query.shape[0]} rows but this step has {batch}; reordering "
                    "a cache across batch rows is not supported with query-selected prompts"
                )

    prompt.aux_loss = None  # per call: local to this thread / task (PerCallAttribute)
    return_tuple = False
    if prompt.placement == "input":
        out = hoisted_attached_call(model, state, kw, batch, prefill, task_ids, in_cache)
        if out is None:
            task = per_token_task(model) if prefill else None  # token classification / QA: real-token outputs
            if task is not None:
                spans = take_span_targets(kw)
                return_tuple = kw.get("return_dict") is False
                kw["return_dict"] = True
            num = place_input_prompts(model, prompt, kw, batch, prefill, query, task_ids, encoder_side)
            out = state.bound_forward(**kw)
            if prefill and not encoder_side:
                mark_cache(returned_cache(out, past), PromptInCache(INLINE, num, query=_detached(query)))
            if task is not None:
                out = real_token_outputs(task, out, num, spans)
    else:
        prefixes = prompt.layer_prefixes(batch, query=query, task_ids=task_ids)
        place = own_prompt_prefixes if getattr(model.config, "is_encoder_decoder", False) else layer_prefixes
        with place(model, prefixes), query_pass.reusing_lower_layers(model, reuse, kw, state.signature):
            out = state.bound_forward(**kw)
        if prefill and query is not None:  # prefix placement: the cache holds real tokens only, and the query
            mark_cache(returned_cache(out, past), PromptInCache(HOISTED, 0, query=_detached(query)))
    if heads is not None and prefill:
        out = attach_head_outputs(prompt, out, head_mask, task_ids, head_labels)

    aux = prompt.aux_loss
    if aux is not None and getattr(prompt.config, "add_aux_loss", False) and prefill:
        loss = out.get("loss") if hasattr(out, "get") else None
        if loss is not None:
            out["loss"] = loss + aux.to(loss.dtype)
    return out.to_tuple() if return_tuple else out


def _detached(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach()


def _prompt_in_decoding_cache(prompt, kw, past, batch: int) -> Optional[PromptInCache]:
    """What the non-empty cache of a decoding step holds of the prompt: its record, checked against the attention
    mask where one is given; for a cache without a record, the layout told by its length (or a clear error).
    Prefix placement: the cache holds real tokens only, whatever made it (the record carries a pool's query)."""
    record = prompt_in_cache(past)
    if prompt.placement != "input":
        return record
    source = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    seq = source.shape[1]
    num = prompt.num_input_tokens()
    mask = kw.get("attention_mask")
    if record is None:
        return PromptInCache(layout_from_lengths(cache_length(past), mask, seq, num, "a decoding step"), num)
    if mask is not None and mask.dim() == 2:  # the record checked against the mask
        real = mask.shape[1] - seq
        held = cache_length(past)
        if record.layout == INLINE and held == real and bool(mask.all()):
            # Every key visible, over the cache's keys, the prompt's slots included: the mask transformers builds
            # for a static cache when generate() dropped the caller's all-ones mask (generate() given a prompt cache
            # and the whole sequence is refused before it starts: generate_args). As a real-token mask from here on.
            kw["attention_mask"] = mask[:, num:]
            return record
        if held != real + (num if record.layout == INLINE else 0):
            hint = (" generate() reusing a cache that starts with the prompt slices the new tokens by the cache "
                    f"length, prompt included, and so drops {num} of them: pass only the new tokens (with the whole "
                    "attention_mask), or let prompt hoisting fill the cache (its caches hold real tokens only)."
                    if record.layout == INLINE else "")
            raise ValueError(
                f"fastprompt: a decoding step got a KV cache of {held} tokens "
                f"({'the prompt first' if record.layout == INLINE else 'real tokens only'}), but attention_mask says "
                f"{real} real tokens precede the {seq} new ones.{hint}")
    return record
