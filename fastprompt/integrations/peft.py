"""Drop-in acceleration of a PEFT prompt-learning model, patched per instance and reversibly.

What changes for the patched PeftModel instance (instance attributes only; PEFT keeps owning every parameter, so
save_pretrained / from_pretrained are untouched):

- Prefix tuning: `forward`, `generate` and `prepare_inputs_for_generation` are replaced. The prefix encoder runs
  once per step on the P virtual tokens (not on B copies); its output is viewed as per-layer K/V `[Hkv, P, D]` and
  handed to the base model's "fastprompt" attention (see transformers_attention). No DynamicCache of B prefix copies,
  no `[prefix; seq]` concatenation, no 4D mask. Real tokens keep PEFT's positions (P, P+1, ...: PEFT sees a P-long
  cache), prefix keys are never rotated. In generate() the KV cache holds real tokens only. Gradient checkpointing
  works (PEFT refuses it): non-reentrant directly, reentrant through a gradient bridge (`_PrefixGradBridge`).
- Prompt tuning, P-tuning (MLP / LSTM encoder), multitask prompt tuning: `get_prompt`, `generate` and
  `prepare_inputs_for_generation` are replaced. The encoder runs once on `[1, P]` and the prompt is expanded (a
  view), never repeated per row; MPT multiplies the shared prompt by each row's task factors without looking the
  embedding up B times (one task id for the whole batch is broadcast, as PEFT does). PEFT's own forward does the
  rest. In generate() the prompt enters at the prefill step only and decode steps extend the mask past it: PEFT
  0.21.2 decides "prefill" by looking for `past_key_values`, which transformers >= 5.24 calls `cache`, and so
  re-inserts the virtual tokens at every step there (see cache_compat). A static cache gets room for the prompt.
- The replaced methods are `_PatchedMethod`s: the patched model pickles, torch.saves and deep-copies, still patched.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .. import ops
from .cache_compat import cache_kwarg, cache_length, get_cache, pop_cache
from .call_context import CallLocal
from .peft_config import enum_value as _value
from .patched_method import PatchedMethod as _PatchedMethod, ReplacedMethods
from .peft_prompts import check_mpt_task_ids, layer_prefixes_from_kv, prefix_kv, prefix_layer_kv  # noqa: F401
from .families import MASK_CUMSUM, REFUSED, WRAPPERS, supported_model_types
from .generate_args import refuse_prompt_cache_sliced_by_length, resolve_generate, static_cache_with_room
from .prompt_hoisting import install_peft_hoisting, uninstall_peft_hoisting
from .seq2seq import check_seq2seq_patchable, seq2seq_prefix_replacements
from .transformers_attention import (
    PREFIXES_KWARG,
    BridgedPrefixes,
    find_layers,
    check_attention_still_switched,
    check_supports_attention_interface,
    disable_fastprompt_attention,
    enable_fastprompt_attention,
    is_fastprompt_enabled,
    layer_prefixes,
    model_layout,
    set_backend,
    take_bridged_grad,
    uses_reentrant_checkpointing,
)

_PATCH_ATTR = "_fastprompt_peft_patch"

# Families whose PEFT prompt-learning behaviour (positions, masks, cache use) was checked against fastprompt: the
# family table (families.py). Families in REFUSED take input-level methods only (their attention cannot take a prefix).
SUPPORTED_MODEL_TYPES = supported_model_types()
SUPPORTED_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Tasks whose PEFT forward keeps token_type_ids (the others drop them with a warning)
_TASKS_KEEPING_TOKEN_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


@dataclass
class _PeftPatch:
    method: str                                  # "prefix" | "input"
    backend: str
    attention_token: Any = None
    layout: Any = None                           # ModelLayout of the base model (prefix tuning)
    layers: Any = None                           # the base model's ModuleList of layers (prefix tuning)
    methods: ReplacedMethods = field(default_factory=ReplacedMethods)  # every PeftModel method replaced, once


def _peft():
    import peft  # optional dependency (the peft extra): imported where a PeftModel is handled

    return peft



def is_patched(model) -> bool:
    return _PATCH_ATTR in getattr(model, "__dict__", {})


def _check_patchable(model):
    peft = _peft()
    if not isinstance(model, peft.PeftModel):
        raise TypeError(f"fastprompt: expected a peft.PeftModel, got {type(model).__name__}")
    config = model.active_peft_config
    peft_type = _value(config.peft_type)
    if not config.is_prompt_learning:
        raise ValueError(
            f"fastprompt: the active adapter {model.active_adapter!r} is {peft_type}, not a prompt-learning method; "
            "patch_model accelerates PrefixTuning, PromptTuning, P-tuning (PromptEncoder) and MultitaskPromptTuning"
        )
    if peft_type not in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"):
        raise ValueError(f"fastprompt: PEFT method {peft_type} is not supported by patch_model")
    task = _value(config.task_type)
    if task == "SEQ_2_SEQ_LM":  # encoder-decoder models: their own checks (T5 / mT5 / BART)
        return check_seq2seq_patchable(model, config)
    if task not in SUPPORTED_TASK_TYPES:
        raise ValueError(
            f"fastprompt: task type {task} is not supported (supported: {', '.join(SUPPORTED_TASK_TYPES)})")
    if (config.num_transformer_submodules or 1) != 1:
        raise ValueError("fastprompt: encoder-decoder prompt learning (num_transformer_submodules=2) is not supported")
    hf = model.get_base_model()
    model_type = getattr(getattr(hf, "config", None), "model_type", type(hf).__name__)
    if model_type in WRAPPERS:  # a multimodal wrapper: its text model is what must be a supported family
        text_type = getattr(hf.config.get_text_config(), "model_type", "")
        if text_type != WRAPPERS[model_type]:
            raise ValueError(f"fastprompt: {type(hf).__name__} (model_type={model_type!r}) wraps a "
                             f"{text_type!r} text model; patch_model supports it around {WRAPPERS[model_type]!r}")
    if model_type in REFUSED:
        if peft_type == "PREFIX_TUNING":
            raise TypeError(f"fastprompt: cannot patch prefix tuning on {type(hf).__name__} "
                            f"(model_type={model_type!r}): {REFUSED[model_type]}")
        return config  # input-level prompts only change the input embeddings (get_prompt is all that is patched)
    if model_type not in SUPPORTED_MODEL_TYPES:
        # First the precise reason when the attention cannot be reached at all (GPT-J, Falcon, BLOOM, ...).
        check_supports_attention_interface(hf)
        raise ValueError(
            f"fastprompt: model_type {model_type!r} ({type(hf).__name__}) is not supported by patch_model: its "
            f"prompt-learning semantics were not validated (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    check_supports_attention_interface(hf)
    layout = model_layout(hf)
    if peft_type != "PREFIX_TUNING" and layout.per_layer_inputs:
        raise ValueError(
            f"fastprompt: {peft_type} on {type(hf).__name__} (model_type={layout.model_type!r}) cannot run: the model "
            "has per-layer input embeddings (hidden_size_per_layer_input > 0), which it recovers from inputs_embeds "
            "by looking them up in its vocabulary, and virtual tokens are not in it (PEFT's own forward fails there "
            "too). Use prefix tuning, or a configuration with hidden_size_per_layer_input=0")
    if peft_type == "PREFIX_TUNING":
        heads, dim = config.num_attention_heads, config.token_dim // config.num_attention_heads
        if not layout.uniform_prefixes:  # layers of several shapes: PEFT's per-layer rules decide (see
            heads, dim = layout.num_kv_heads, layout.head_dim  # layer_prefixes_from_kv), for any prefix width
        if (config.num_layers, heads, dim) != (layout.num_layers, layout.num_kv_heads, layout.head_dim):
            raise ValueError(
                f"fastprompt: the prefix of {model_type!r} is shaped for {config.num_layers} layers x {heads} heads "
                f"x {dim} dims but the model has {layout.num_layers} x {layout.num_kv_heads} KV heads x "
                f"{layout.head_dim}; such a prefix does not fit the model's attention"
            )
    return config


def patch_peft_model(model, *, backend: str = "auto"):
    """Patch a PeftModel instance in place (see the module docstring); returns it. Patching twice is a no-op,
    except that a different `backend` is applied (as for fastprompt's own prompts, prompt_attach.attach)."""
    if backend not in ops.BACKENDS:
        raise ValueError(f"fastprompt: backend must be one of {ops.BACKENDS}, got {backend!r}")
    if is_patched(model):
        record = model.__dict__[_PATCH_ATTR]
        if backend != record.backend:  # where the patch runs fastprompt attention (prefixes, hoisting)
            if is_fastprompt_enabled(model.get_base_model()):
                set_backend(model.get_base_model(), backend)
            record.backend = backend
        return model
    config = _check_patchable(model)
    method = "prefix" if _value(config.peft_type) == "PREFIX_TUNING" else "input"
    if method == "prefix" and _value(config.task_type) == "SEQ_2_SEQ_LM":
        method = "seq2seq_prefix"
    record = _PeftPatch(method=method, backend=backend)
    if method == "seq2seq_prefix":
        replacements = seq2seq_prefix_replacements(model, record, backend)
    elif method == "prefix":
        record.layout = model_layout(model.get_base_model())
        record.layers = find_layers(model.get_base_model())[1]
        record.attention_token = enable_fastprompt_attention(model.get_base_model(), backend=backend)
        replacements = {
            "forward": _prefix_forward,
            "generate": _prefix_generate,
            "prepare_inputs_for_generation": _prefix_prepare_inputs_for_generation,
        }
    elif _value(config.task_type) == "SEQ_2_SEQ_LM":
        # Encoder-decoder: the prompt goes before the ENCODER input. PEFT's generate() is right as it is (the prompt
        # once per call, before the encoder, which generate() runs once; beams expand its output) and so is its
        # prepare step (the base model's); the causal-LM ones below would add the prompt to the decoder input.
        replacements = {"get_prompt": _input_get_prompt}
    else:
        replacements = {
            "get_prompt": _input_get_prompt,
            "generate": _input_generate,
            "prepare_inputs_for_generation": _input_prepare_inputs_for_generation,
        }
    for name, fn in replacements.items():
        record.methods.replace(model, name, _PatchedMethod(fn, model))
    object.__setattr__(model, _PATCH_ATTR, record)
    if method == "input":  # causal LMs: the virtual tokens run once per step (see prompt_hoisting)
        install_peft_hoisting(model, backend, record.methods)
    return model


def unpatch_peft_model(model):
    """Exact restore of a patched PeftModel (no-op when it is not patched); returns it."""
    record = model.__dict__.get(_PATCH_ATTR)
    if record is None:
        return model
    uninstall_peft_hoisting(model)
    if record.method in ("prefix", "input"):
        _remove_prepare_dispatch(model)
    if record.method == "prefix":
        _remove_bridge_hooks(model)
    record.methods.restore()
    if record.attention_token is not None:
        disable_fastprompt_attention(model.get_base_model(), record.attention_token)
    object.__delattr__(model, _PATCH_ATTR)
    return model


# ----------------------------------------------------------------------------------------------------------------
# PEFT's rules, written here rather than imported: PEFT's private helpers come and go between releases
# (`peft.peft_model._get_return_dict_transformers_v4` does not exist in peft 0.20).


def default_return_dict(config) -> bool:
    """`return_dict` when the caller gave none: the config's `return_dict` (transformers 5 removed the
    `use_return_dict` property), never in torchscript mode (transformers 4's rule). What PEFT 0.21 computes."""
    return bool(getattr(config, "return_dict", True)) and not getattr(config, "torchscript", False)


def adjust_prompt_learning_kwargs(config, kwargs: dict, *, remove_token_type_ids: bool = True) -> None:
    """PEFT's `_adjust_prompt_learning_kwargs`: prefix tuning shifts user position ids by P (the prefix sits where
    a P-long cache would); input-level methods ignore them; token_type_ids dropped where PEFT drops them."""
    if kwargs.get("position_ids") is not None:
        if _value(config.peft_type) == "PREFIX_TUNING":
            kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
        else:
            warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
            kwargs["position_ids"] = None
    if remove_token_type_ids and kwargs.get("token_type_ids") is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        kwargs["token_type_ids"] = None


# ----------------------------------------------------------------------------------------------------------------
# Prefix tuning


class _PrefixGradBridge(torch.autograd.Function):
    """Identity on the layer stack's input that hands the prefix leaf's gradient to the prefix encoder.

    Reentrant checkpointing differentiates only a layer's positional tensor inputs, so the layers read a detached
    leaf copy of the prefix; each layer's recompute accumulates into `leaf.grad`. This node sits before layer 0,
    so autograd reaches it after every layer's backward, when `leaf.grad` holds this backward pass's gradient.
    It takes that gradient and clears `leaf.grad`: another backward pass over a retained graph (retain_graph=True,
    several losses) then carries its own gradient only, never this one's again (take_bridged_grad).
    """

    @staticmethod
    def forward(ctx, hidden, kv, holder):
        ctx.holder = holder
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, take_bridged_grad(ctx.holder.leaf), None


class _BridgeHolder:
    def __init__(self, kv, leaf):
        self.kv, self.leaf, self.used = kv, leaf, False

    def bridge(self, hidden):
        if self.used:  # the input embedding may run more than once; the prefix gradient enters once
            return hidden
        self.used = True
        return _PrefixGradBridge.apply(hidden, self.kv, self)


def _prefix_positions(model, input_ids, inputs_embeds, past_length: int, num_tokens: int, attention_mask=None):
    """The position ids PEFT's prefix-as-cache gives real tokens when none are passed: as if P tokens came first."""
    record = model.__dict__.get(_PATCH_ATTR)
    layout = record.layout if record is not None and record.layout is not None else model_layout(model)
    source = input_ids if input_ids is not None else inputs_embeds
    batch, seq = source.shape[0], source.shape[1]
    device = source.device
    if not layout.shifts_positions:  # no cache argument: PEFT's prefix cannot shift this family's positions
        num_tokens = 0
    if layout.position_style == MASK_CUMSUM:
        # OPT: positions count the real tokens of [cache; seq] (padding-aware), padding at -1; the prefix counts too
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + seq, dtype=torch.long, device=device)
        mask = attention_mask.long()
        positions = (torch.cumsum(mask, dim=1) * mask - 1)[:, -seq:]
        return torch.where(mask[:, -seq:].bool(), positions + num_tokens, positions)
    if layout.position_style == "roberta":
        pad = layout.padding_idx
        if input_ids is not None:
            mask = input_ids.ne(pad).int()
            incremental = (torch.cumsum(mask, dim=1).type_as(mask) + num_tokens + past_length) * mask
            return incremental.long() + pad
        # RoBERTa does not shift positions computed from inputs_embeds (it cannot see the cache length there)
        return torch.arange(pad + 1, seq + pad + 1, dtype=torch.long, device=device)[None].expand(batch, -1)
    start = past_length + num_tokens
    return torch.arange(start, start + seq, dtype=torch.long, device=device)[None]


