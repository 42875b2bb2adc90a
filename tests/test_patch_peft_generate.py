"""generate() on a patched prefix-tuned causal LM: same tokens as unpatched PEFT; the KV cache holds real tokens."""
import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import PAD, make_inputs, tiny_peft_pair

import fastprompt.patching as fpp

pytest.importorskip("peft")

P = 4


def _generate(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD,
                          return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_unpatched(family, num_beams):
    patched, oracle = tiny_peft_pair(family, "prefix", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    got = _generate(patched, ids, mask, num_beams=num_beams)
    expected = _generate(oracle, ids, mask, num_beams=num_beams)
    assert torch.equal(got.sequences, expected.sequences)
    # the cache holds the real tokens only (the prefix is read from its one copy every step)
    new_tokens = got.sequences.shape[1] - ids.shape[1]
    assert got.past_key_values.get_seq_length() == ids.shape[1] + new_tokens - 1
    assert expected.past_key_values.get_seq_length() == P + ids.shape[1] + new_tokens - 1


def test_generate_static_cache():
    patched, oracle = tiny_peft_pair("llama", "prefix", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    got = _generate(patched, ids, mask, cache_implementation="static")
    expected = _generate(oracle, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    from transformers import StaticCache

    assert isinstance(got.past_key_values, StaticCache)
    assert got.past_key_values.get_seq_length() == got.sequences.shape[1] - 1


def test_generate_prefix_projection_and_scores():
    patched, oracle = tiny_peft_pair("mistral", "prefix_proj", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    got = _generate(patched, ids, mask, output_scores=True)
    expected = _generate(oracle, ids, mask, output_scores=True)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "ptuning_lstm", "mpt"])
def test_generate_input_level_methods(method):
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    kwargs = {"task_ids": torch.tensor([1, 0, 2])} if method == "mpt" else {}
    assert torch.equal(_generate(patched, ids, mask, **kwargs).sequences,
                       _generate(oracle, ids, mask, **kwargs).sequences)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_past_the_window_keeps_prefix_visible(family, monkeypatch):
    """Past the sliding window PEFT's prefix (cache entries 0..P-1) slides out of view; fastprompt's prefix stays
    visible to every query (DESIGN.md §1). Checked for self-consistency: generate() with a dynamic cache, with a
    static cache, and one teacher-forced forward over the generated text all agree."""
    import integration_helpers

    small_window = integration_helpers.tiny_config

    def config_with_window(name):
        cfg = small_window(name)
        cfg.sliding_window = 8
        return cfg

    monkeypatch.setattr(integration_helpers, "tiny_config", config_with_window)
    patched, _ = tiny_peft_pair(family, "prefix", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    dynamic = _generate(patched, ids, mask).sequences
    static = _generate(patched, ids, mask, cache_implementation="static").sequences
    assert torch.equal(dynamic, static)
    full_mask = torch.cat([mask, torch.ones(3, dynamic.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = patched(input_ids=dynamic, attention_mask=full_mask, position_ids=positions).logits
    assert torch.equal(logits[:, ids.shape[1] - 1:-1].argmax(-1), dynamic[:, ids.shape[1]:])


def test_manual_decoding_with_the_returned_cache():
    """The cache a patched forward returns holds real tokens only; feeding it back decodes like one full forward.
    (Unpatched PEFT replaces any user cache by a fresh prefix cache, so it has no such loop to compare with.)"""
    patched, _ = tiny_peft_pair("llama", "prefix_proj", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="none")
    with torch.no_grad():
        full = patched(input_ids=ids, attention_mask=mask).logits
        first = patched(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        assert first.past_key_values.get_seq_length() == 4
        rest = patched(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=first.past_key_values).logits
    torch.testing.assert_close(rest, full[:, 4:], rtol=1e-5, atol=1e-5)


def test_generate_without_cache():
    """use_cache=False recomputes the whole sequence each step: same tokens as the cached run and as unpatched PEFT
    with its cache (unpatched PEFT itself fails here on Llama: its prefix cache no longer matches the mask)."""
    patched, oracle = tiny_peft_pair("llama", "prefix", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    uncached = _generate(patched, ids, mask, use_cache=False).sequences
    assert torch.equal(uncached, _generate(patched, ids, mask).sequences)
    assert torch.equal(uncached, _generate(oracle, ids, mask).sequences)
