"""A patched PEFT prefix-tuned model on the Triton backend (TRITON_INTERPRET=1 on the CPU) = unpatched PEFT."""
import importlib
import os

import pytest

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import assert_step_parity, make_inputs, peft_or_hand_written_prefix, tiny_peft_pair

import fastprompt.patching as fpp

pytest.importorskip("peft")


def _triton_unavailable():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET=1 is not set (the CPU lane runs Triton through its interpreter)"
    try:
        importlib.import_module("fastprompt.ops.prefix_attention_triton")
        importlib.import_module("triton")
    except ImportError as exc:
        return f"the triton backend is not importable yet: {exc}"
    return None


pytestmark = pytest.mark.skipif(_triton_unavailable() is not None, reason=str(_triton_unavailable()))


@pytest.mark.parametrize("family,task,padding", [("llama", "CAUSAL_LM", "hole"), ("bert", "SEQ_CLS", "right")])
def test_patched_prefix_tuning_on_triton(family, task, padding, monkeypatch):
    import fastprompt.ops

    backends = []
    real = fastprompt.ops.prefix_attention

    def spy(*args, **kwargs):
        backends.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastprompt.ops, "prefix_attention", spy)
    patched, oracle = tiny_peft_pair(family, "prefix", task, num_virtual_tokens=3)
    fpp.patch_model(patched, backend="triton")
    ids, mask = make_inputs(batch=2, seq=5, padding=padding)
    oracle = peft_or_hand_written_prefix(oracle, ids, mask)
    assert_step_parity(patched, oracle, task, ids, mask, what=f"triton/{family}")
    assert backends and set(backends) == {"triton"}
