"""generate()'s arguments resolved the way transformers resolves them, in one place for every fastprompt wrapper.

A wrapper around `generate()` (prompt hoisting, PEFT's input-level generate, the encoder-decoder wrapper of
fastprompt's own prompts) needs to know what the call will run on: the input tensor, whatever spelling carried it
(positional, `inputs=`, `input_ids=`, `inputs_embeds=`, a BOS token when none), and how long the generation can get
(`max_new_tokens` before `max_length`, from the keyword arguments, a passed GenerationConfig or the model's default
one). Deriving those by hand went wrong twice (an `inputs=` call missed; `max_length` read where `max_new_tokens`
wins), so this module asks transformers' own generation machinery, the steps `GenerationMixin.generate` itself
runs: `_prepare_generation_config` (kwargs > passed config > model default > global defaults),
`_prepare_model_inputs` (which argument is the input), `_prepare_generated_length` (the final `max_length`), and
the cache length generate() sizes a static cache to. Resolving changes nothing: the wrapper passes the caller's
arguments on, and transformers resolves them again, identically. The one change a wrapper may make is
`static_cache_with_room`: where generate() would build a static cache for the real tokens while virtual tokens enter
the cache too, that cache is built with room for them.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor
from transformers import StaticCache
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

from .cache_compat import cache_kwarg, cache_length, get_cache
from .prompt_cache import INLINE, prompt_in_cache

__all__ = ["GenerateCall", "resolve_generate", "static_cache_with_room", "STATIC_CACHE_IMPLEMENTATIONS",
           "refuse_prompt_cache_sliced_by_length"]


STATIC_CACHE_IMPLEMENTATIONS = tuple(ALL_STATIC_CACHE_IMPLEMENTATIONS)


@dataclass
class GenerateCall:
    """One generate() call as transformers will see it."""

    arguments: dict                 # generate()'s named parameters as bound (inputs, generation_config, ...)
    kwargs: dict                    # its **kwargs as given (the named parameters are in `arguments`)
    inputs: Tensor                  # transformers' `inputs_tensor`: the encoder / decoder input
    input_name: str                 # which argument it is: "input_ids", "inputs_embeds", ...
    input_ids: Optional[Tensor]     # decoder-only: the ids generation continues ([B, 0] beside inputs_embeds)
    generation_config: Any          # the resolved GenerationConfig (a copy; max_length final for decoder-only)
    model_kwargs: dict              # the model kwargs left after the generation options (attention_mask, ...)
    max_cache_length: Optional[int]  # decoder-only: the real tokens generate() sizes its cache for

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def user_cache(self) -> Any:
        return get_cache(self.model_kwargs)

    @property
    def total_length(self) -> Optional[int]:
        """Decoder-only: the real tokens the generated sequence can reach (input + new): what a sliding window
        must hold. One more than the model ever reads (the last token is never fed back), on the safe side."""
        return None if self.max_cache_length is None else self.max_cache_length + 1

    @property
    def static_cache(self) -> bool:
        """generate() will build a static cache itself (a static cache_implementation and no cache passed)."""
        return (self.generation_config.cache_implementation in STATIC_CACHE_IMPLEMENTATIONS
                and self.user_cache is None)


@functools.lru_cache(maxsize=64)
def _generate_signature(generate) -> inspect.Signature:
    return inspect.signature(generate)  # per class's generate(): a fraction of a millisecond saved per call


def resolve_generate(model, args: tuple, kwargs: dict) -> GenerateCall:
    """Resolve `model.generate(*args, **kwargs)` (`model`: the transformers model whose generate() runs) with
    transformers' own steps, in generate()'s order. Raises what generate() would raise for the same arguments
    (unknown positional arguments, `inputs` given twice, no input and no BOS token)."""
    signature = _generate_signature(type(model).generate)
    try:
        bound = signature.bind(model, *args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{type(model).__name__}.generate(): {err}") from None
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)), None)  # self
    given = dict(arguments.pop("kwargs", {}))
    extra = dict(given)
    extra.pop("trust_remote_code", None)  # generate() takes it off first
    for name in ("tokenizer", "assistant_tokenizer"):  # generation-mode arguments, never model kwargs
        extra.pop(name, None)
    passed_config = arguments.get("generation_config")

    # generate()'s own test of "no length given anywhere", made before the defaults are filled in
    has_default_max_length = (extra.get("max_length") is None
                              and (passed_config is None or passed_config.max_length is None)
                              and model.generation_config.max_length is None)
    generation_config, model_kwargs = model._prepare_generation_config(passed_config, **extra)
    inputs, input_name, model_kwargs = model._prepare_model_inputs(
        arguments.get("inputs"), generation_config.bos_token_id, model_kwargs)

    input_ids, max_cache_length = None, None
    if not model.config.is_encoder_decoder:
        input_ids = inputs if input_name == "input_ids" else model_kwargs.get("input_ids")
        length = int(input_ids.shape[1]) if input_ids is not None else int(inputs.shape[1])
        # `has_default_max_length` only chooses a warning once max_new_tokens is set; the real generate() warns
        generation_config = model._prepare_generated_length(
            generation_config=generation_config,
            has_default_max_length=has_default_max_length or generation_config.max_new_tokens is not None,
            has_default_min_length=True,  # only min_length's warning depends on it; min_length is not used here
            model_input_name=input_name, input_ids_length=length, inputs_tensor=inputs)
        # generate()'s step 7: the cache holds max_length - 1 tokens (+ the embeddings in front of empty ids)
        max_cache_length = generation_config.max_length - 1
        if input_name == "inputs_embeds" and inputs.shape[1] != length:
            max_cache_length += int(inputs.shape[1])
    return GenerateCall(arguments=arguments, kwargs=given, inputs=inputs, input_name=input_name,
                        input_ids=input_ids, generation_config=generation_config, model_kwargs=model_kwargs,
                        max_cache_length=max_cache_length)


def static_cache_with_room(model, call: GenerateCall, kwargs: dict, extra_tokens: int) -> dict:
    """`kwargs` for `model.generate()`, where the call would make generate() build a static cache: that cache built
    here, `extra_tokens` slots longer (virtual tokens that enter the cache at prefill besides the real tokens
    generate() sizes it for). Otherwise `kwargs` unchanged. The length is generate()'s own (`call`), raised to a
    passed `max_cache_len` ceiling as generate() does."""
    if not call.static_cache or call.max_cache_length is None or extra_tokens <= 0:
        return kwargs
    length = call.max_cache_length
    ceiling = getattr(call.generation_config, "max_cache_len", None)  # transformers >= 5.25
    if ceiling is not None:
        length = max(length, int(ceiling))
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    offloading = {"offloading": True} if "offloaded" in call.generation_config.cache_implementation else {}
    kwargs = dict(kwargs)
    # generate() refuses a cache beside any cache_implementation: unset it (a keyword overrides a passed config and
    # the model's default alike; beside a passed config, transformers logs a one-time deprecation note)
    kwargs["cache_implementation"] = None
    kwargs[cache_kwarg(type(model).generate)] = StaticCache(config=config, max_cache_len=length + extra_tokens,
                                                            **offloading)
    return kwargs


def refuse_prompt_cache_sliced_by_length(call: GenerateCall, virtual_tokens: int, *,
                                         unrecorded_holds_prompt: bool) -> None:
    """generate() given a cache that starts with the prompt's P virtual tokens and the whole sequence: transformers
    takes the new tokens as `input_ids[:, cache_length:]` (when the attention mask is as long as the input, or none
    is given; always from inputs_embeds), the P virtual tokens counted, so P real tokens would be dropped without a
    word. Refused, with what works instead. `unrecorded_holds_prompt`: what a cache without fastprompt's record
    holds (PEFT's rule: a non-empty cache holds the prompt)."""
    cache = call.user_cache
    held = cache_length(cache) if cache is not None else 0
    if held == 0:
        return
    record = prompt_in_cache(cache)
    holds_prompt = record.layout == INLINE if record is not None else unrecorded_holds_prompt
    if not holds_prompt:
        return
    mask = call.model_kwargs.get("attention_mask")
    if call.input_name == "input_ids" and mask is not None and mask.shape[-1] != call.inputs.shape[1]:
        return  # only the new tokens given (a longer mask): generate() does not slice them
    raise ValueError(
        f"fastprompt: generate() got a KV cache of {held} tokens that starts with the prompt's {virtual_tokens} "
        f"virtual tokens, and the whole sequence ({call.input_name} of {call.inputs.shape[1]} tokens): generate() "
        f"slices the new tokens by the cache length, prompt included, and so drops {virtual_tokens} of them. Pass "
        "only the new tokens as input_ids (with the attention_mask over the cached and the new tokens), or let "
        "prompt hoisting fill the cache (its caches hold real tokens only)")
