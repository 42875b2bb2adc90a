"""Triton kernels, installed as `fastprompt.kernels` (never import this folder as a top-level `kernels`).

Submodules import triton when loaded; this package itself does not, so `import fastprompt.kernels` stays cheap
and the TRITON_INTERPRET switch (read when kernels are decorated) is honoured whenever a kernel module loads.
"""
import importlib
import importlib.util

# Whether the triton package is installed, looked up once: the ops' backend checks run inside torch.compile'd
# code, and torch 2.11's dynamo refuses to trace importlib.util.find_spec (a graph break, fatal under fullgraph).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

_LAZY = {
    "prefix_attention_forward": "prefix_attention_fwd",
    "prefix_attention_backward": "prefix_attention_bwd",
    "FWD_CONFIGS": "prefix_attention_common",
    "BWD_DKDV_CONFIGS": "prefix_attention_common",
    "BWD_DQ_CONFIGS": "prefix_attention_common",
    "BWD_DPREFIX_CONFIGS": "prefix_attention_common",
    "BIASED_FWD_CONFIGS": "prefix_attention_common",
    "BIASED_BWD_DQ_CONFIGS": "prefix_attention_common",
    "BIASED_DROPOUT_BWD_DQ_CONFIGS": "prefix_attention_common",
    "pick_config": "prefix_attention_common",
    "fit_block_m": "prefix_attention_common",
}


# Kernel modules served as attributes of this package, imported on first access (`kernels.gather_mix`).
_LAZY_SUBMODULES = ("gather_mix",)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