def _prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    config = self.active_peft_config
    original = type(self).forward
    if _value(config.peft_type) != "PREFIX_TUNING":  # the active adapter changed since patching
        return original(self, input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                        labels=labels, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                        return_dict=return_dict, task_ids=task_ids, **kwargs)
    check_attention_still_switched(self.get_base_model())
    task = _value(config.task_type)
    source = input_ids if input_ids is not None else inputs_embeds
    batch, seq = source.shape[0], source.shape[1]
    if return_dict is None:
        return_dict = default_return_dict(self.config)
    # PEFT's own rules: user position ids shifted by P; token_type_ids dropped except for the classification tasks
    user_positions = kwargs.get("position_ids")
    adjust_prompt_learning_kwargs(config, kwargs, remove_token_type_ids=task not in _TASKS_KEEPING_TOKEN_TYPES)
    record = self.__dict__[_PATCH_ATTR]
    if user_positions is not None and not record.layout.shifts_positions:
        kwargs["position_ids"] = user_positions  # a family without a cache argument: nothing shifts them
    past = pop_cache(kwargs)  # either name; handed on under the one the base model's forward takes
    past_length = cache_length(past)
    if past is not None:
        kwargs[cache_kwarg(self.get_base_model().forward)] = past
    if attention_mask is None:  # explicit, so transformers never guesses packed sequences from our position ids
        attention_mask = torch.ones(batch, past_length + seq, dtype=torch.long, device=source.device)
    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = _prefix_positions(self, input_ids, inputs_embeds, past_length,
                                                   config.num_virtual_tokens, attention_mask)
    call = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                return_dict=return_dict, **kwargs)
    if task not in ("FEATURE_EXTRACTION", "QUESTION_ANS") or labels is not None:
        call["labels"] = labels  # QA takes start_positions / end_positions (in kwargs), as in PEFT
    kv = prefix_kv(self)
    if not (kv.requires_grad and torch.is_grad_enabled() and record.layers is not None
            and all(uses_reentrant_checkpointing(layer) for layer in record.layers)):
        call[PREFIXES_KWARG] = layer_prefixes_from_kv(kv, layout=record.layout)
        return self.base_model(**call)
    # Reentrant gradient checkpointing on every layer: the layers read a detached leaf, bridged back (see above)
    holder = _BridgeHolder(kv, kv.detach().requires_grad_(True))
    call[PREFIXES_KWARG] = layer_prefixes_from_kv(holder.leaf, BridgedPrefixes, layout=record.layout)
    if inputs_embeds is not None:
        call["inputs_embeds"] = holder.bridge(inputs_embeds)
        return self.base_model(**call)
    embeddings = self.get_base_model().get_input_embeddings()
    _ensure_bridge_hook(embeddings)
    with _BRIDGES.bound(embeddings, holder):
        return self.base_model(**call)


