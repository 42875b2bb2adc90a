"""Optimizer parameter groups for a model patched with a fastprompt prompt: prompts, encoder, heads, base.

The four kinds of trainable weights want very different step sizes, so they go in separate groups:

- "prompt": the prompt tables themselves (pool entries, keys, selectors W_t / b_t, prefixes). Soft prompts start
  from noise and sit far from where they end: a large learning rate (AdamW 1e-2 .. 3e-2 is usual).
- "encoder": the learned prompt encoder E (fastprompt.prompts.encoder). A small network on frozen features:
  1e-3 (ordinary for a fresh linear / MLP layer).
- "heads": the task heads M_t (fastprompt.prompts.task_heads): fresh linear layers, 1e-3.
- "base": the base model's own weights, only those that require grad. `fastprompt.patch_model` freezes them; to
  fine-tune them too (the seed's optional step), set `requires_grad_(True)` on the ones to train after patching.
  Pretrained weights move little: 1e-5 .. 5e-5. (A query_layer pass reuses the lower layers only while they
  are frozen; unfreezing them makes the real pass recompute them, see fastprompt.integrations.query_pass.)

    groups = fp.param_groups(model)                      # suggested learning rates
    opt = torch.optim.AdamW(groups, weight_decay=0.0)    # each group keeps its "lr" and "name"
"""

from __future__ import annotations

from typing import Dict, List

from torch import nn

from .base import ATTACHED_PROMPT_NAME, PromptModule

__all__ = ["param_groups", "SUGGESTED_LR"]

SUGGESTED_LR = {"prompt": 3e-2, "encoder": 1e-3, "heads": 1e-3, "base": 2e-5}


def param_groups(model: nn.Module, *, prompt_lr: float = SUGGESTED_LR["prompt"],
                 encoder_lr: float = SUGGESTED_LR["encoder"], head_lr: float = SUGGESTED_LR["heads"],
                 base_lr: float = SUGGESTED_LR["base"]) -> List[Dict]:
    """[{"name", "params", "lr"}, ...] for the trainable parameters of a patched `model` (or of a prompt module
    alone); empty groups are left out. Every trainable parameter lands in exactly one group."""
    prompt = model if isinstance(model, PromptModule) else attached_prompt(model)
    if prompt is None:
        raise ValueError("param_groups needs a model patched with a fastprompt prompt (fp.patch_model(model, "
                         "prompt)) or a prompt module")
    encoder = getattr(prompt, "encoder", None)
    heads = getattr(prompt, "heads", None)
    ids = {
        "encoder": {id(p) for p in encoder.parameters()} if isinstance(encoder, nn.Module) else set(),
        "heads": {id(p) for p in heads.parameters()} if isinstance(heads, nn.Module) else set(),
    }
    prompt_ids = {id(p) for p in prompt.parameters()}
    groups = {"prompt": [], "encoder": [], "heads": [], "base": []}
    for p in model.parameters():  # model.parameters() holds the prompt's too (a submodule once patched)
        if not p.requires_grad:
            continue
        if id(p) in ids["encoder"]:
            groups["encoder"].append(p)
        elif id(p) in ids["heads"]:
            groups["heads"].append(p)
        elif id(p) in prompt_ids:
            groups["prompt"].append(p)
        else:
            groups["base"].append(p)
    lrs = {"prompt": prompt_lr, "encoder": encoder_lr, "heads": head_lr, "base": base_lr}
    return [{"name": name, "params": params, "lr": lrs[name]} for name, params in groups.items() if params]


def attached_prompt(model: nn.Module):
    """The prompt fastprompt.patch_model attached to `model` (its submodule ATTACHED_PROMPT_NAME), or None."""
    prompt = model._modules.get(ATTACHED_PROMPT_NAME) if isinstance(model, nn.Module) else None
    return prompt if isinstance(prompt, PromptModule) else None
