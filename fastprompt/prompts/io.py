"""load_prompt: rebuild a saved prompt (fastprompt_config.json + fastprompt_prompt.safetensors) exactly.

Its public path; it is defined in fastprompt.prompts.base, beside `save_pretrained` and the prompt registry, so
that `PromptModule.from_pretrained` reaches it without importing back up."""

from __future__ import annotations

from .base import load_prompt

__all__ = ["load_prompt"]
