"""Generation with a patched PEFT SEQ_2_SEQ_LM prefix-tuning model (T5, BART).

Oracle: a no-cache greedy loop over the UNPATCHED PEFT model's full forward (argmax step by step with the decoder
input growing). PEFT's own generate() is not an oracle here. Beam search is checked against the patched model
without a cache (every step recomputes the whole decoder input; the prefix is read by the attention either way).
"""
import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from seq2seq_helpers import requires_seq2seq_transformers, peft_seq2seq_pair, seq2seq_inputs

pytestmark = requires_seq2seq_transformers

import fastprompt

peft = pytest.importorskip("peft")

NEW_TOKENS = 6


def _pair(family, num_virtual_tokens=3):
    cfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=num_virtual_tokens)
    patched, oracle = peft_seq2seq_pair(family, cfg)
    for model in (patched, oracle):
        model.get_base_model().generation_config.eos_token_id = None  # fixed length: no early stop to compare
    fastprompt.patch_model(patched)
    return patched, oracle


def _greedy_no_cache(model, ids, mask, steps):
    start = model.get_base_model().config.decoder_start_token_id
    decoder = torch.full((ids.shape[0], 1), start, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, use_cache=False).logits
            decoder = torch.cat([decoder, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decoder


@pytest.mark.parametrize("family,num_virtual_tokens", [("t5", 3), ("t5v11", 11), ("bart", 3)])
def test_greedy_generate_equals_no_cache_loop_over_unpatched_forward(family, num_virtual_tokens):
    patched, oracle = _pair(family, num_virtual_tokens)
    ids, mask, _, _ = seq2seq_inputs(family)
    expected = _greedy_no_cache(oracle, ids, mask, NEW_TOKENS)
    encoder_calls = []
    handle = patched.get_base_model().get_encoder().register_forward_hook(lambda *a: encoder_calls.append(1))
    try:
        with torch.no_grad():
            out = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   num_beams=1, return_dict_in_generate=True)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, expected)
    assert len(encoder_calls) == 1  # the encoder runs once per generate call
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    # the decoder's self-attention cache holds the real tokens only (PEFT's would hold P more)
    assert cache.self_attention_cache.get_seq_length() == out.sequences.shape[1] - 1


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_beam_search_with_cache_equals_without(family):
    patched, _ = _pair(family)
    ids, mask, _, _ = seq2seq_inputs(family)
    with torch.no_grad():
        cached = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=3,
                                  do_sample=False, output_scores=True, return_dict_in_generate=True)
        uncached = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=3,
                                    do_sample=False, use_cache=False, output_scores=True,
                                    return_dict_in_generate=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-5, atol=1e-5)


def test_generate_after_unpatch_is_peft_again():
    patched, oracle = _pair("bart")
    fastprompt.unpatch_model(patched)
    ids, mask, _, _ = seq2seq_inputs("bart")
    with torch.no_grad():
        a = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        b = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, b)
