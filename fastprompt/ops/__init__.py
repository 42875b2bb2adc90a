"""fastprompt ops: torch.library custom ops with autograd and per-backend implementations.

The functions are bound here eagerly: importing a submodule (e.g. `fastprompt.ops.gather_prompts`) would otherwise
leave the module object where users expect the function of the same name.
"""
from .gather_prompts import gather_prompts
from .mix_prompts import mix_prompts
from .prefix_attention import BACKENDS, prefix_attention

__all__ = ["BACKENDS", "prefix_attention", "gather_prompts", "mix_prompts"]
