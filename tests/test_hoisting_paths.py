"""Which path each configuration takes: hoisted where it is exact, the unhoisted path (same outputs as unpatched
PEFT / the explicit concat) where it is not, and an opt-out."""
import copy

import pytest
import torch

import fastprompt as fp
import fastprompt.patching as fpp
from fastprompt.integrations.prompt_attach import attach
from fastprompt.integrations.prompt_hoisting import HOISTED, last_prompt_path, set_prompt_hoisting

import integration_helpers
from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import assert_rel_close, assert_step_parity, make_inputs, tiny_model, tiny_peft_pair

pytest.importorskip("peft")
P = 4


def _installed(model):
    return "_fastprompt_peft_hoisting" in model.__dict__


@pytest.mark.parametrize("family,task", [("llama", "SEQ_CLS"), ("llama", "FEATURE_EXTRACTION"), ("bert", "SEQ_CLS"),
                                         ("roberta", "FEATURE_EXTRACTION")])
def test_not_hoisted_for_other_tasks_and_bidirectional_encoders(family, task):
    patched, oracle = tiny_peft_pair(family, "prompt", task, num_virtual_tokens=P)
    fpp.patch_model(patched)
    assert not _installed(patched)  # PEFT's forward with fastprompt's get_prompt, as before
    ids, mask = make_inputs(batch=3, seq=6, padding="right")
    assert_step_parity(patched, oracle, task, ids, mask, what=f"{family} {task}")
    assert last_prompt_path(patched) is None


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_shorter_than_p_plus_s_runs_unhoisted(family, monkeypatch):
    integration_helpers.override_tiny_config(monkeypatch, sliding_window=8)
    patched, oracle = tiny_peft_pair(family, "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    short, short_mask = make_inputs(batch=3, seq=4, padding="left")  # P + S = 8: every key in the window
    assert_step_parity(patched, oracle, "CAUSAL_LM", short, short_mask, what="inside the window")
    assert last_prompt_path(patched) == HOISTED
    ids, mask = make_inputs(batch=3, seq=7, padding="left")  # P + S = 11 > 8
    assert_step_parity(patched, oracle, "CAUSAL_LM", ids, mask, what="past the window")
    assert last_prompt_path(patched).startswith("unhoisted: sliding window 8")


def test_dropout_in_training_runs_unhoisted(monkeypatch):
    integration_helpers.override_tiny_config(monkeypatch, resid_pdrop=0.1)
    patched, oracle = tiny_peft_pair("gpt2", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    assert_step_parity(patched, oracle, "CAUSAL_LM", ids, mask, what="eval")  # dropout off: hoisted
    assert last_prompt_path(patched) == HOISTED
    patched.train()
    patched(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert last_prompt_path(patched).startswith("unhoisted: dropout in training")


def test_opt_out_output_attentions_and_cache_requests_run_unhoisted():
    patched, oracle = tiny_peft_pair("llama", "ptuning_mlp", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="hole")
    set_prompt_hoisting(patched, False)
    assert_step_parity(patched, oracle, "CAUSAL_LM", ids, mask, what="opted out")
    assert last_prompt_path(patched) == "unhoisted: hoisting turned off"
    set_prompt_hoisting(patched, True)
    with torch.no_grad():
        patched(input_ids=ids, attention_mask=mask, output_attentions=True)
        assert last_prompt_path(patched) == "unhoisted: output_attentions"
        out = patched(input_ids=ids, attention_mask=mask, use_cache=True)
        assert last_prompt_path(patched) == "unhoisted: a KV cache was passed or asked for"
        assert out.past_key_values.get_seq_length() == P + ids.shape[1]
        patched(input_ids=ids, attention_mask=mask)
        assert last_prompt_path(patched) == HOISTED


def test_patch_model_flag_disable_adapter_and_unpatch():
    patched, oracle = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    before = patched.get_base_model().config._attn_implementation
    fpp.patch_model(patched, hoist_prompts=False)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    with torch.no_grad():
        patched(input_ids=ids, attention_mask=mask)
    assert last_prompt_path(patched) == "unhoisted: hoisting turned off"
    with torch.no_grad(), patched.disable_adapter():
        plain = patched(input_ids=ids, attention_mask=mask).logits
    assert plain.shape[1] == ids.shape[1]  # no virtual tokens with the adapter disabled
    fpp.unpatch_model(patched)
    assert not _installed(patched) and "forward" not in patched.__dict__ and "generate" not in patched.__dict__
    assert patched.get_base_model().config._attn_implementation == before
    with torch.no_grad():
        assert_rel_close(patched(input_ids=ids, attention_mask=mask).logits,
                         oracle(input_ids=ids, attention_mask=mask).logits, 1e-6, what="after unpatch")


@pytest.mark.parametrize("kind,family,hoisted", [
    ("prompt", "llama", True), ("mpt", "qwen2", True), ("prompt", "bert", False), ("pool", "llama", False),
    ("selector", "llama", False)])
def test_attached_prompt_paths(kind, family, hoisted):
    model = tiny_model(family) if family != "bert" else tiny_model("bert", task="FEATURE_EXTRACTION")
    twin = copy.deepcopy(model)
    prompt = {"prompt": lambda: fp.PromptTuning(model, num_virtual_tokens=3, init="vocab"),
              "mpt": lambda: fp.MultiTaskPrompt(model, num_tasks=3, variant="mpt", length=3),
              "pool": lambda: fp.PromptPool(model, pool_size=4, length=2, top_k=2),
              "selector": lambda: fp.MultiTaskPrompt(model, num_tasks=3, pool_size=4, length=3)}[kind]()
    attach(model, prompt)
    ids, mask = make_inputs(batch=3, seq=5, padding="right")
    extra = {"task_ids": torch.tensor([0, 2, 0])} if prompt.needs_task_ids else {}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **extra)
    if hoisted:
        assert last_prompt_path(model) == HOISTED
        assert model.config._attn_implementation == "fastprompt"
    else:
        assert last_prompt_path(model) is None  # the attach path as before: no fastprompt attention, no hoisting
        assert model.config._attn_implementation == twin.config._attn_implementation


def test_family_not_validated_for_hoisting_keeps_the_unhoisted_path():
    """OPT's positions follow the attention mask: not a family hoisting was checked on, so nothing is installed."""
    from family_helpers import family_peft_pair

    patched, oracle = family_peft_pair("opt", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    assert not _installed(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    assert_step_parity(patched, oracle, "CAUSAL_LM", ids, mask, what="opt")
    assert last_prompt_path(patched) is None
