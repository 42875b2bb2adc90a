"""Integrations with Hugging Face transformers (attention + mask registration, prefix plumbing) and PEFT."""
from .transformers_attention import (  # noqa: F401
    ATTENTION_NAME,
    LayerPrefix,
    ModelLayout,
    disable_fastprompt_attention,
    enable_fastprompt_attention,
    layer_prefixes,
    model_layout,
)

__all__ = [
    "ATTENTION_NAME",
    "LayerPrefix",
    "ModelLayout",
    "enable_fastprompt_attention",
    "disable_fastprompt_attention",
    "layer_prefixes",
    "model_layout",
]
