"""Hoisting never runs while the model draws dropout, whatever the grad mode (issue 19, defect 5).

The unhoisted model draws one dropout mask per row for the virtual tokens; the hoisted prompt pass runs them once,
so every row would share one mask. train() under torch.no_grad() (evaluation passes of a model left in train mode,
generate() in train mode, RL rollouts) draws dropout as much as train() with grad does. The oracles: the unpatched
PeftModel under the same seed (the same dropout draws in the same order where the unhoisted path runs), and the
spread of the virtual positions' logits across identical rows, which only per-row masks make non-zero.
"""
import copy

import pytest
import torch

import fastprompt as fp
import fastprompt.patching as fpp
from fastprompt.integrations.prompt_attach import attach
from fastprompt.integrations.prompt_hoisting import HOISTED, last_prompt_path

import integration_helpers
from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import make_inputs, tiny_peft_pair

pytest.importorskip("peft")
P = 4


def _identical_rows(batch=4, seq=6):
    ids, mask = make_inputs(batch=1, seq=seq, padding="none")
    return ids.expand(batch, -1).contiguous(), mask.expand(batch, -1).contiguous()


@pytest.mark.parametrize("grad", [True, False])
def test_residual_dropout_in_training_equals_unpatched_under_the_same_seed(grad, monkeypatch):
    integration_helpers.override_tiny_config(monkeypatch, resid_pdrop=0.2, embd_pdrop=0.2)
    patched, oracle = tiny_peft_pair("gpt2", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    patched.train()
    oracle.train()
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    with torch.set_grad_enabled(grad):
        torch.manual_seed(7)
        got = patched(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(7)
        want = oracle(input_ids=ids, attention_mask=mask).logits
    integration_helpers.assert_rel_close(got, want, 1e-5, what=f"train(), grad={grad}")
    assert last_prompt_path(patched).startswith("unhoisted: dropout in training")
    patched.eval()
    with torch.no_grad():
        patched(input_ids=ids, attention_mask=mask)
    assert last_prompt_path(patched) == HOISTED  # eval: no dropout, hoisted again


def _virtual_spread(logits):
    """Largest spread across rows of the virtual positions' logits (rows have identical inputs)."""
    virtual = logits[:, :P].float()
    return (virtual - virtual[:1]).abs().max().item()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_attention_dropout_under_no_grad_draws_one_mask_per_row(family, monkeypatch):
    integration_helpers.override_tiny_config(monkeypatch, attention_dropout=0.3)
    patched, oracle = tiny_peft_pair(family, "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    patched.train()
    oracle.train()
    ids, mask = _identical_rows()
    with torch.no_grad():
        torch.manual_seed(3)
        got = patched(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(3)
        want = oracle(input_ids=ids, attention_mask=mask).logits
    assert _virtual_spread(want) > 1e-3  # the unpatched model: one mask per row
    assert _virtual_spread(got) > 1e-3
    assert last_prompt_path(patched).startswith("unhoisted: dropout in training")


def test_attached_prompt_in_training_under_no_grad_is_not_hoisted(monkeypatch):
    integration_helpers.override_tiny_config(monkeypatch, attention_dropout=0.3)
    model = integration_helpers.tiny_model("llama")
    attach(model, fp.PromptTuning(model, num_virtual_tokens=P, init="vocab"))
    ids, mask = _identical_rows()
    with torch.no_grad():
        model.eval()
        model(input_ids=ids, attention_mask=mask)
        assert last_prompt_path(model) == HOISTED
        model.train()
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert _virtual_spread(logits) > 1e-3
    assert last_prompt_path(model).startswith("unhoisted: dropout in training")


def test_a_dropout_module_training_inside_an_eval_model_blocks_hoisting(monkeypatch):
    # the rule reads each module's own training flag (e.g. only the attention layers put in train mode)
    integration_helpers.override_tiny_config(monkeypatch, attention_dropout=0.3)
    patched, _ = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = _identical_rows()
    patched.get_base_model().model.layers[1].self_attn.train()
    with torch.no_grad():
        patched(input_ids=ids, attention_mask=mask)
    assert last_prompt_path(patched).startswith("unhoisted: dropout in training")


def test_generate_in_training_mode_is_not_hoisted(monkeypatch):
    # generate() runs under no_grad: in train() mode the unhoisted model still draws a mask per row
    integration_helpers.override_tiny_config(monkeypatch, attention_dropout=0.3)
    patched, _ = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    patched.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert last_prompt_path(patched) == HOISTED
    patched.train()
    with torch.no_grad():
        patched.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert last_prompt_path(patched).startswith("unhoisted: dropout in training")
