"""fastprompt's own prompts on Vision Transformers: Hugging Face ViT, DeiT, DINOv2, CLIP's and SigLIP's vision
towers, and timm's VisionTransformer (its adapter: timm_vit). Pixel inputs, no token ids.

A vision family is an entry of the family table (families.py, `inputs="pixels"`); prefixes reach its attention
through the same registered attention function as text models (transformers_attention). What differs from text
models, and lives here:

- the call takes `pixel_values` (timm: `x`); the batch size, the query and the input-level prompts come from them;
- input-level prompts (PromptTuning, PromptPool(placement="input")) are inserted into the output of the model's
  embeddings module, i.e. after the position embedding (the prompts get no position) and after the leading tokens
  ([CLS]; DeiT's distillation token): the sequence is [CLS, prompts, patches], the order of l2p-pytorch, so the
  [CLS] head still reads position 0. (l2p-pytorch also adds [CLS]'s frozen position embedding to each prompt: a
  constant shift of the learned prompt, left to its initialization here.) A forward hook on the embeddings module,
  installed at attach and removed at detach, does the insertion; what it inserts travels with the call in a context
  variable (per thread / task), never as state on the module. On timm, a forward pre-hook on `norm_pre` inserts
  them after its `num_prefix_tokens` leading tokens ([CLS], register tokens; timm_vit);
- the query of a pool is the frozen model's [CLS] pre-logits (the final layer norm's output at [CLS]: timm's
  `forward_head(pre_logits=True)`, which the reference implementations use; CLIP: the pooler output, i.e.
  post_layernorm at [CLS]; SigLIP, which has no [CLS]: its attention-pooling head's output) from a first pass
  without prompts under no_grad, or the mean of the last hidden state over all tokens with query="mean" (timm:
  `forward_head(forward_features(x), pre_logits=True)`, or the mean of `forward_features(x)`);
  with `query_pass="one_stage"` (OS-Prompt, opt-in) no such pass runs: the query is read inside the prompted pass
  (one_stage_query);
- with `query_layer=k` the query is the same read-out of the model CUT TO ITS FIRST k LAYERS: the hidden state
  entering layer k, through the model's own final norm (and CLIP's / SigLIP's pooling), then [CLS] (or the token
  mean). Unlike text models, whose query_layer reads the raw hidden state, the final norm is applied: a pre-norm
  ViT's residual stream is unnormalized between layers (its scale and mean drift with depth), the reference
  methods match keys against normalized pre-logits, and so query_layer=num_layers is exactly the default query.
  The query pass runs the embeddings and layers [0, k) only (the layers above hand their input on:
  query_pass.truncated_at); where every prompt enters at layer >= k (prefix placement) the real pass reuses what
  it computed, layers [0, k) running once per step, under the text models' conditions (frozen embeddings and
  lower layers, pixel_values without grad, no hidden states / attentions asked for, the query not given by
  `prompt_query=`);
- the prompt may take optional task ids (`accepts_task_ids`, DualPrompt's E-prompt in training), besides the
  multi-task prompts that need them.
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from fastprompt.prompts.base import check_task_ids

from . import one_stage_query, query_pass, timm_vit
from .families import family_facts
from .transformers_attention import layer_prefixes

PIXELS = "pixels"

__all__ = ["is_pixel_model", "check_not_composite", "check_vision_prompt", "install", "remove", "patched_call",
           "vision_query"]

# {id(embeddings module): (prompts [B, P, d], leading tokens)} for the call in flight on this thread / task
_INSERTS: contextvars.ContextVar = contextvars.ContextVar("fastprompt_vision_inserts", default=None)


def _model_type(model) -> str:
    if timm_vit.is_timm_vit(model):
        return timm_vit.TIMM_VIT_MODEL_TYPE
    return getattr(getattr(model, "config", None), "model_type", "")


def _facts(model):
    return family_facts(_model_type(model))


def _pixel_argument(model) -> str:
    return timm_vit.PIXEL_ARGUMENT if timm_vit.is_timm_vit(model) else "pixel_values"


def _leading_tokens(model) -> int:
    return timm_vit.leading_tokens(model) if timm_vit.is_timm_vit(model) else _facts(model).leading_tokens


def is_pixel_model(model) -> bool:
    facts = _facts(model)
    return facts is not None and facts.inputs == PIXELS


def _embeddings_module(model):
    if timm_vit.is_timm_vit(model):
        return timm_vit.insertion_module(model)
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    if not isinstance(emb, torch.nn.Module):
        raise TypeError(f"fastprompt: found no `embeddings` module in {type(model).__name__}, where input-level "
                        "prompts would be inserted after the position embedding")
    return emb


def check_not_composite(model) -> None:
    """An image-text model (CLIP, SigLIP) or a classifier around a vision tower: the prompt belongs in the tower."""
    tower = getattr(model, "vision_model", None)
    if not is_pixel_model(model) and isinstance(tower, torch.nn.Module) and hasattr(tower, "config") \
            and is_pixel_model(tower):
        raise TypeError(f"fastprompt: {type(model).__name__} wraps a vision tower; attach the prompt to the tower "
                        f"itself: fp.patch_model(model.vision_model, prompt), with the prompt built from "
                        f"model.vision_model (the outer model then calls the patched tower)")


def check_vision_prompt(model, prompt) -> None:
    """What fastprompt's prompts support on a pixel model; a clear error for the rest (called by attach)."""
    name = type(prompt).__name__
    if getattr(prompt, "heads", None) is not None:
        raise ValueError(f"fastprompt: {name} has task heads, which read token-level outputs of text models; on "
                         f"{type(model).__name__} put a classifier on the model's own outputs instead")
    if prompt.needs_query and prompt.query_mode not in ("cls", "mean"):
        raise ValueError(f"fastprompt: {name}(query={prompt.query_mode!r}) does not apply to a Vision Transformer; "
                         "use query='cls' (the [CLS] pre-logits, as L2P / DualPrompt / CODA-Prompt) or 'mean'")
    if timm_vit.is_timm_vit(model):
        timm_vit.check_timm_model(model)
        if prompt.needs_query and getattr(prompt.config, "query_layer", None) is not None:
            raise ValueError(f"fastprompt: {name}(query_layer=...) is offered on Hugging Face Vision Transformers; "
                             f"on timm's {type(model).__name__} the query is the full model's "
                             "forward_head(pre_logits=True) (query_layer=None), or query_pass='one_stage'")
    if prompt.placement == "input":
        _embeddings_module(model)
    if one_stage_query.is_one_stage(prompt):
        if timm_vit.is_timm_vit(model):  # [CLS] at index 0 only if the model has one: without it, timm's leading
            lead = int(getattr(model, "cls_token", None) is not None)  # tokens are register tokens, not a query
        else:
            lead = _facts(model).leading_tokens
        one_stage_query.check_one_stage(model, prompt, lead)


