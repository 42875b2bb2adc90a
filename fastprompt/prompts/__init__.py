"""fastprompt's own prompt methods, one module per method, each with its config dataclass."""

from .base import PromptConfig, PromptModule
from .coda_prompt import CodaPrompt, CodaPromptConfig
from .dual_prompt import DualPrompt, DualPromptConfig
from .multitask import MultiTaskPrompt, MultiTaskPromptConfig
from .param_groups import param_groups
from .prefix_tuning import PrefixTuning, PrefixTuningConfig
from .prompt_pool import PromptPool, PromptPoolConfig
from .prompt_stack import PromptStack, PromptStackConfig
from .prompt_tuning import PromptTuning, PromptTuningConfig
from .ptuning import PTuning, PTuningConfig
from .ptuning_v2 import PTuningV2, PTuningV2Config
from .task_heads import SequenceClassificationHead, SpanExtractionHead, TaskHeads, TokenClassificationHead

__all__ = [
    "PromptConfig",
    "PromptModule",
    "PromptTuning",
    "PromptTuningConfig",
    "PTuning",
    "PTuningConfig",
    "PrefixTuning",
    "PrefixTuningConfig",
    "PTuningV2",
    "PTuningV2Config",
    "PromptPool",
    "PromptPoolConfig",
    "MultiTaskPrompt",
    "MultiTaskPromptConfig",
    "DualPrompt",
    "DualPromptConfig",
    "CodaPrompt",
    "CodaPromptConfig",
    "PromptStack",
    "PromptStackConfig",
    "TaskHeads",
    "SequenceClassificationHead",
    "TokenClassificationHead",
    "SpanExtractionHead",
    "param_groups",
]
