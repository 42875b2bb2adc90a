"""generate() on patched PEFT prompt-learning causal LMs.

The truth is the unpatched PEFT model's full forward, run without a cache: greedy tokens must equal a step-by-step
argmax over it, beam scores must equal the log-probabilities it gives the returned sequences, and per-step logits
must equal its teacher-forced logits. PEFT's forward is right on every transformers release tested; PEFT's own
generate() is not on transformers >= 5.24 (it looks for `past_key_values`, now `cache`), so the direct comparison
with PEFT's generate() runs only where it is right.
"""
import warnings

import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import (
    PAD,
    assert_beam_scores_match,
    assert_greedy_matches,
    greedy_no_cache,
    make_inputs,
    peft_generate_is_right,
    peft_versions,
    tiny_peft_pair,
)

import fastprompt.patching as fpp
from fastprompt.integrations.cache_compat import cache_kwarg, output_cache

pytest.importorskip("peft")

P = 4
EOS = 3
NEW = 6
INPUT_LEVEL = ["prompt", "ptuning_mlp", "ptuning_lstm", "mpt"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about position ids it ignores; transformers about renames
        yield


def _generate(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
                          return_dict_in_generate=True, **kwargs)


def _oracle_greedy(oracle, method, ids, mask, **extra):
    # prefix tuning: generate()'s padding-aware positions (PEFT adds P); input-level methods ignore position ids
    return greedy_no_cache(oracle, ids, mask, NEW, eos=EOS, positions=method.startswith("prefix"), **extra)


def _task_ids(method, batch=3):
    return {"task_ids": torch.tensor([1, 0, 2][:batch])} if method == "mpt" else {}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_prefix_generate_matches_no_cache_oracle(family):
    patched, oracle = tiny_peft_pair(family, "prefix", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    got = _generate(patched, ids, mask)
    assert_greedy_matches(got.sequences, _oracle_greedy(oracle, "prefix", ids, mask), f"{family}/prefix")
    # the cache holds the real tokens only (the prefix is read from its one copy every step)
    assert output_cache(got).get_seq_length() == got.sequences.shape[1] - 1


@pytest.mark.parametrize("method,family", [("prefix", "llama"), ("prefix", "gemma2"), ("prefix_proj", "qwen3"),
                                           ("prompt", "llama"), ("ptuning_lstm", "gpt2"), ("mpt", "qwen3")])
def test_beam_scores_are_the_no_cache_log_probabilities(method, family):
    patched, oracle = tiny_peft_pair(family, method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    extra = _task_ids(method)
    got = _generate(patched, ids, mask, num_beams=3, num_return_sequences=2, length_penalty=0.0, output_scores=True,
                    **extra)
    assert_beam_scores_match(got, oracle, ids, mask, eos=EOS, positions=method.startswith("prefix"), **extra)


@pytest.mark.parametrize("hoist", [True, False])
@pytest.mark.parametrize("method", INPUT_LEVEL)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_input_level_generate_matches_no_cache_oracle(family, method, hoist):
    """Patched prompt tuning / P-tuning / MPT, hoisted (the prompt K/V computed once, a prefix of the attention) and
    not (the prompt enters the cache at prefill only): the tokens of PEFT's full forward."""
    from fastprompt.integrations.prompt_hoisting import HOISTED, last_prompt_path, set_prompt_hoisting

    patched, oracle = tiny_peft_pair(family, method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    set_prompt_hoisting(patched, hoist)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    extra = _task_ids(method)
    got = _generate(patched, ids, mask, **extra)
    assert_greedy_matches(got.sequences, _oracle_greedy(oracle, method, ids, mask, **extra), f"{family}/{method}")
    assert (last_prompt_path(patched) == HOISTED) == hoist
    # hoisted: the cache holds the real tokens only; unhoisted: the prompt once, then the real tokens
    assert output_cache(got).get_seq_length() == (0 if hoist else P) + got.sequences.shape[1] - 1


def test_mpt_generate_one_task_id_for_the_batch():
    patched, oracle = tiny_peft_pair("llama", "mpt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    got = _generate(patched, ids, mask, task_ids=torch.tensor([2])).sequences
    want = _oracle_greedy(oracle, "mpt", ids, mask, task_ids=torch.tensor([2]))
    assert_greedy_matches(got, want, "mpt/one task id")
    assert torch.equal(want, _oracle_greedy(oracle, "mpt", ids, mask, task_ids=torch.tensor([2, 2, 2])))


def test_generate_static_cache():
    patched, oracle = tiny_peft_pair("llama", "prefix", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    got = _generate(patched, ids, mask, cache_implementation="static")
    assert_greedy_matches(got.sequences, _oracle_greedy(oracle, "prefix", ids, mask), "static cache")
    from transformers import StaticCache

    assert isinstance(output_cache(got), StaticCache)
    assert output_cache(got).get_seq_length() == got.sequences.shape[1] - 1


def test_generate_prefix_projection_logits_are_teacher_forced_logits():
    """Every step's logits equal the unpatched model's logits for the final sequence, run once without a cache."""
    patched, oracle = tiny_peft_pair("mistral", "prefix_proj", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    got = _generate(patched, ids, mask, output_logits=True)
    seq = got.sequences
    full_mask = torch.cat([mask, torch.ones(3, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    with torch.no_grad():
        want = oracle(input_ids=seq, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    for step, logits in enumerate(got.logits):
        torch.testing.assert_close(logits, want[:, ids.shape[1] - 1 + step], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_past_the_window_keeps_prefix_visible(family, monkeypatch):
    """Past the sliding window PEFT's prefix (cache entries 0..P-1) slides out of view; fastprompt's prefix stays
    visible to every query (DESIGN.md §1). Checked for self-consistency: generate() with a dynamic cache, with a
    static cache, and one teacher-forced forward over the generated text all agree."""
    import integration_helpers

    integration_helpers.override_tiny_config(monkeypatch, sliding_window=8)
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


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_manual_decoding_with_the_returned_cache(name):
    """The cache a patched forward returns holds real tokens only; feeding it back (under either name the installed
    transformers accepts) decodes like one full forward. (Unpatched PEFT replaces any user cache by a fresh prefix
    cache, so it has no such loop to compare with.)"""
    patched, _ = tiny_peft_pair("llama", "prefix_proj", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    if name == "cache" and cache_kwarg(patched.get_base_model().forward) != "cache":
        pytest.skip("this transformers release has no `cache` argument (added in 5.24)")
    ids, mask = make_inputs(batch=3, seq=6, padding="none")
    with torch.no_grad():
        full = patched(input_ids=ids, attention_mask=mask).logits
        first = patched(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        assert output_cache(first).get_seq_length() == 4
        rest = patched(input_ids=ids[:, 4:], attention_mask=mask, **{name: output_cache(first)}).logits
    torch.testing.assert_close(rest, full[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_without_cache(method):
    """use_cache=False recomputes the whole sequence each step: same tokens as the cached run and the oracle."""
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    uncached = _generate(patched, ids, mask, use_cache=False).sequences
    assert torch.equal(uncached, _generate(patched, ids, mask).sequences)
    assert_greedy_matches(uncached, _oracle_greedy(oracle, method, ids, mask), f"{method}/use_cache=False")


# ----------------------------------------------------------------------------------------------------------------
# Direct comparison with PEFT's own generate(), only where it is right


@pytest.mark.skipif(not peft_generate_is_right(),
                    reason=f"PEFT's prompt-learning generate() is broken with {peft_versions()}: it looks for "
                           "`past_key_values`, which transformers >= 5.24 passes as `cache` (the no-cache oracle "
                           "tests above cover this case)")
@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning_lstm", "mpt"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_peft_generate(method, num_beams):
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    extra = _task_ids(method)
    got = _generate(patched, ids, mask, num_beams=num_beams, **extra).sequences
    assert torch.equal(got, _generate(oracle, ids, mask, num_beams=num_beams, **extra).sequences)


@pytest.mark.parametrize("method", ["prompt", "mpt"])
def test_input_level_generate_static_cache(method):
    """generate(cache_implementation="static") sizes the cache for the real tokens; the patched model makes room
    for the P virtual tokens the cache also holds (without it: IndexError, the cache overflows)."""
    from fastprompt.integrations.prompt_hoisting import set_prompt_hoisting

    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    set_prompt_hoisting(patched, False)  # the unhoisted path: the cache holds the prompt too
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    extra = _task_ids(method)
    got = _generate(patched, ids, mask, cache_implementation="static", **extra)
    assert_greedy_matches(got.sequences, _oracle_greedy(oracle, method, ids, mask, **extra), f"{method}/static")


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp", "mpt"])
def test_input_level_unhoisted_static_cache_unpadded(method):
    """Unhoisted, static cache, no padding: generate() drops the all-ones mask, so the decode steps' key padding is
    read back from the mask the base model built over the cache's keys, which already cover the P prompt slots
    (without trimming them the real keys shift by P: logits off by 1e-2 from the second token on). Every step's
    logits equal the unpatched model's teacher-forced logits over the generated text."""
    from fastprompt.integrations.prompt_hoisting import set_prompt_hoisting

    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    set_prompt_hoisting(patched, False)
    ids, mask = make_inputs(batch=2, seq=5, padding="none")
    extra = _task_ids(method, batch=2)
    got = _generate(patched, ids, mask, cache_implementation="static", output_logits=True, eos_token_id=None,
                    **extra)
    seq = got.sequences
    with torch.no_grad():
        want = oracle(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False, **extra).logits
    for step, logits in enumerate(got.logits):
        reference = want[:, P + ids.shape[1] - 1 + step]
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()),
                                   msg=lambda m, step=step: f"{method}: logits of new token {step}: {m}")