def _with_prompts(module, tokens):
    """`tokens` [B, L, d] with the call's prompts for `module` inserted after the leading tokens, or None."""
    inserts = _INSERTS.get()
    entry = inserts.get(id(module)) if inserts else None
    if entry is None:
        return None
    prompts, lead = entry
    if prompts.shape[0] != tokens.shape[0]:
        raise ValueError(f"fastprompt: {prompts.shape[0]} rows of prompts for a batch of {tokens.shape[0]} images")
    prompts = prompts.to(tokens.dtype)
    return torch.cat([tokens[:, :lead], prompts, tokens[:, lead:]], dim=1)


def _insert_prompts_hook(module, args, output):
    """Hugging Face: on the embeddings module's output."""
    return _with_prompts(module, output)


def _insert_prompts_pre_hook(module, args):
    """timm: on the input of norm_pre."""
    tokens = _with_prompts(module, args[0])
    return None if tokens is None else (tokens,) + tuple(args[1:])


def install(model, prompt, methods) -> None:
    """query_layer=k: every layer takes query_pass's forward (the query pass cuts off the layers above k).
    Input placement: the embeddings module's hook (a module-level function, so the model pickles / deep-copies;
    the copy's hook reads the copy's own entry, keyed by the module it is called on)."""
    one_stage_query.install(model, prompt)
    if prompt.needs_query and not timm_vit.is_timm_vit(model):
        query_pass.install(model, prompt, methods, every_layer=True)
    if prompt.placement != "input":
        return
    emb = _embeddings_module(model)
    if timm_vit.is_timm_vit(model):
        if _insert_prompts_pre_hook not in emb._forward_pre_hooks.values():
            emb.register_forward_pre_hook(_insert_prompts_pre_hook)
    elif _insert_prompts_hook not in emb._forward_hooks.values():
        emb.register_forward_hook(_insert_prompts_hook)


