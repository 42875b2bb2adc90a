"""fastprompt ops: torch.library custom ops with autograd and per-backend implementations.

The functions are bound here eagerly: importing a submodule (e.g. `fastprompt.ops.gather_prompts`) would otherwise
leave the module object where users expect the function of the same name. `shared_prefix_decode` is the public
entry of the lean CPU decode step (one query per row over a shared prefix), which model integrations call before
falling back to `prefix_attention`.
"""
from .gather_prompts import gather_prompts
from .mix_prompts import mix_prompts
from .prefix_attention import BACKENDS, prefix_attention
from .prefix_attention_torch.decode import shared_prefix_decode

__all__ = ["BACKENDS", "prefix_attention", "gather_prompts", "mix_prompts", "shared_prefix_decode"]
