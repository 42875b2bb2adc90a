"""load_prompt: rebuild a saved prompt (fastprompt_config.json + fastprompt_prompt.safetensors) exactly."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .base import CONFIG_NAME, WEIGHTS_NAME, PromptModule, prompt_class

__all__ = ["load_prompt"]


def load_prompt(path: str, model=None, *, encoder=None, device=None,
                dtype: Optional[torch.dtype] = None) -> PromptModule:
    """Load a prompt saved with `prompt.save_pretrained(path)`.

    model: optional transformers model (or config); a prompt built for another model shape raises ValueError.
    encoder: for a prompt saved with a custom (user nn.Module) prompt encoder, the module to load its weights
    into: an instance, or a class / factory called with no arguments. Built-in encoders and task heads are
    rebuilt from the config alone.
    """
    # The method modules register themselves on import.
    from . import (coda_prompt, dual_prompt, multitask, prefix_tuning, prompt_pool, prompt_stack,  # noqa: F401
                   prompt_tuning, ptuning, ptuning_v2)
    from .encoder import resolve_custom_encoder

    config_path = os.path.join(path, CONFIG_NAME)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: is {path!r} a folder written by save_pretrained?")
    with open(config_path) as fh:
        data = json.load(fh)
    cls = prompt_class(data.get("prompt_type", ""))
    config = cls.config_class.from_dict(data)
    extra = {}
    if getattr(config, "encoder", None) == "custom":
        extra["encoder"] = resolve_custom_encoder(encoder, getattr(config, "encoder_class", ""))
    elif encoder is not None:
        raise ValueError(f"encoder= was given but the prompt in {path!r} has no custom encoder "
                         f"(its encoder is {getattr(config, 'encoder', None)!r})")
    # Build without the init cost of text/vocab init: the weights are overwritten below.
    if getattr(config, "init", None) in ("vocab", "text"):
        import dataclasses

        prompt = cls(dataclasses.replace(config, init="random"), **extra)
        prompt.config = config
    else:
        prompt = cls(config, **extra)

    from safetensors.torch import load_file

    state = load_file(weights_path)
    expected = prompt.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shapes = [f"{k}: saved {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(
            f"{weights_path} does not match its config ({cls.__name__}): missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {bad_shapes}"
        )
    prompt.load_state_dict(state, strict=True)
    if model is not None:
        prompt.check_compatible(model)
    if device is not None or dtype is not None:
        prompt.to(device=device, dtype=dtype)
    return prompt