def remove(model) -> None:
    one_stage_query.remove(model)
    if timm_vit.is_timm_vit(model):
        emb, hooks, ours = getattr(model, "norm_pre", None), "_forward_pre_hooks", _insert_prompts_pre_hook
    else:
        emb, hooks, ours = getattr(getattr(model, "base_model", model), "embeddings", None), "_forward_hooks", \
            _insert_prompts_hook
    if isinstance(emb, torch.nn.Module):
        registered = getattr(emb, hooks)
        for key, hook in list(registered.items()):
            if hook is ours:
                del registered[key]


def query_and_reuse(model, state, prompt, kw: Dict[str, Any]) -> Tuple[Tensor, Optional[query_pass.LowerLayers]]:
    """(query [B, hidden], the hidden state entering layer k for the real pass to reuse, or None). query_layer=k:
    the query of the model cut to layers [0, k) (see the module docstring)."""
    k = query_pass.query_layer_of(prompt)
    if k is None:
        return vision_query(model, state, prompt, kw), None
    with query_pass.truncated_at(model, k) as entering:
        query = vision_query(model, state, prompt, kw)
    if not entering or not _can_reuse(model, prompt, k, kw):
        return query, None
    return query, query_pass.LowerLayers(k, entering[0])


def _can_reuse(model, prompt, k: int, kw: Dict[str, Any]) -> bool:
    """Layers [0, k) of the real pass would compute exactly what the query pass did, and nothing needs them run."""
    if k < 1 or prompt.placement != "prefix":
        return False
    layers = getattr(prompt, "layers", ())
    if not layers or min(layers) < k:
        return False  # a prefix below k changes what the lower layers compute
    if kw.get("output_hidden_states") or kw.get("output_attentions"):
        return False  # the skipped layers' own outputs are asked for
    if kw["pixel_values"].requires_grad:
        return False
    if torch.is_grad_enabled():
        # a trainable base-model weight outside layers [k, L) (embeddings, CLIP's pre-norm; the final norm too, to
        # stay on the safe side) needs the real pass through the lower layers for its gradient
        upper = {id(p) for layer in query_pass.layers_of(model)[k:] for p in layer.parameters()}
        upper |= {id(p) for p in prompt.parameters()}  # the prompt is a submodule of the model (no base_model: CLIP)
        base = getattr(model, "base_model", model)
        if any(p.requires_grad and id(p) not in upper for p in base.parameters()):
            return False
    return True