# The bridge holder of the current call, per input-embedding module: read by a hook the module keeps while patched
# (a hook registered per call would run on every other thread's forward of the shared module too)
_BRIDGES = CallLocal("fastprompt_prefix_grad_bridge")


def _bridge_embeddings_hook(module, args, output):
    holder = _BRIDGES.get(module)
    return holder.bridge(output) if holder is not None else None


def _ensure_bridge_hook(embeddings) -> None:
    """Install the hook once per embedding module (also a new one, e.g. after resize_token_embeddings)."""
    if not any(hook is _bridge_embeddings_hook for hook in embeddings._forward_hooks.values()):
        embeddings.register_forward_hook(_bridge_embeddings_hook)


def _remove_bridge_hooks(model) -> None:
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if hook is _bridge_embeddings_hook:
                del module._forward_hooks[key]


# The PeftModel whose (patched) prepare step the base model's generate() runs, per call (see _generate_with_prepare)
_GENERATION_PREPARE = CallLocal("fastprompt_peft_generation_prepare")


class _PrepareDispatch:
    """The base model's prepare_inputs_for_generation while patched: during a patched PeftModel's generate() in
    this thread / task, that PeftModel's prepare step; otherwise the base model's own. Its signature is the one it
    dispatches to (generate() validates its keyword arguments, task_ids included, against it). Pickles and
    deep-copies as (class, base model)."""

    def __init__(self, hf):
        self.hf = hf

    def __reduce__(self):
        return (_PrepareDispatch, (self.hf,))

    def _target(self):
        target = _GENERATION_PREPARE.get(self.hf)
        return target if target is not None else type(self.hf).prepare_inputs_for_generation.__get__(self.hf)

    @property
    def __signature__(self):
        return inspect.signature(self._target())

    def __call__(self, *args, **kwargs):
        target = self._target()
        with _GENERATION_PREPARE.bound(self.hf, None):  # PEFT's prepare step calls the base model's: no loop back
            return target(*args, **kwargs)


