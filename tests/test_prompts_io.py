"""save_pretrained / load_prompt: exact round trip for every method, JSON configs, clear errors on mismatch."""

import json
import os

import pytest
import torch

import fastprompt as fp
from fastprompt.integrations.prompt_attach import attach, detach
from fastprompt.prompts import PromptPoolConfig
from fastprompt.prompts.io import load_prompt

from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from prompts_helpers import make_inputs, tiny_config, tiny_model

MAKERS = {
    "PromptTuning": lambda m: fp.PromptTuning(m, num_virtual_tokens=3, init="vocab"),
    "PTuning": lambda m: fp.PTuning(m, num_virtual_tokens=2, encoder="lstm", encoder_hidden_size=8),
    "PrefixTuning": lambda m: fp.PrefixTuning(m, num_virtual_tokens=2, encoder_hidden_size=8, layers=[1]),
    "PTuningV2": lambda m: fp.PTuningV2(m, num_virtual_tokens=3, prefix_dropout=0.0),
    "PromptPool": lambda m: fp.PromptPool(m, pool_size=4, length=2, top_k=None, soft_weighting="cosine",
                                          placement="prefix", layers=[0]),
    "MultiTaskPrompt": lambda m: fp.MultiTaskPrompt(m, num_tasks=2, pool_size=3, length=2),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_round_trip_is_exact(name, tmp_path):
    model = tiny_model("llama")
    prompt = MAKERS[name](model)
    with torch.no_grad():
        for p in prompt.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    prompt.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["fastprompt_config.json", "fastprompt_prompt.safetensors"]
    saved = json.loads((tmp_path / "fastprompt_config.json").read_text())
    assert saved["prompt_type"] == name and saved["hidden_size"] == 32
    loaded = load_prompt(str(tmp_path), model)
    assert type(loaded) is type(prompt) and loaded.config == prompt.config
    assert loaded.state_dict().keys() == prompt.state_dict().keys()
    for k, v in prompt.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert type(prompt).from_pretrained(str(tmp_path)).config == prompt.config

    ids, mask = make_inputs(batch=2, seq=4)
    kw = {"task_ids": torch.tensor([1, 0])} if prompt.needs_task_ids else {}
    attach(model, prompt.eval())
    a = model(ids, attention_mask=mask, **kw).logits
    detach(model)
    attach(model, loaded.eval())
    b = model(ids, attention_mask=mask, **kw).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_json_round_trip():
    cfg = PromptPoolConfig.from_model_config(tiny_config("gpt2"), pool_size=7, top_k=None, placement="prefix",
                                             layers=(1, -2))
    assert cfg.layers == (0, 1) and cfg.model_type == "gpt2" and cfg.hidden_size == 32
    again = PromptPoolConfig.from_json(cfg.to_json())
    assert again == cfg
    with pytest.raises(ValueError, match="config is for 'PromptPool', not 'PTuningV2'"):
        fp.prompts.PTuningV2Config.from_json(cfg.to_json())
    with pytest.raises(ValueError, match="unknown fields"):
        PromptPoolConfig.from_dict({**cfg.to_dict(), "colour": 3})


def test_load_into_another_shape_is_a_clear_error(tmp_path):
    model = tiny_model("llama")
    fp.PTuningV2(model, num_virtual_tokens=2).save_pretrained(str(tmp_path))
    cfg = tiny_config("llama")
    cfg.num_key_value_heads = 4
    import transformers

    other = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="num_kv_heads: prompt 2 vs model 4"):
        load_prompt(str(tmp_path), other)
    with pytest.raises(ValueError, match="built for another model shape"):
        attach(other, load_prompt(str(tmp_path)))


def test_corrupted_or_missing_files(tmp_path):
    model = tiny_model("llama")
    fp.PromptTuning(model, num_virtual_tokens=2).save_pretrained(str(tmp_path))
    path = tmp_path / "fastprompt_config.json"
    data = json.loads(path.read_text())
    data["num_virtual_tokens"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"shape mismatches \['embedding: saved \(2, 32\) vs config \(5, 32\)'\]"):
        load_prompt(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_prompt(str(tmp_path / "nothing"))
    data["prompt_type"] = "Nope"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown prompt type 'Nope'"):
        load_prompt(str(tmp_path))
