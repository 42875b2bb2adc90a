"""Prompt hoisting: input-level prompts on causal LMs at the cost of prefix tuning.

In a causal (decoder-only) model the P virtual tokens of an input-level prompt (prompt tuning, P-tuning, multitask
prompt tuning) sit before the text and attend only to each other, so their hidden states, and their keys/values in
every layer, do not depend on the input. PEFT still runs them through the whole model once per batch row. Hoisting
runs the base model ONCE on the virtual tokens alone (batch 1; MPT: one row per distinct task in the batch), at the
positions they have in the unhoisted model (0..P-1), collects each layer's K/V as the attention function sees them
(after RoPE, soft-capping is the attention's), and runs the real tokens with those as the prefix of fastprompt's
attention (shared `[Hkv, P, D]`; MPT: a pool `[U, Hkv, P, D]` read through each row's task index). The gradient
reaches the prompt parameters through the single prompt pass, summed over rows by the op's batch-reduced prefix
gradient.

Exactness. The hoisted model equals the unhoisted one: real tokens keep the positions they have there (P + index,
whatever the padding, since PEFT drops position ids; an explicit `position_ids` of fastprompt's own prompts is
shifted by P, as the unhoisted path does), the prefix is always visible (virtual tokens are never padding), and the
outputs keep the unhoisted shapes: logits over the P + S positions, the virtual positions' logits / hidden states
taken from the prompt pass and broadcast to the rows; the loss includes the term of the last virtual position (it
predicts the first real token). Where the two would differ, the unhoisted path runs (see `hoisting_blocker`):
bidirectional attention (virtual tokens then see the input), a sliding window shorter than P + length (the
unhoisted model lets early virtual tokens slide out of view), any dropout in training, with or without grad (the
unhoisted model draws one mask per row for the virtual tokens), prompts that depend on the input (pools / selectors: never hoisted),
`output_attentions`, a caller-supplied KV cache in a PEFT forward, and tasks other than causal LM.

Generation computes the prompt K/V once (no_grad) and the KV cache holds the real tokens only. Each decoding step
(one query per row) over the shared prompt K/V takes the lean CPU path of ops/prefix_attention_torch/decode.py.
Opt out per model with `set_prompt_hoisting(model, False)` (or `patch_model(..., hoist_prompts=False)`).
"""
from __future__ import annotations

import dataclasses
import weakref
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn.modules.dropout import _DropoutNd
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..prompts import MultiTaskPrompt, PromptTuning, PTuning
from .cache_compat import returned_cache
from .generate_args import resolve_generate
from .peft_config import enum_value as _value
from .prompt_cache import HOISTED as CACHE_HOISTED, PromptInCache, mark_cache, prompt_in_cache
from .patched_method import PatchedMethod, ReplacedMethods
from .peft_prompts import check_mpt_task_ids
from .transformers_attention import (
    PREFIXES_KWARG,
    AttentionCall,
    BridgedPrefixes,
    LayerPrefix,
    find_layers,
    STATE_ATTR as _ATTENTION_STATE_ATTR,
    bind_call,
    disable_fastprompt_attention,
    enable_fastprompt_attention,
    layer_prefixes,
    model_layout,
    take_bridged_grad,
    uses_reentrant_checkpointing,
)

__all__ = ["hoisting_blocker", "last_prompt_path", "set_prompt_hoisting", "prompt_kv_pass", "HOISTED"]

HOISTED = "hoisted"
_DISABLED_ATTR = "_fastprompt_hoisting_disabled"
_PEFT_ATTR = "_fastprompt_peft_hoisting"
_INPUT_METHODS = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")

# which path the last forward / generate of a model took in this thread / asyncio task: "hoisted" or
# "unhoisted: <reason>" (tests, benchmarks). {id(model): (weakref to the model, path)}, replaced on every note (never
# mutated), so a thread or task reads the paths of its own calls only.
_LAST_PATH: ContextVar = ContextVar("fastprompt_last_prompt_path", default=None)


_FACTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # hf model -> (layout, layers): once per model


def _facts(hf):
    facts = _FACTS.get(hf)
    if facts is None:
        facts = (model_layout(hf), find_layers(hf)[1], _is_causal_lm(hf))
        _FACTS[hf] = facts
    return facts


def last_prompt_path(model) -> Optional[str]:
    """"hoisted" or "unhoisted: <reason>" for the last forward / generate of `model` made by this thread / asyncio
    task (None: none ran yet)."""
    entry = (_LAST_PATH.get() or {}).get(id(model))
    return entry[1] if entry is not None and entry[0]() is model else None


def _note(model, path: str) -> None:
    try:
        ref = weakref.ref(model)
    except TypeError:  # not weak-referenceable
        return
    paths = {key: entry for key, entry in (_LAST_PATH.get() or {}).items() if entry[0]() is not None}
    paths[id(model)] = (ref, path)
    _LAST_PATH.set(paths)


def set_prompt_hoisting(model, enabled: bool) -> None:
    """Turn hoisting on (the default where exact) or off for this patched model instance."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_prompt_hoisting: enabled must be a bool, got {type(enabled).__name__}")
    if enabled:
        model.__dict__.pop(_DISABLED_ATTR, None)
    else:
        object.__setattr__(model, _DISABLED_ATTR, True)


def _hoisting_disabled(model) -> bool:
    return bool(model.__dict__.get(_DISABLED_ATTR, False))


# ----------------------------------------------------------------------------------------------------------------
# When hoisting is exact


# Causal families whose hoisted outputs were checked against the unhoisted model (tests/test_hoisting_*.py). Others
# (e.g. OPT, whose positions follow the mask) keep the unhoisted path until checked.
HOISTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")


def _hoistable_model(hf) -> bool:
    layout, _, causal_lm = _facts(hf)
    return layout.model_type in HOISTED_MODEL_TYPES and layout.is_causal and causal_lm


def _is_causal_lm(hf) -> bool:
    return type(hf).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


_DROPOUT_SITES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # hf model -> modules that can drop


def _dropout_sites(hf) -> tuple:
    """The modules of `hf` that can draw dropout: every nn.Dropout (any _DropoutNd) and every module with an
    `attention_dropout` rate (transformers' attention modules pass it to the attention function while training).
    Found once per model, like its layers (`_facts`); their rates and training flags are read on every call."""
    sites = _DROPOUT_SITES.get(hf)
    if sites is None:
        sites = tuple(m for m in hf.modules()
                      if isinstance(m, _DropoutNd) or isinstance(m.__dict__.get("attention_dropout"), (int, float)))
        _DROPOUT_SITES[hf] = sites
    return sites


def _dropout_in_training(hf) -> bool:
    """Whether a forward of `hf` draws dropout: an nn.Dropout training with p > 0, or an attention module training
    with a functional attention dropout rate > 0, each by its own training flag. Grad mode plays no part: under
    torch.no_grad() in train() the unhoisted model still draws one mask per row, where the hoisted prompt pass
    would share one across rows."""
    config = getattr(hf, "config", None)
    if hf.training and config is not None and _positive(getattr(config, "attention_dropout", None)):
        return True
    for module in _dropout_sites(hf):
        if module.training and _positive(module.p if isinstance(module, _DropoutNd)
                                         else module.__dict__.get("attention_dropout")):
            return True
    return False


def _positive(rate) -> bool:
    """A dropout rate (a number) above 0; anything else (None, a module) is not a rate."""
    return isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0


def hoisting_blocker(hf, num_virtual_tokens: int, total_length: Optional[int] = None) -> Optional[str]:
    """None when hoisting the P virtual tokens of `hf` (a transformers model) is exact, else why not.

    `total_length`: the longest real-token length the call will reach (prompt + generated), for sliding windows.
    """
    layout = _facts(hf)[0]
    if not layout.is_causal:
        return "bidirectional attention (virtual tokens see the input)"
    if not _facts(hf)[2]:
        return f"{type(hf).__name__} is not a causal LM"
    if layout.model_type not in HOISTED_MODEL_TYPES:
        return f"model_type {layout.model_type!r} not validated for hoisting"
    if layout.sliding_window is not None:
        if total_length is None:
            return "sliding window with an unknown length"
        if num_virtual_tokens + total_length > layout.sliding_window:
            return (f"sliding window {layout.sliding_window} shorter than P + length = "
                    f"{num_virtual_tokens + total_length}")
    if _dropout_in_training(hf):
        return "dropout in training (the unhoisted model draws one dropout mask per row)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The prompt pass


@dataclass
class PromptPass:
    """The virtual tokens run once: per-layer K/V `[U, Hkv, P, D]`, and (when asked) logits / hidden states."""

    kv: dict                                # layer -> (key, value), each [U, Hkv, P, D]
    logits: Optional[Tensor] = None         # [U, P, V]
    hidden_states: Optional[tuple] = None   # per layer [U, P, H]

    def layer_prefixes(self, rows: Optional[Tensor], container=dict) -> dict:
        """LayerPrefix per layer: shared `[Hkv, P, D]` when there is one prompt row, else a pool read by `rows`."""
        out = container()
        for layer, (key, value) in self.kv.items():
            if key.shape[0] == 1:
                out[layer] = LayerPrefix(key[0], value[0])
            else:
                out[layer] = LayerPrefix(key, value, rows)
        return out


def _rows(t: Tensor, rows: Optional[Tensor], batch: int) -> Tensor:
    """[U, ...] prompt-pass values for each of `batch` rows (a broadcast view when U == 1)."""
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    return t.index_select(0, rows)


def prompt_kv_pass(hf, prompts: Tensor, *, want_logits: bool = False, want_hidden: bool = False,
                   forward=None) -> PromptPass:
    """Run the base causal LM `hf` (fastprompt attention enabled) on `prompts` `[U, P, H]` alone, at positions
    0..P-1, and collect every layer's K/V as its attention function sees them. `forward`: the model's own forward
    when its instance forward is a wrapper (attached prompts)."""
    state = getattr(hf, _ATTENTION_STATE_ATTR, None)
    if state is None:
        raise ValueError("prompt hoisting needs fastprompt attention enabled on the model")
    rows, num = prompts.shape[0], prompts.shape[1]
    positions = torch.arange(num, device=prompts.device)[None].expand(rows, num)
    layers = _facts(hf)[1]
    # The prompt pass is one short row: not worth checkpointing, and reentrant checkpointing would run it without
    # a graph (the captured K/V must carry the gradient back to the prompt). Checkpointing acts only on a training
    # forward with grad, so the flag is left alone otherwise (inference from several threads never touches it).
    checkpointed = [layer for layer in layers if getattr(layer, "gradient_checkpointing", False)
                    and layer.training] if torch.is_grad_enabled() else []
    capture: dict = {}  # bound to this call: concurrent calls each capture their own K/V
    for layer in checkpointed:
        layer.gradient_checkpointing = False
    try:
        with bind_call(state, AttentionCall(capture=capture)):
            call = dict(inputs_embeds=prompts, position_ids=positions, use_cache=False, return_dict=True,
                        output_hidden_states=want_hidden)
            if want_logits:
                out = (forward or hf)(**call)
                logits = out.logits
            else:
                out = hf.base_model(**call)
                logits = None
        kv = dict(sorted(capture.items()))
    finally:
        for layer in checkpointed:
            layer.gradient_checkpointing = True
    if len(kv) != len(layers):
        raise RuntimeError(f"prompt hoisting captured the K/V of {len(kv)} of {len(layers)} layers")
    return PromptPass(kv=kv, logits=logits, hidden_states=out.hidden_states if want_hidden else None)


class _HoistGradBridge(torch.autograd.Function):
    """Identity on the real tokens' input embeddings that hands the detached prefix leaves' gradients (accumulated
    by every layer's reentrant-checkpointed recompute) to the prompt pass. It sits before layer 0, so autograd
    reaches it after every layer's backward. The gradients are taken out of the leaves (take_bridged_grad): a
    second backward pass over a retained graph carries its own only."""

    @staticmethod
    def forward(ctx, hidden, leaves, *kv):
        ctx.leaves = leaves
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return (grad, None, *[take_bridged_grad(leaf) for leaf in ctx.leaves])


def _real_pass_prefixes(hf, prompt_pass: PromptPass, rows: Optional[Tensor], embeds: Tensor):
    """The prefixes the real tokens read, and the embeddings to feed (bridged under reentrant checkpointing)."""
    layers = _facts(hf)[1]
    trainable = torch.is_grad_enabled() and any(k.requires_grad for k, _ in prompt_pass.kv.values())
    if not (trainable and all(uses_reentrant_checkpointing(layer) for layer in layers)):
        return prompt_pass.layer_prefixes(rows), embeds
    tensors = [t for pair in prompt_pass.kv.values() for t in pair]
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    detached = PromptPass(kv={layer: (leaves[2 * i], leaves[2 * i + 1])
                              for i, layer in enumerate(prompt_pass.kv)})
    return detached.layer_prefixes(rows, BridgedPrefixes), _HoistGradBridge.apply(embeds, leaves, *tensors)


# ----------------------------------------------------------------------------------------------------------------
# One hoisted causal-LM call


def _cache_of(kwargs) -> Any:
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])


def _with_fields(out, **changes):
    values = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    values.update(changes)
    return type(out)(**values)


def hoisted_causal_lm(hf, prompt_pass: PromptPass, rows: Optional[Tensor], *, embeds: Tensor,
                      attention_mask: Optional[Tensor], position_ids: Tensor, labels: Optional[Tensor],
                      output_hidden_states: Optional[bool], return_dict: Optional[bool], full_logits: bool,
                      prefixes: Optional[dict] = None, forward=None, **kwargs):
    """Run the real tokens of a causal LM with the prompt pass as prefix; outputs shaped as the unhoisted model's
    (logits over P + S positions when `full_logits`; the loss over [virtual; real] with -100 on virtual labels)."""
    batch = embeds.shape[0]
    if prefixes is None:
        prefixes, embeds = _real_pass_prefixes(hf, prompt_pass, rows, embeds)
    out = (forward or hf)(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, labels=None,
             output_hidden_states=output_hidden_states, return_dict=True, **{PREFIXES_KWARG: prefixes}, **kwargs)
    changes = {}
    real_logits = out.logits
    if labels is not None:
        # The last virtual position predicts the first real token; every other virtual label is -100.
        lead = _rows(prompt_pass.logits[:, -1:], rows, batch).to(real_logits.dtype)
        full_labels = torch.cat([labels.new_full((batch, 1), -100), labels], dim=1)
        loss_kwargs = {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index")}
        changes["loss"] = hf.loss_function(logits=torch.cat([lead, real_logits], dim=1), labels=full_labels,
                                           vocab_size=hf.config.vocab_size, **loss_kwargs)
    if full_logits:
        changes["logits"] = torch.cat([_rows(prompt_pass.logits, rows, batch).to(real_logits.dtype), real_logits],
                                      dim=1)
    if output_hidden_states and prompt_pass.hidden_states is not None and out.hidden_states is not None:
        changes["hidden_states"] = tuple(torch.cat([_rows(p, rows, batch).to(h.dtype), h], dim=1)
                                         for p, h in zip(prompt_pass.hidden_states, out.hidden_states))
    out = _with_fields(out, **changes) if changes else out
    return out if return_dict is not False else out.to_tuple()


def _logits_to_keep_ok(kwargs, seq: int, labels) -> Optional[bool]:
    """full_logits (True/False), or None when `logits_to_keep` asks for something hoisting does not reproduce."""
    keep = kwargs.get("logits_to_keep", 0)
    if isinstance(keep, Tensor) or not isinstance(keep, int) or keep < 0:
        return None
    if keep == 0:
        return True
    return False if keep <= seq and labels is None else None


# ----------------------------------------------------------------------------------------------------------------
# PEFT: PromptTuning, P-tuning, MultitaskPromptTuning on CAUSAL_LM


@dataclass
class _PeftHoisting:
    attention_token: Any
    fallback_forward: Any
    fallback_generate: Any



def install_peft_hoisting(model, backend: str, methods: ReplacedMethods) -> bool:
    """Called by patch_peft_model for input-level methods: hoist where the model is a causal LM. Returns whether
    hoisting was installed. `forward` / `generate` are replaced through `methods`, the patch's one record of the
    PeftModel methods it replaced (unpatch_peft_model restores them)."""
    config = model.active_peft_config
    if _value(config.peft_type) not in _INPUT_METHODS or _value(config.task_type) != "CAUSAL_LM":
        return False
    hf = model.get_base_model()
    if not _hoistable_model(hf):
        return False
    token = enable_fastprompt_attention(hf, backend=backend)
    record = _PeftHoisting(token, model.forward, model.generate)
    # PatchedMethod, not types.MethodType: the patched model pickles / torch.saves / deep-copies (see its docstring)
    methods.replace(model, "forward", PatchedMethod(_peft_forward, model))
    methods.replace(model, "generate", PatchedMethod(_peft_generate, model))
    object.__setattr__(model, _PEFT_ATTR, record)
    return True


def uninstall_peft_hoisting(model) -> None:
    record = model.__dict__.get(_PEFT_ATTR)
    if record is None:
        return
    disable_fastprompt_attention(model.get_base_model(), record.attention_token)
    object.__delattr__(model, _PEFT_ATTR)
    model.__dict__.pop(_DISABLED_ATTR, None)


def _peft_adapter_active(model) -> bool:
    # PEFT's disable_adapter() swaps the instance's forward for the base model's
    fwd = model.__dict__.get("forward")
    return getattr(fwd, "__func__", None) is _peft_forward


def _peft_blocker(model, total_length: Optional[int]) -> Optional[str]:
    if _hoisting_disabled(model):
        return "hoisting turned off"
    config = model.active_peft_config
    if _value(config.peft_type) not in _INPUT_METHODS or _value(config.task_type) != "CAUSAL_LM":
        return f"active adapter is {_value(config.peft_type)} / {_value(config.task_type)}"
    return hoisting_blocker(model.get_base_model(), config.num_virtual_tokens, total_length)


def _peft_prompt_rows(model, task_ids: Optional[Tensor], batch: Optional[int] = None):
    """The distinct prompts `[U, P, H]` and each row's index into them (None: one shared prompt)."""
    config = model.active_peft_config
    if _value(config.peft_type) == "MULTITASK_PROMPT_TUNING":
        if task_ids is None:
            raise ValueError("task_ids cannot be None")
        if batch is not None:  # one id per row or one for the batch, else a clear error naming task_ids
            task_ids = check_mpt_task_ids(task_ids, batch)
        unique, rows = torch.unique(task_ids, return_inverse=True)
        return model.get_prompt(batch_size=unique.shape[0], task_ids=unique), rows
    return model.get_prompt(batch_size=1)[:1], None


def _peft_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                  output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    record = self.__dict__[_PEFT_ATTR]
    source = input_ids if input_ids is not None else inputs_embeds
    seq = source.shape[1] if source is not None else None
    reason = _peft_blocker(self, seq)
    full_logits = _logits_to_keep_ok(kwargs, seq or 0, labels)
    passed_cache = _cache_of(kwargs)
    if _holds_real_tokens_only(passed_cache):
        raise ValueError("fastprompt: this KV cache was filled by hoisted generate() and holds real tokens only, but "
                         "PEFT's forward with a cache expects the prompt in it; continue with generate(), or turn "
                         "hoisting off (set_prompt_hoisting(model, False)) before filling the cache")
    if reason is None and output_attentions:
        reason = "output_attentions"
    if reason is None and (passed_cache is not None or kwargs.get("use_cache")):
        reason = "a KV cache was passed or asked for"
    if reason is None and full_logits is None:
        reason = f"logits_to_keep={kwargs.get('logits_to_keep')!r}"
    if reason is not None:
        _note(self, f"unhoisted: {reason}")
        return record.fallback_forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                       labels=labels, output_attentions=output_attentions,
                                       output_hidden_states=output_hidden_states, return_dict=return_dict,
                                       task_ids=task_ids, **kwargs)
    _note(self, HOISTED)
    config = self.active_peft_config
    hf = self.get_base_model()
    # PEFT's own rules: position ids and token type ids are dropped (with its warnings)
    self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
    kwargs.pop("position_ids", None)
    kwargs.pop("token_type_ids", None)
    if full_logits:
        kwargs.pop("logits_to_keep", None)
    kwargs["use_cache"] = False
    if inputs_embeds is None:
        inputs_embeds = self.word_embeddings(input_ids)
    batch, num = inputs_embeds.shape[0], config.num_virtual_tokens
    prompts, rows = _peft_prompt_rows(self, task_ids, inputs_embeds.shape[0])
    prompt_pass = prompt_kv_pass(hf, prompts.to(inputs_embeds.dtype), want_logits=True,
                                 want_hidden=bool(output_hidden_states))
    positions = torch.arange(num, num + seq, device=inputs_embeds.device)[None].expand(batch, seq)
    return hoisted_causal_lm(hf, prompt_pass, rows, embeds=inputs_embeds, attention_mask=attention_mask,
                             position_ids=positions, labels=labels, output_hidden_states=output_hidden_states,
                             return_dict=return_dict, full_logits=full_logits, **kwargs)


class _PrefixesForGeneration:
    """The prompt K/V of one generate() call, every step reading the same ones; a pool's row index follows the
    batch expansion of beams / returned sequences (resolved by the layer for its batch size, see
    transformers_attention.resolve_prefixes). Bound to the call with layer_prefixes, never set on the model."""

    def __init__(self, prompt_pass: PromptPass, rows: Optional[Tensor], batch: int):
        self.prompt_pass, self.rows, self.batch = prompt_pass, rows, batch
        self.shared = prompt_pass.layer_prefixes(None) if rows is None else None
        self.pooled = {}  # rows per batch expansion (beams x returned sequences): built once, not once per step

    def for_batch(self, batch: int) -> dict:
        if self.shared is not None:
            return self.shared
        expand = batch // self.batch
        prefixes = self.pooled.get(expand)
        if prefixes is None:
            prefixes = self.prompt_pass.layer_prefixes(self.rows.repeat_interleave(expand))
            self.pooled[expand] = prefixes
        return prefixes


def _peft_generate(self, *args, **kwargs):
    record = self.__dict__[_PEFT_ATTR]
    hf = self.get_base_model()
    reason = None
    if not _peft_adapter_active(self):
        reason = "adapter disabled"
    elif kwargs.get("cache_implementation") == "paged" or isinstance(kwargs.get("custom_generate"), str):
        reason = "generate() hands the call to another generation loop (paged cache / custom_generate)"
    passed_cache = _cache_of(kwargs)
    if reason is None and _cache_length(passed_cache) > 0 and not _holds_real_tokens_only(passed_cache):
        # PEFT's rule (prepare_inputs_for_generation): a non-empty cache holds the prompt; hoisting's hold real
        # tokens only, and say so (prompt_cache), also in their copies
        reason = "a cache that holds the prompt"
    if reason is None:
        # the input and the length as transformers resolves them: every spelling of the input, max_new_tokens
        # before max_length, the passed config before the model's default one
        call = resolve_generate(hf, args, kwargs)
        if call.input_name != "input_ids":
            reason = f"generate() from {call.input_name}"
        else:
            reason = _peft_blocker(self, call.total_length)
    if reason is not None:
        if _holds_real_tokens_only(passed_cache):
            raise ValueError(f"fastprompt: this KV cache holds real tokens only (filled by hoisted generate()), and "
                             f"only hoisting can continue it, which cannot run this call: {reason}")
        _note(self, f"unhoisted: {reason}")
        return record.fallback_generate(*args, **kwargs)
    _note(self, HOISTED)
    kwargs = dict(kwargs)
    task_ids = kwargs.pop("task_ids", None)
    kwargs.pop("position_ids", None)  # PEFT ignores them: positions are P + index, whatever the padding
    config = self.active_peft_config
    batch, seq = call.input_ids.shape
    num = config.num_virtual_tokens
    with torch.no_grad():
        prompts, rows = _peft_prompt_rows(self, task_ids, batch)
        prompt_pass = prompt_kv_pass(hf, prompts.to(hf.get_input_embeddings().weight.dtype))
    positions = torch.arange(num, num + seq, device=call.input_ids.device)[None].expand(batch, seq)
    with layer_prefixes(hf, _PrefixesForGeneration(prompt_pass, rows, batch)):
        # the caller's arguments as given (transformers resolves them again, the same way); the cache it builds,
        # static or dynamic, holds the real tokens only, so its own sizing is right
        out = hf.generate(*args, position_ids=positions.contiguous(), **kwargs)
    # the cache holds real tokens only: say so in the cache object (copies and deep copies carry it)
    filled = PromptInCache(CACHE_HOISTED, num)
    mark_cache(passed_cache, filled)
    if not isinstance(out, Tensor):
        mark_cache(returned_cache(out), filled)
    return out


def _holds_real_tokens_only(cache) -> bool:
    record = prompt_in_cache(cache)
    return record is not None and record.layout == CACHE_HOISTED and _cache_length(cache) > 0


# ----------------------------------------------------------------------------------------------------------------
# fastprompt's own prompts (prompt_attach): PromptTuning, PTuning, MultiTaskPrompt(variant="mpt")


def _attach_hoistable_prompt(prompt) -> bool:
    """Prompts whose virtual tokens are the same for every input (MPT: for every row of a task). A whitelist: a new
    prompt type is hoisted only once it is known not to read the input."""
    if prompt.placement != "input" or prompt.needs_query:
        return False
    if type(prompt) in (PromptTuning, PTuning):
        return True
    return type(prompt) is MultiTaskPrompt and prompt.config.variant == "mpt"


def enable_for_attached_prompt(model, prompt, backend: Optional[str]):
    """Called by prompt_attach.attach for input placement: switch the model to fastprompt attention when its prompt
    can be hoisted (a causal LM, a prompt that does not depend on the input). Returns the attention token or None."""
    if not _attach_hoistable_prompt(prompt) or not _hoistable_model(model):
        return None
    return enable_fastprompt_attention(model, **({} if backend is None else {"backend": backend}))


def hoisted_attached_call(model, state, kw: dict, batch: int, prefill: bool, task_ids: Optional[Tensor],
                          in_cache: Optional[PromptInCache] = None):
    """prompt_attach's input placement, hoisted; returns the output, or None to run the unhoisted path.

    `in_cache`: on a decoding step, what the cache holds of the prompt (prompt_attach reads it from the cache object,
    or from its length). A cache that starts with the prompt is decoded by the unhoisted path; one of real tokens
    only by this one, and by nothing else (a step this path cannot take on it is refused, never run unhoisted)."""
    prompt = state.prompt
    decoding_hoisted = in_cache is not None and in_cache.layout == CACHE_HOISTED
    if state.attention_token is None or not _attach_hoistable_prompt(prompt):
        if decoding_hoisted:
            raise ValueError(f"fastprompt: this KV cache holds real tokens only (no prompt), but "
                             f"{type(prompt).__name__} on {type(model).__name__} is never hoisted; fill the cache "
                             "with this patched model")
        return None
    num = prompt.num_input_tokens()
    cache = _cache_of(kw)
    past = _cache_length(cache)
    prefill = past == 0  # read here: transformers 5.24 passes the cache as `cache`, earlier as `past_key_values`
    source = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    seq = source.shape[1]
    labels = kw.get("labels")
    full_logits = _logits_to_keep_ok(kw, seq, labels)
    reason = None
    if _hoisting_disabled(model) and not decoding_hoisted:  # a cache of real tokens only goes on hoisted
        reason = "hoisting turned off"
    elif not prefill and not decoding_hoisted:
        reason = "decoding a cache that holds the prompt"
    elif kw.get("output_attentions"):
        reason = "output_attentions"
    elif full_logits is None:
        reason = f"logits_to_keep={kw.get('logits_to_keep')!r}"
    elif labels is not None and (labels.dim() != 2 or labels.shape[1] != seq):
        reason = "labels not token-level"
    elif kw.get("token_type_ids") is not None:
        reason = "token_type_ids"
    else:
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            reason = "a non-2D attention_mask"
        else:
            reason = hoisting_blocker(model, num, past + seq)
            if reason is None and prefill and cache is not None:
                # generate(): a window must hold the whole generation; HF sizes a static cache to it
                window = _facts(model)[0].sliding_window
                if window is not None:
                    reason = "sliding window during generation"
    if reason is not None:
        if decoding_hoisted:
            raise ValueError(f"fastprompt: this KV cache holds real tokens only (it was filled by the hoisted path), "
                             f"and only that path can decode it, which cannot run this step: {reason}")
        _note(model, f"unhoisted: {reason}")
        return None
    _note(model, HOISTED)

    kw = dict(kw)
    embeds = kw.pop("inputs_embeds", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(kw.pop("input_ids"))
    kw.pop("input_ids", None)
    if prefill or in_cache.prompt_kv is None:  # (a cache told by its length: the prompt pass is run again)
        if prompt.needs_task_ids:
            unique, rows = torch.unique(task_ids, return_inverse=True)
            prompts = prompt.input_prompts(unique.shape[0], task_ids=unique)
        else:
            unique, rows = None, None
            prompts = prompt.input_prompts(1)
        if prompts.dim() == 2:
            prompts = prompts[None]
        prompt_pass = prompt_kv_pass(model, prompts.to(embeds.dtype), want_logits=prefill and bool(full_logits),
            want_hidden=prefill and bool(kw.get("output_hidden_states")),
            forward=state.bound_forward)
    else:
        prompt_pass, unique = PromptPass(kv=in_cache.prompt_kv), in_cache.unique_tasks
        rows = None if unique is None else torch.searchsorted(unique, task_ids)
    positions = kw.pop("position_ids", None)
    if positions is not None:
        positions = positions + num
    else:
        positions = torch.arange(num + past, num + past + seq, device=embeds.device)[None].expand(batch, seq)
    labels = kw.pop("labels", None)
    hidden = kw.pop("output_hidden_states", None)
    return_dict = kw.pop("return_dict", None)
    if full_logits:
        kw.pop("logits_to_keep", None)
    mask = kw.pop("attention_mask", None)
    if not prefill:
        full_logits = False
    if labels is not None and prompt_pass.logits is None:
        raise RuntimeError("prompt hoisting: labels on a decoding step")
    out = hoisted_causal_lm(model, prompt_pass, rows, embeds=embeds, attention_mask=mask, position_ids=positions,
                            labels=labels, output_hidden_states=hidden, return_dict=True, full_logits=full_logits,
                            forward=state.bound_forward, **kw)
    if prefill:  # the cache holds real tokens only: say so in the cache, with the prompt K/V it decodes with
        mark_cache(returned_cache(out, cache), PromptInCache(
            CACHE_HOISTED, num, prompt_kv={k: (a.detach(), b.detach()) for k, (a, b) in prompt_pass.kv.items()},
            unique_tasks=unique))
    return out if return_dict is not False else out.to_tuple()