def _generate_with_prepare(model, *args, **kwargs):
    """What PEFT's generate() does for prompt learning (the base model's generate() with the PeftModel's prepare
    step, under the PeftModel's generation config), without its swap of the base model's prepare_inputs_for_generation
    attribute and the restore afterwards: per-call state on the shared base model, so two threads' generate() calls
    undo each other's (one then decodes without its prefix positions). The prepare step is bound to the call."""
    hf = model.base_model
    target = hf.model if hasattr(hf, "model") else hf
    if getattr(target, "generation_config", None) is not model.generation_config:
        target.generation_config = model.generation_config  # as PEFT does (the same object on every call)
    if not isinstance(hf.__dict__.get("prepare_inputs_for_generation"), _PrepareDispatch):
        # (re)installed: PEFT's own generate(), run for an adapter fastprompt does not patch, restores its own
        object.__setattr__(hf, "prepare_inputs_for_generation", _PrepareDispatch(hf))
    with _GENERATION_PREPARE.bound(hf, model.prepare_inputs_for_generation):
        return hf.generate(*args, **kwargs)


def _remove_prepare_dispatch(model) -> None:
    hf = model.base_model
    if isinstance(hf.__dict__.get("prepare_inputs_for_generation"), _PrepareDispatch):
        del hf.__dict__["prepare_inputs_for_generation"]


