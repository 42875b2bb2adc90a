"""fastprompt.patch_model on PEFT prompt-learning models = the unpatched PEFT model (outputs, loss, gradients).

Where PEFT refuses to run prefix tuning (sequence classification / encoders on transformers >= 5.24: it looks for
a `past_key_values` parameter, now `cache`), the oracle is PEFT's semantics written out by hand
(integration_helpers.HandWrittenPeftPrefix), itself checked against PEFT where PEFT runs.
"""
import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import (
    FAMILY_TASKS,
    HandWrittenPeftPrefix,
    assert_step_parity,
    make_inputs,
    peft_or_hand_written_prefix,
    tiny_peft_pair,
)

import fastprompt.patching as fpp

pytest.importorskip("peft")


@pytest.mark.parametrize("padding", ["left", "right", "hole"])
@pytest.mark.parametrize("family,task", FAMILY_TASKS)
def test_prefix_tuning_parity(family, task, padding):
    patched, oracle = tiny_peft_pair(family, "prefix", task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding=padding)
    oracle = peft_or_hand_written_prefix(oracle, ids, mask)
    assert_step_parity(patched, oracle, task, ids, mask, what=f"{family}/{task}/prefix/{padding}")


@pytest.mark.parametrize("family,task", FAMILY_TASKS)
def test_prefix_projection_parity(family, task):
    patched, oracle = tiny_peft_pair(family, "prefix_proj", task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="hole")
    oracle = peft_or_hand_written_prefix(oracle, ids, mask)
    assert_step_parity(patched, oracle, task, ids, mask, what=f"{family}/{task}/prefix_proj")


POSITION_CASES = [("llama", "CAUSAL_LM"), ("mistral", "SEQ_CLS"), ("qwen3", "CAUSAL_LM"), ("gemma2", "CAUSAL_LM"),
                  ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("roberta", "FEATURE_EXTRACTION")]


@pytest.mark.parametrize("family,task", POSITION_CASES)
def test_prefix_tuning_parity_user_position_ids(family, task):
    patched, oracle = tiny_peft_pair(family, "prefix", task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # padding-aware, as generate() builds them
    oracle = peft_or_hand_written_prefix(oracle, ids, mask)
    assert_step_parity(patched, oracle, task, ids, mask, what=f"{family}/{task}/position_ids",
                       position_ids=position_ids)


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("gpt2", "FEATURE_EXTRACTION")])
def test_prefix_tuning_parity_without_attention_mask(family, task):
    patched, oracle = tiny_peft_pair(family, "prefix", task)
    fpp.patch_model(patched)
    ids, _ = make_inputs(padding="none")
    oracle = peft_or_hand_written_prefix(oracle, ids, None)
    assert_step_parity(patched, oracle, task, ids, None, what=f"{family}/{task}/no mask")


INPUT_LEVEL_CASES = [("llama", "CAUSAL_LM"), ("gemma2", "SEQ_CLS"), ("qwen2", "FEATURE_EXTRACTION"),
                     ("gpt2", "CAUSAL_LM"), ("bert", "SEQ_CLS"), ("roberta", "FEATURE_EXTRACTION")]


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp", "ptuning_lstm", "mpt"])
@pytest.mark.parametrize("family,task", INPUT_LEVEL_CASES)
def test_input_level_parity(family, task, method):
    if method == "mpt" and task == "FEATURE_EXTRACTION":
        pytest.skip("PEFT's feature-extraction forward never passes task_ids, so MPT cannot run there")
    patched, oracle = tiny_peft_pair(family, method, task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="hole" if task != "SEQ_CLS" else "left")
    kwargs = {"task_ids": torch.tensor([2, 0, 1])} if method == "mpt" else {}
    assert_step_parity(patched, oracle, task, ids, mask, what=f"{family}/{task}/{method}", **kwargs)


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("gpt2", "SEQ_CLS"), ("roberta", "FEATURE_EXTRACTION")])
def test_prefix_tuning_parity_inputs_embeds(family, task):
    patched, oracle = tiny_peft_pair(family, "prefix", task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="right")
    embeds = patched.get_base_model().get_input_embeddings()(ids).detach()
    labels = {"CAUSAL_LM": ids.masked_fill(mask == 0, -100), "SEQ_CLS": torch.tensor([0, 1, 2])}.get(task)
    oracle = peft_or_hand_written_prefix(oracle, ids, mask)
    kwargs = {} if labels is None else {"labels": labels}
    out_p = patched(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    try:
        out_o = oracle(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    except ValueError as err:  # peft 0.20 drops inputs_embeds in its SEQ_CLS / FEATURE_EXTRACTION prefix forward
        if "inputs_embeds" not in str(err):
            raise
        out_o = HandWrittenPeftPrefix(oracle)(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    main = "last_hidden_state" if task == "FEATURE_EXTRACTION" else "logits"
    torch.testing.assert_close(getattr(out_p, main), getattr(out_o, main), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_prefix_tuning_bfloat16(family):
    """A bf16 base model: PEFT casts the prefix to the model dtype; so does the patched path."""
    task = "CAUSAL_LM" if family == "llama" else "SEQ_CLS"
    patched, oracle = tiny_peft_pair(family, "prefix_proj", task)
    patched.get_base_model().to(torch.bfloat16)
    oracle.get_base_model().to(torch.bfloat16)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="left")
    oracle = peft_or_hand_written_prefix(oracle, ids, mask)
    with torch.no_grad():
        got = patched(input_ids=ids, attention_mask=mask).logits
        expected = oracle(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("gemma2", "CAUSAL_LM"), ("gpt2", "FEATURE_EXTRACTION"),
                                         ("bert", "FEATURE_EXTRACTION"), ("roberta", "FEATURE_EXTRACTION")])
def test_hand_written_prefix_semantics_equal_peft_where_peft_runs(family, task):
    """The hand-written oracle is PEFT: same outputs, loss and gradients wherever PEFT runs prefix tuning."""
    model, twin = tiny_peft_pair(family, "prefix", task)
    ids, mask = make_inputs(padding="left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    assert_step_parity(HandWrittenPeftPrefix(model), twin, task, ids, mask, what=f"{family}/{task}/hand-written",
                       position_ids=position_ids)


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("bert", "SEQ_CLS")])
def test_mpt_one_task_id_for_the_whole_batch(family, task):
    """PEFT broadcasts a single task id over the batch (its own MPT tests pass task_ids=[0] with batch 2)."""
    patched, oracle = tiny_peft_pair(family, "mpt", task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=2, padding="left")
    assert_step_parity(patched, oracle, task, ids, mask, what=f"{family}/mpt/one task id", task_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="task_ids"):
        patched(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 2]))
