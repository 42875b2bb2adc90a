"""fastprompt: fused prefix-attention kernels and drop-in acceleration for prompt learning."""

__version__ = "0.1.0"

# Everything imports on first use: `fastprompt --version` and `fastprompt info` must not pay for torch,
# transformers or peft up front. `fastprompt.ops` registers the custom ops when it is first imported.
_SUBMODULES = ("ops", "reference", "prompts", "integrations", "bench", "continual")
_LAZY = {
    "patch_model": ("fastprompt.patching", "patch_model"),
    "unpatch_model": ("fastprompt.patching", "unpatch_model"),
    "load_prompt": ("fastprompt.prompts.io", "load_prompt"),
    "PromptTuning": ("fastprompt.prompts", "PromptTuning"),
    "PTuning": ("fastprompt.prompts", "PTuning"),
    "PrefixTuning": ("fastprompt.prompts", "PrefixTuning"),
    "PTuningV2": ("fastprompt.prompts", "PTuningV2"),
    "PromptPool": ("fastprompt.prompts", "PromptPool"),
    "MultiTaskPrompt": ("fastprompt.prompts", "MultiTaskPrompt"),
    "DualPrompt": ("fastprompt.prompts", "DualPrompt"),
    "CodaPrompt": ("fastprompt.prompts", "CodaPrompt"),
    "PromptStack": ("fastprompt.prompts", "PromptStack"),
    "TaskHeads": ("fastprompt.prompts", "TaskHeads"),
    "SequenceClassificationHead": ("fastprompt.prompts", "SequenceClassificationHead"),
    "TokenClassificationHead": ("fastprompt.prompts", "TokenClassificationHead"),
    "SpanExtractionHead": ("fastprompt.prompts", "SpanExtractionHead"),
    "param_groups": ("fastprompt.prompts", "param_groups"),
}

__all__ = ["ops", "reference", "__version__", *_LAZY]


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fastprompt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_LAZY))