def _prefix_generate(self, *args, **kwargs):
    config = self.active_peft_config
    original = type(self).generate
    # PEFT's disable_adapter() swaps in the base model's forward and prepare_inputs_for_generation: no prefix then
    adapter_disabled = getattr(self.prepare_inputs_for_generation, "__func__", None) is not \
        _prefix_prepare_inputs_for_generation
    if _value(config.peft_type) != "PREFIX_TUNING" or adapter_disabled:
        return original(self, *args, **kwargs)
    with torch.no_grad():
        prefixes = prefix_layer_kv(self, _layout(self))
    with layer_prefixes(self.get_base_model(), prefixes):
        if _value(config.task_type) == "CAUSAL_LM":
            return _generate_with_prepare(self, *args, **kwargs)
        return original(self, *args, **kwargs)


def _prefix_prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
    config = self.active_peft_config
    if _value(config.peft_type) != "PREFIX_TUNING":
        return type(self).prepare_inputs_for_generation(self, *args, task_ids=task_ids, **kwargs)
    model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
    # The cache holds real tokens only; the prefix is read from its one copy by the attention. Positions are
    # PEFT's: generate's (padding-aware) position ids shifted by P.
    num_tokens = config.num_virtual_tokens
    if model_kwargs.get("position_ids") is not None:
        model_kwargs["position_ids"] = model_kwargs["position_ids"] + num_tokens
    else:
        past_length = cache_length(get_cache(model_kwargs))
        model_kwargs["position_ids"] = _prefix_positions(self, model_kwargs.get("input_ids"),
                                                         model_kwargs.get("inputs_embeds"), past_length, num_tokens,
                                                         model_kwargs.get("attention_mask"))
    return model_kwargs


