"""Prompt hoisting is drop-in exact: a patched PEFT input-level model (prompt tuning, P-tuning, MPT) on a causal LM
runs its virtual tokens once per step, and its logits (over P + S positions), loss and every prompt-parameter
gradient equal the unpatched PEFT model's forward (which is right on transformers 5.24; only its generate is not)."""
import pytest
import torch

from gradient_checks import assert_grads_close
from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import (
    DECODER_FAMILIES,
    assert_rel_close,
    assert_step_parity,
    make_inputs,
    prompt_grads,
    tiny_peft_pair,
)

import fastprompt.patching as fpp
from fastprompt.integrations.prompt_hoisting import HOISTED, last_prompt_path

pytest.importorskip("peft")

METHODS = ["prompt", "ptuning_mlp", "ptuning_lstm", "mpt"]
PADDINGS = ["left", "right", "hole"]
P = 5


def _extra(method, batch=3):
    return {"task_ids": torch.tensor([2, 0, 2, 1][:batch])} if method == "mpt" else {}


@pytest.mark.parametrize("family", DECODER_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_step_parity(family, method):
    padding = PADDINGS[(DECODER_FAMILIES.index(family) + METHODS.index(method)) % 3]
    patched, oracle = tiny_peft_pair(family, method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=7, padding=padding)
    assert_step_parity(patched, oracle, "CAUSAL_LM", ids, mask, what=f"{family}/{method}/{padding}",
                       **_extra(method))
    assert last_prompt_path(patched) == HOISTED


@pytest.mark.parametrize("padding", PADDINGS)
def test_outputs_keep_peft_shapes_and_virtual_rows(padding):
    patched, oracle = tiny_peft_pair("llama", "mpt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=4, seq=6, padding=padding)
    task_ids = torch.tensor([1, 1, 0, 1])
    with torch.no_grad():
        got = patched(input_ids=ids, attention_mask=mask, task_ids=task_ids, output_hidden_states=True)
        want = oracle(input_ids=ids, attention_mask=mask, task_ids=task_ids, output_hidden_states=True)
    assert got.logits.shape == want.logits.shape == (4, P + 6, got.logits.shape[-1])
    assert_rel_close(got.logits, want.logits, 1e-5, what="logits")
    assert len(got.hidden_states) == len(want.hidden_states)
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert_rel_close(g, w, 1e-5, what=f"hidden state {i}")
    # rows of the same task share their virtual positions (one prompt pass per distinct task)
    assert torch.equal(got.logits[0, :P], got.logits[3, :P])


def test_inputs_embeds_and_no_mask():
    patched, oracle = tiny_peft_pair("qwen2", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, _ = make_inputs(batch=2, seq=6, padding="none")
    outs = []
    for model in (patched, oracle):
        model.zero_grad(set_to_none=True)
        embeds = model.word_embeddings(ids)
        out = model(inputs_embeds=embeds, labels=ids)
        out.loss.backward()
        outs.append((out.logits.detach(), out.loss.detach(), prompt_grads(model)))
    assert_rel_close(outs[0][0], outs[1][0], 1e-5, what="logits")
    assert_rel_close(outs[0][1], outs[1][1], 1e-5, what="loss")
    assert_grads_close(outs[0][2], outs[1][2], 1e-4)


def test_labels_masked_in_the_first_position_and_return_tuple():
    """The last virtual position predicts the first real token: that term is in the loss (or not, when -100)."""
    patched, oracle = tiny_peft_pair("gemma", "ptuning_mlp", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="right")
    for first in (None, -100):
        labels = ids.masked_fill(mask == 0, -100)
        if first is not None:
            labels[:, 0] = first
        assert_step_parity(patched, oracle, "CAUSAL_LM", ids, mask, what=f"first label {first}")
        got = patched(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
        want = oracle(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
        # (loss, logits); the unhoisted model adds its P + S cache, the hoisted forward keeps none (use_cache=True
        # or a cache argument runs the unhoisted path)
        assert isinstance(got, tuple) and len(got) == 2 and len(want) == 3
        assert_rel_close(got[0], want[0], 1e-5, what="tuple loss")
        assert_rel_close(got[1], want[1], 1e-5, what="tuple logits")


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method", ["prompt", "mpt"])
def test_gradient_checkpointing(method, reentrant):
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    for model in (patched, oracle):
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    assert_step_parity(patched, oracle, "CAUSAL_LM", ids, mask, what=f"checkpointing reentrant={reentrant}",
                       **_extra(method))
    assert last_prompt_path(patched) == HOISTED


def test_bf16_error_no_larger_than_unhoisted():
    """bf16: hoisted and unhoisted differ by rounding only; each against the float32 model, the hoisted error is
    of the unhoisted error's size."""
    patched, oracle = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    exact = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=P)[1]
    fpp.patch_model(patched)
    patched.to(torch.bfloat16)
    oracle.to(torch.bfloat16)
    ids, mask = make_inputs(batch=3, seq=7, padding="left")
    with torch.no_grad():
        want = exact(input_ids=ids, attention_mask=mask, labels=ids).logits
        got = patched(input_ids=ids, attention_mask=mask).logits.float()
        base = oracle(input_ids=ids, attention_mask=mask).logits.float()
    assert got.dtype == torch.float32 and last_prompt_path(patched) == HOISTED
    err_hoisted = ((got - want).norm() / want.norm()).item()
    err_unhoisted = ((base - want).norm() / want.norm()).item()
    assert err_hoisted < 2e-2 and err_hoisted <= 2 * err_unhoisted + 1e-3, (err_hoisted, err_unhoisted)
    patched.train()
    out = patched(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = prompt_grads(patched)
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads.values())
