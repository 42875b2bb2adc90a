"""fastprompt ops: torch.library custom ops with autograd and per-backend implementations."""
from .prefix_attention import BACKENDS, prefix_attention

__all__ = ["BACKENDS", "prefix_attention", "gather_prompts", "mix_prompts"]


def __getattr__(name):  # the prompt-selection ops load on first use
    if name == "gather_prompts":
        from .gather_prompts import gather_prompts

        return gather_prompts
    if name == "mix_prompts":
        from .mix_prompts import mix_prompts

        return mix_prompts
    raise AttributeError(f"module 'fastprompt.ops' has no attribute {name!r}")