# ----------------------------------------------------------------------------------------------------------------
# Prompt tuning, P-tuning, multitask prompt tuning (input level)


def _input_get_prompt(self, batch_size: int, task_ids: Optional[torch.Tensor] = None,
                      max_cache_len: Optional[int] = None):
    config = self.active_peft_config
    peft_type = _value(config.peft_type)
    if peft_type not in ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"):
        return type(self).get_prompt(self, batch_size, task_ids=task_ids, max_cache_len=max_cache_len)
    encoder = self.prompt_encoder[self.active_adapter]
    tokens = self.prompt_tokens[self.active_adapter].to(encoder.embedding.weight.device)
    if peft_type == "MULTITASK_PROMPT_TUNING":
        if task_ids is None:
            raise ValueError("task_ids cannot be None")
        # MultitaskPromptEmbedding.forward without the per-row embedding lookup: shared prompt * task factors
        task_ids = check_mpt_task_ids(task_ids, batch_size, tokens.device)
        shared = encoder.embedding(tokens)                                     # [P, D], once
        task_prompts = torch.matmul(encoder.prefix_task_cols.index_select(0, task_ids),
                                    encoder.prefix_task_rows.index_select(0, task_ids))  # [B or 1, P, D]
        # one task id for the whole batch: broadcast over the rows, as PEFT's MultitaskPromptEmbedding does
        return (shared[None] * task_prompts).expand(batch_size, -1, -1)
    if config.inference_mode:
        prompts = encoder.embedding.weight[None]
    else:
        prompts = encoder(tokens[None])                                        # [1, P, D], once (LSTM needs a batch)
    return prompts.expand(batch_size, -1, -1)


