"""Two backward passes over one retained graph under reentrant gradient checkpointing: the second pass's prompt
gradients are its own loss's, never the first's counted again.

Reentrant checkpointing differentiates a layer's positional inputs only, so the patched PEFT paths (hoisted prompt
tuning, prefix tuning) hand the layers detached leaves of the prompt K/V and bridge their gradients back. A bridge
that read the leaves' `.grad` (never reset: zero_grad() does not reach them) counted the first loss again:
`loss_a.backward(retain_graph=True); zero_grad(); loss_b.backward()` gave gradients off by 24x (hoisted prompt
tuning) and 10x (prefix tuning). The oracle is the unpatched PEFT model (or PEFT's prefix semantics written out)
without checkpointing, differentiating loss_b alone.
"""
import warnings

import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import assert_rel_close, make_inputs, peft_or_hand_written_prefix, prompt_grads, \
    tiny_peft_pair

import fastprompt.patching as fpp
from fastprompt.integrations.prompt_hoisting import HOISTED, last_prompt_path

pytest.importorskip("peft")


def _losses(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    logits = out.logits.float()
    weights = torch.linspace(0.5, 1.5, logits.shape[-1])
    return out.loss, (logits.square() * weights).mean()  # two losses of one graph


@pytest.mark.parametrize("method", ["prompt", "prefix_proj"])
@pytest.mark.parametrize("second_only", [True, False])
def test_second_backward_pass_carries_its_own_gradient(method, second_only):
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM")
    fpp.patch_model(patched)
    patched.train()
    oracle.train()  # dropout is 0 in the tiny configs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids, mask = make_inputs(padding="left")

    loss_a, loss_b = _losses(patched, ids, mask)
    loss_a.backward(retain_graph=True)
    if second_only:
        patched.zero_grad(set_to_none=True)
    loss_b.backward()
    got = prompt_grads(patched)
    if method == "prompt":
        assert last_prompt_path(patched) == HOISTED

    oracle = peft_or_hand_written_prefix(oracle, ids, mask)
    oracle.zero_grad(set_to_none=True)
    want_a, want_b = _losses(oracle, ids, mask)
    (want_b if second_only else want_a + want_b).backward()
    want = prompt_grads(oracle)
    assert got.keys() == want.keys() and want
    for name in want:
        assert_rel_close(got[name], want[name], 1e-4, what=f"{method} {name}")
