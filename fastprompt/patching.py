"""`fastprompt.patch_model` / `fastprompt.unpatch_model`: one call to accelerate a model, one call to undo it."""
from __future__ import annotations

from ._versions import warn_untested_versions_once
from .integrations import prompt_attach
from .integrations.peft import patch_peft_model, unpatch_peft_model
from .integrations.prompt_hoisting import set_prompt_hoisting

__all__ = ["patch_model", "unpatch_model"]


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel  # optional dependency (the peft extra)
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def patch_model(model, prompt=None, *, backend: str = "auto", hoist_prompts: bool = True):
    """Accelerate `model` in place and return it.

    - `prompt` None and `model` a `peft.PeftModel` with a prompt-learning adapter (PrefixTuning, PromptTuning,
      P-tuning, MultitaskPromptTuning): drop-in, same outputs and saved adapters (fastprompt.integrations.peft).
    - `prompt` a fastprompt prompt module: attach it to the transformers `model` (fastprompt.integrations.prompt_attach).
    `backend` forces the prefix_attention backend of the patched model ("auto", "torch", "triton", "cuda",
    "reference"). `hoist_prompts=False` keeps input-level prompts on causal LMs unhoisted (by default their virtual
    tokens run once per step, see fastprompt.integrations.prompt_hoisting). Patching twice is a no-op;
    `unpatch_model` restores the model exactly.
    """
    warn_untested_versions_once()
    if not isinstance(hoist_prompts, bool):
        raise TypeError(f"fastprompt.patch_model: hoist_prompts must be a bool, got {type(hoist_prompts).__name__}")
    patched = _patch(model, prompt, backend)
    if not hoist_prompts:
        set_prompt_hoisting(patched, False)
    return patched


def _patch(model, prompt, backend):
    if prompt is None:
        if not _is_peft_model(model):
            raise TypeError(
                f"fastprompt.patch_model: {type(model).__name__} is not a peft.PeftModel; pass a fastprompt prompt "
                "module as `prompt` to add prompt learning to a plain transformers model"
            )
        return patch_peft_model(model, backend=backend)
    if _is_peft_model(model):
        raise TypeError("fastprompt.patch_model: pass either a PeftModel or a (transformers model, prompt) pair")
    result = prompt_attach.attach(model, prompt, backend=backend)
    return model if result is None else result


def unpatch_model(model):
    """Undo `patch_model` exactly; returns the model. A model that is not patched is returned unchanged."""
    if _is_peft_model(model):
        return unpatch_peft_model(model)
    result = prompt_attach.detach(model)
    return model if result is None else result
