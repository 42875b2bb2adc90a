"""What attaching a fastprompt prompt to a model records on that model instance (its settings and what the patch
replaced, nothing of any one call): the AttachState that prompt_attach writes and the generate wrappers
(own_prompt_generate, seq2seq_own_prompts) read."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..prompts.base import ATTACHED_PROMPT_NAME, PromptModule
from .patched_method import ReplacedMethods

__all__ = ["AttachState", "STATE_ATTR", "PROMPT_ATTR", "attach_state", "attached_prompt"]

PROMPT_ATTR = ATTACHED_PROMPT_NAME  # the prompt's submodule name (the prompts layer names it)
STATE_ATTR = "_fastprompt_attach_state"



@dataclass
class AttachState:
    prompt: PromptModule
    bound_forward: Any  # the method the wrapper calls
    signature: Optional[inspect.Signature]  # of bound_forward; rebuilt on demand (see __getstate__)
    requires_grad: Dict[str, bool]
    attention_token: Any = None
    # the one record of what attach replaced: the model's `forward` / `generate`, the query pass's layer forwards
    methods: ReplacedMethods = field(default_factory=ReplacedMethods)

    def original_generate(self, model):
        """The model's own `generate` instance attribute before attach, or None."""
        return self.methods.original(model, "generate")

    def forward_signature(self) -> inspect.Signature:
        if self.signature is None:
            self.signature = inspect.signature(self.bound_forward)
        return self.signature

    # pickle / torch.save / deepcopy: a signature's annotations need not pickle; it is rebuilt after loading.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["signature"] = None
        return state


def attach_state(model) -> Optional[AttachState]:
    """The AttachState of a model with a fastprompt prompt attached, or None."""
    return model.__dict__.get(STATE_ATTR)


def attached_prompt(model) -> Optional[PromptModule]:
    state = attach_state(model)
    return None if state is None else state.prompt