def _input_prepare_inputs_for_generation(self, *args, task_ids: Optional[torch.Tensor] = None, **kwargs):
    """One generation step of an input-level prompt (prompt tuning, P-tuning, MPT) on the base model.

    Prefill (no cache, or an empty one): `[prompt; embed(input_ids)]` as inputs_embeds, the mask extended with P
    ones. Decode (the cache already holds the prompt): the new token ids only, the mask extended with P ones.
    Positions are the base model's own (input-level methods ignore position ids, PEFT's rule), so every step sees
    exactly what PEFT's full forward sees for the whole sequence. The cache is looked up under both names.
    """
    config = self.active_peft_config
    peft_type = _value(config.peft_type)
    if peft_type not in ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"):  # the active adapter changed
        return type(self).prepare_inputs_for_generation(self, *args, task_ids=task_ids, **kwargs)
    mask = kwargs.get("attention_mask")
    model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
    num_tokens = config.num_virtual_tokens
    past = cache_length(get_cache(model_kwargs))
    prefill = past == 0
    embeds = model_kwargs.get("inputs_embeds")
    ids = model_kwargs.get("input_ids")
    source = embeds if embeds is not None else ids
    batch = source.shape[0]
    if mask is None and model_kwargs.get("attention_mask") is not None:
        # No 2D mask from the caller, but the base prepare step made one (a 4D mask, or transformers' dict of masks
        # per layer type, sized without the prompt): PEFT re-creates it over P + S keys; its key padding is read
        # back here and extended past the prompt below, as a 2D mask the model expands itself.
        mask = key_padding_mask(model_kwargs["attention_mask"], past + source.shape[1])
        if mask is not None and not prefill:
            # Built over the cache's keys, and in a decode step the cache already holds the prompt in its first P
            # slots: those columns are the ones the extension below puts back (kept, they would shift every real
            # key by P: generate() drops an all-ones mask, so a static cache takes this path unpadded).
            mask = mask[:, num_tokens:]
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"fastprompt: generate() with an input-level prompt takes a 2D attention_mask, got "
                             f"{mask.dim()}D")
        # The base model's own (2D) mask extended past the prompt; the base prepare step may have turned the mask
        # into a 4D one sized without the prompt (static caches), so it is rebuilt from the 2D mask here.
        model_kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, num_tokens), mask], dim=1)
    model_kwargs.pop("position_ids", None)  # generate()'s positions count real tokens only; the model's own are right
    adjust_prompt_learning_kwargs(config, model_kwargs)
    if prefill:
        if embeds is None:
            embeds = self.word_embeddings(ids)
        prompts = self.get_prompt(batch_size=batch, task_ids=task_ids).to(embeds.dtype)
        model_kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        model_kwargs["input_ids"] = None
    return model_kwargs


def key_padding_mask(mask, num_keys: int) -> torch.Tensor:
    """The 2D key padding mask `[B, num_keys]` (1 = a real key) behind a mask transformers built for `num_keys` keys.

    A 4D mask `[B, 1 or H, Lq, Lk]` (boolean; float additive, 0 = visible and large negative = masked; or float 0/1)
    marks a key real when some query sees it; static-cache slots past `num_keys` are dropped. A dict (one mask per
    layer type) is read through its full-attention mask; None entries mean every key is visible.
    """
    if isinstance(mask, dict):
        masks = [m for m in mask.values() if m is not None]
        full = mask.get("full_attention")
        if full is None and not masks:
            return None
        mask = full if full is not None else masks[0]
    if mask is None or mask.dim() == 2:
        return mask
    if mask.dim() != 4:
        raise ValueError(f"fastprompt: attention_mask must be 2D [batch, keys] or 4D [batch, heads, queries, keys], "
                         f"got {mask.dim()}D")
    if mask.dtype == torch.bool:
        visible = mask
    elif mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all() and (mask == 1).any()):
        visible = mask > torch.finfo(mask.dtype).min / 2  # additive: 0 where visible, the dtype's minimum where not
    else:
        visible = mask != 0
    keys = visible.any(dim=2).any(dim=1)[:, :num_keys]
    return keys.to(torch.long)


def _input_generate(self, *args, **kwargs):
    """PEFT's generate(); a static cache generate() would size for the real tokens only gets room for the prompt."""
    config = self.active_peft_config
    if _value(config.peft_type) in ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"):
        kwargs = _with_static_cache_for_prompt(self, args, kwargs, config.num_virtual_tokens)
    if _value(config.peft_type) in ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING") and \
            _value(config.task_type) == "CAUSAL_LM":
        refuse_prompt_cache_sliced_by_length(resolve_generate(self.get_base_model(), args, kwargs),
                                             config.num_virtual_tokens, unrecorded_holds_prompt=True)
        return _generate_with_prepare(self, *args, **kwargs)
    return type(self).generate(self, *args, **kwargs)


def _with_static_cache_for_prompt(model, args, kwargs, num_tokens: int) -> dict:
    """Where generate() would build a static cache (cache_implementation from the call, a passed config or the
    model's default one), build it with P more slots: PEFT's virtual tokens enter the cache at prefill. Its length
    is generate()'s own (transformers' resolution of the input and of max_new_tokens / max_length)."""

    base = model.get_base_model()
    call = resolve_generate(base, args, kwargs)
    return static_cache_with_room(base, call, kwargs, num_tokens)


def _layout(model):
    """The base model's layer layout, as read at patch time (model_layout walks the config)."""
    record = model.__dict__.get(_PATCH_ATTR)
    return record.layout if record is not None and record.layout is not None else model_layout(model.get_base_model())