def vision_query(model, state, prompt, kw: Dict[str, Any]) -> Tensor:
    """[B, hidden]: the frozen model's [CLS] pre-logits (or token mean) from a pass without prompts, no_grad."""
    if timm_vit.is_timm_vit(model):
        return timm_vit.frozen_query(model, kw[timm_vit.PIXEL_ARGUMENT], prompt.query_mode)
    base = getattr(model, "base_model", model)
    call = state.bound_forward if base is model else base
    params = inspect.signature(call).parameters
    kwargs = {"pixel_values": kw["pixel_values"]}
    for name in ("interpolate_pos_encoding", "attention_mask"):
        if kw.get(name) is not None and (name in params or _var_kw(params)):
            kwargs[name] = kw[name]
    with torch.no_grad():
        out = call(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if prompt.query_mode == "mean":
        return hidden.mean(dim=1)
    if _facts(model).pre_logits == "pooler_output":
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise ValueError(f"fastprompt: {type(model).__name__} returns no pooler output to take the query from "
                             "(a SigLIP tower without its pooling head has no [CLS]); use query='mean'")
        return pooled
    return hidden[:, 0]


def _var_kw(params) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _task_ids(prompt, task_ids, batch: int, device) -> Optional[Tensor]:
    if prompt.needs_task_ids:
        return check_task_ids(task_ids, prompt.config.num_tasks, batch, device)
    if task_ids is None:
        return None
    if not getattr(prompt, "accepts_task_ids", False):
        raise ValueError(f"task_ids was given but {type(prompt).__name__} has no tasks")
    return check_task_ids(task_ids, prompt.num_tasks, batch, device)


def patched_call(model, state, kw: Dict[str, Any], task_ids, prompt_query):
    """prompt_attach's patched forward for a pixel model."""
    prompt = state.prompt
    pixels = kw.get(_pixel_argument(model))
    if pixels is None:
        raise ValueError(f"{type(model).__name__} with a fastprompt prompt needs {_pixel_argument(model)}")
    if timm_vit.is_timm_vit(model):
        timm_vit.check_timm_call(model, kw, prompt.placement == "prefix")
    batch = pixels.shape[0]
    task_ids = _task_ids(prompt, task_ids, batch, pixels.device)
    if one_stage_query.is_one_stage(prompt):
        return _one_stage_call(model, state, prompt, kw, task_ids, prompt_query, batch)
    query = reuse = None
    if prompt.needs_query:
        if prompt_query is not None:
            query = prompt_query
        else:
            query, reuse = query_and_reuse(model, state, prompt, kw)
    prompt.aux_loss = None
    if prompt.placement == "input":
        prompts = prompt.input_prompts(batch, query=query, task_ids=task_ids)
        if prompts.dim() == 2:
            prompts = prompts.unsqueeze(0).expand(batch, -1, -1)  # a shared prompt: a view, not B copies
        lead = _leading_tokens(model)
        mask = kw.get("attention_mask")
        if mask is not None:  # the prompts are real tokens
            if mask.dim() != 2:
                raise ValueError("input-level prompts need a 2D attention_mask [B, L]")
            ones = mask.new_ones(batch, prompts.shape[1])
            kw["attention_mask"] = torch.cat([mask[:, :lead], ones, mask[:, lead:]], dim=1)
        token = _INSERTS.set({**(_INSERTS.get() or {}), id(_embeddings_module(model)): (prompts, lead)})
        try:
            out = state.bound_forward(**kw)
        finally:
            _INSERTS.reset(token)
    else:
        prefixes = prompt.layer_prefixes(batch, query=query, task_ids=task_ids)
        with layer_prefixes(model, prefixes), query_pass.skipping_lower_layers(model, reuse):
            out = state.bound_forward(**kw)
    return _add_aux_loss(prompt, out)


def _one_stage_call(model, state, prompt, kw, task_ids, prompt_query, batch):
    """query_pass="one_stage": one prompted pass, whose query layers read the query as they are entered."""
    if prompt_query is not None:
        raise ValueError(f"prompt_query= was given, but {type(prompt).__name__}(query_pass='one_stage') reads its "
                         "query inside the prompted pass; use query_pass='two_pass' to pass a query")
    prompt.aux_loss = None
    prefixes = one_stage_query.OneStagePrefixes(prompt, batch, task_ids, prompt.query_mode)
    with one_stage_query.reading_queries(model, prefixes), layer_prefixes(model, prefixes):
        out = state.bound_forward(**kw)
    return _add_aux_loss(prompt, out)


def _add_aux_loss(prompt, out):
    aux = prompt.aux_loss
    if aux is not None and getattr(prompt.config, "add_aux_loss", False):
        loss = out.get("loss") if hasattr(out, "get") else None
        if loss is not None:
            out["loss"] = loss + aux.to(loss.dtype)
    return out
