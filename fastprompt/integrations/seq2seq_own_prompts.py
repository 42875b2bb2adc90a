"""fastprompt's own input-level prompts on encoder-decoder models (T5 / mT5 / BART): before the encoder input.

Where each method's prompt goes (PEFT 0.21.2's SEQ_2_SEQ_LM semantics for the corresponding PEFT method):
- placement "input" (PromptTuning, PTuning, PromptPool(placement="input"), MultiTaskPrompt): the prompt embeddings
  go before the encoder's input embeddings and the encoder attention mask gets P ones, as PEFT's prompt tuning /
  P-tuning (and MPT with num_transformer_submodules=1) do; the decoder, its mask and the labels are the target's and
  stay as given. Per-row prompts (a pool's selection, a task's prompt) are chosen from the input by the encoder's
  own encoding of it (query_pass.compute_query) or from task_ids, once per call.
- placement "prefix" (PrefixTuning, PTuningV2, PromptPool(placement="prefix")): the decoder's self-attention, with
  PEFT's prefix-tuning semantics (transformers_attention.own_prompt_prefixes).

The patched forward places the prompt whenever it runs the encoder. generate() runs the encoder on its own, before
any forward call, so it is wrapped: the wrapper puts the prompt before the encoder input once per call (as PEFT's
generate does: `inputs_embeds = [prompt; embeds]`, attention_mask with P ones) and the decode steps' forward calls,
which get `encoder_outputs`, pass through untouched. For prefix prompts the wrapper only chooses the pool entries
from the input once per call (hands `prompt_query=` on to the forward).
A forward call given `encoder_outputs` takes them as computed with the prompt (what the wrapped generate hands it).
"""
from __future__ import annotations

import weakref
from typing import Any, Dict

import torch

from ..prompts.base import check_task_ids
from .attach_state import attach_state
from .generate_args import resolve_generate
from .placement import batch_size, model_device, place_input_prompts
from .query_pass import compute_query

__all__ = ["install_generate", "prompt_in_encoder_outputs"]


def prompt_in_encoder_outputs(kw: Dict[str, Any]) -> bool:
    """True when the forward call gets the encoder's output (generate's decode steps): the prompt is already in it."""
    return kw.get("encoder_outputs") is not None


def install_generate(model, state) -> None:
    state.methods.replace(model, "generate", _PatchedSeq2SeqGenerate(model))


class _PatchedSeq2SeqGenerate:
    """The attached encoder-decoder model's generate(): the model's own arguments plus `task_ids=` and
    `prompt_query=`. A callable object holding the model weakly, like prompt_attach._PatchedForward (pickles,
    deep-copies)."""

    __wrapped_by_fastprompt__ = True
    __doc__ = "fastprompt-patched generate: the model's own arguments plus task_ids= and prompt_query=."

    def __init__(self, model):
        self._model_ref = weakref.ref(model)

    def __reduce__(self):
        return (_PatchedSeq2SeqGenerate, (self._model_ref(),))

    def __call__(self, *args, task_ids=None, prompt_query=None, **kwargs):
        model = self._model_ref()
        state = None if model is None else attach_state(model)
        if state is None:
            raise RuntimeError("fastprompt: this generate belongs to a model whose prompt was detached")
        original = state.original_generate(model) or (lambda *a, **k: type(model).generate(model, *a, **k))
        if kwargs.get("encoder_outputs") is not None:
            raise ValueError("generate: encoder_outputs cannot be combined with a fastprompt prompt (the prompt is "
                             "placed when the encoder runs); pass input_ids or inputs_embeds")
        # The encoder input as transformers resolves it (positional, inputs=, input_ids= or inputs_embeds=, a BOS
        # token when none is given; the same errors for two of them), handed on under its own name.
        call = resolve_generate(model, args, kwargs)
        named = {k: v for k, v in call.arguments.items() if k != "inputs"}
        rest = {k: v for k, v in call.kwargs.items() if k not in ("input_ids", "inputs_embeds")}
        rest[call.input_name] = call.inputs
        with torch.no_grad():
            placed = _place_for_generate(model, state, rest, task_ids, prompt_query)
        return original(**named, **placed)  # the encoder input now travels in `placed`


def _place_for_generate(model, state, kwargs: Dict[str, Any], task_ids, prompt_query) -> Dict[str, Any]:
    prompt = state.prompt
    if kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is None:
        raise ValueError("generate with a fastprompt prompt on an encoder-decoder model needs input_ids or "
                         "inputs_embeds (the encoder input the prompt goes before)")
    batch = batch_size(kwargs)
    if prompt.needs_task_ids:
        task_ids = check_task_ids(task_ids, prompt.config.num_tasks, batch, model_device(model))
    elif task_ids is not None:
        raise ValueError(f"task_ids was given but {type(prompt).__name__} has no tasks")
    query = prompt_query
    if prompt.needs_query and query is None:  # the pool / selector choice, from the input, once per call
        query = compute_query(model, state, prompt.query_mode, kwargs.get("input_ids"),
                              kwargs.get("attention_mask"), kwargs.get("inputs_embeds"))
    if prompt.placement == "prefix":
        if query is not None:
            kwargs["prompt_query"] = query  # the patched forward's prefill step selects with it
        return kwargs
    place_input_prompts(model, prompt, kwargs, batch, True, query, task_ids, encoder_side=True)
    return kwargs
