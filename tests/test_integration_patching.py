"""fastprompt.patch_model / unpatch_model dispatch: PeftModel → the PEFT path; (model, prompt) → prompt_attach."""
import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import make_inputs, tiny_model

import fastprompt as fp
from fastprompt.integrations.transformers_attention import ATTENTION_NAME


def test_patch_with_fastprompt_prompt_round_trip():
    model = tiny_model("llama", "CAUSAL_LM")
    ids, mask = make_inputs(padding="left")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    prompt = fp.PrefixTuning(model, num_virtual_tokens=3, encoder_hidden_size=16)
    assert fp.patch_model(model, prompt, backend="torch") is model
    assert model.config._attn_implementation == ATTENTION_NAME
    with torch.no_grad():
        during = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(during, before)
    assert fp.unpatch_model(model) is model
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_patch_rejects_peft_model_with_prompt():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=2))
    with pytest.raises(TypeError):
        fp.patch_model(model, fp.PrefixTuning(model.get_base_model(), num_virtual_tokens=2))
