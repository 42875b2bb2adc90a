"""generate() of a causal LM carrying fastprompt's own input-level prompt: a static cache gets room for the prompt.

On a causal LM the attached prompt enters generate() through the patched forward (prompt_attach): hoisted, the KV
cache holds the real tokens only; unhoisted (pools and selectors, hoisting turned off, a sliding window, dropout in
training), the P virtual tokens enter the cache at prefill too. A static cache that generate() builds is sized for
the real tokens (max_length - 1), so the unhoisted prefill overflowed it (IndexError). This wrapper builds that
cache itself, P slots longer, from generate()'s own resolution of the call (generate_args); a hoisted call leaves
the extra slots unused and masked. Every other call reaches the model's generate() unchanged.
"""
from __future__ import annotations

import weakref

from .attach_state import attach_state
from .generate_args import refuse_prompt_cache_sliced_by_length, resolve_generate, static_cache_with_room

__all__ = ["install_generate", "wants_generate_wrapper"]


def wants_generate_wrapper(model, prompt) -> bool:
    """A decoder-only model that generates, with a prompt placed in its input."""
    if prompt.placement != "input" or getattr(model.config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def install_generate(model, state) -> None:
    state.methods.replace(model, "generate", _PatchedCausalGenerate(model))


class _PatchedCausalGenerate:
    """The attached causal LM's generate(): the model's own arguments (task_ids= and prompt_query= reach the patched
    forward as model kwargs). A callable object holding the model weakly, like prompt_attach._PatchedForward
    (pickles, deep-copies)."""

    __wrapped_by_fastprompt__ = True
    __doc__ = "fastprompt-patched generate: a static cache gets room for the attached prompt's virtual tokens."

    def __init__(self, model):
        self._model_ref = weakref.ref(model)

    def __reduce__(self):
        return (_PatchedCausalGenerate, (self._model_ref(),))

    def __call__(self, *args, **kwargs):
        model = self._model_ref()
        state = None if model is None else attach_state(model)
        if state is None:
            raise RuntimeError("fastprompt: this generate belongs to a model whose prompt was detached")
        original = state.original_generate(model) or (lambda *a, **k: type(model).generate(model, *a, **k))
        call = resolve_generate(model, args, kwargs)
        # a cache without fastprompt's record is told by its length at the first step (prompt_attach)
        refuse_prompt_cache_sliced_by_length(call, state.prompt.num_input_tokens(), unrecorded_holds_prompt=False)
        kwargs = static_cache_with_room(model, call, kwargs, state.prompt.num_input_tokens())
        return original(*args, **kwargs)
