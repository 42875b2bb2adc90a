"""generate() with hoisted prompts: the prompt K/V are computed once, the KV cache holds the real tokens only, and
the tokens equal a no-cache loop over the UNHOISTED model's full forward (unpatched PEFT's forward, right on 5.24;
PEFT's own generate is not the oracle). Beam scores equal their log-probabilities under that forward."""
import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import PAD, make_inputs, tiny_peft_pair

import fastprompt.patching as fpp
from fastprompt.integrations.prompt_hoisting import HOISTED, last_prompt_path

pytest.importorskip("peft")

P = 4
NEW = 5
EOS = 3


def _forward_logits(oracle, tokens, mask, extra):
    """The unhoisted model's full forward, no cache: logits of the real positions."""
    with torch.no_grad():
        return oracle(input_ids=tokens, attention_mask=mask, use_cache=False, **extra).logits[:, P:].float()


def _greedy_oracle(oracle, ids, mask, steps, extra):
    tokens, m = ids, mask
    for _ in range(steps):
        last = _forward_logits(oracle, tokens, m, extra)[:, -1]
        last[:, EOS] = float("-inf")  # min_new_tokens = max_new_tokens: EOS is never chosen
        nxt = last.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        m = torch.cat([m, torch.ones_like(nxt)], 1)
    return tokens


def _sampling_oracle(oracle, ids, mask, steps, extra, seed):
    torch.manual_seed(seed)
    tokens, m = ids, mask
    for _ in range(steps):
        probs = torch.softmax(_forward_logits(oracle, tokens, m, extra)[:, -1], dim=-1)
        nxt = torch.multinomial(probs, num_samples=1)
        tokens = torch.cat([tokens, nxt], 1)
        m = torch.cat([m, torch.ones_like(nxt)], 1)
    return tokens


def _generate(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                          pad_token_id=PAD, return_dict_in_generate=True, **kwargs)


def _task_ids(method, batch=3):
    return {"task_ids": torch.tensor([1, 0, 1][:batch])} if method == "mpt" else {}


@pytest.mark.parametrize("family,method", [("llama", "prompt"), ("qwen3", "ptuning_lstm"), ("gpt2", "mpt"),
                                           ("gemma2", "prompt"), ("mistral", "ptuning_mlp")])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_matches_no_cache_oracle(family, method, cache, monkeypatch):
    from fastprompt.integrations import prompt_hoisting

    passes = []
    real_pass = prompt_hoisting.prompt_kv_pass
    monkeypatch.setattr(prompt_hoisting, "prompt_kv_pass", lambda *a, **k: passes.append(1) or real_pass(*a, **k))
    patched, oracle = tiny_peft_pair(family, method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    extra = _task_ids(method)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    got = _generate(patched, ids, mask, do_sample=False, **extra, **kwargs)
    assert last_prompt_path(patched) == HOISTED
    assert len(passes) == 1  # the prompt K/V computed once
    assert torch.equal(got.sequences, _greedy_oracle(oracle, ids, mask, NEW, extra))
    # the cache holds the real tokens only (PEFT's holds P more per row and per beam)
    assert got.past_key_values.get_seq_length() == ids.shape[1] + NEW - 1


@pytest.mark.parametrize("method,cache", [("prompt", "dynamic"), ("mpt", "dynamic"), ("prompt", "static")])
def test_beam_scores_are_log_probabilities_under_the_unhoisted_forward(method, cache):
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    extra = _task_ids(method)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    got = _generate(patched, ids, mask, num_beams=3, num_return_sequences=2, length_penalty=0.0, do_sample=False,
                    output_scores=True, **extra, **kwargs)
    assert last_prompt_path(patched) == HOISTED
    seqs = got.sequences
    rows_extra = {k: v.repeat_interleave(2) for k, v in extra.items()}
    full_mask = torch.cat([mask.repeat_interleave(2, 0), torch.ones(seqs.shape[0], NEW, dtype=mask.dtype)], 1)
    logp = torch.log_softmax(_forward_logits(oracle, seqs, full_mask, rows_extra), dim=-1)
    S = ids.shape[1]
    picked = logp[:, S - 1:-1].gather(-1, seqs[:, S:, None])[..., 0].sum(-1)
    torch.testing.assert_close(got.sequences_scores, picked, rtol=1e-5, atol=1e-5)
    # each row's returned beams come best first
    assert (got.sequences_scores.view(3, 2)[:, 0] >= got.sequences_scores.view(3, 2)[:, 1] - 1e-6).all()


@pytest.mark.parametrize("method", ["prompt", "mpt"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sampling_with_a_seed_matches_the_oracle_sampler(method, cache):
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="right")
    extra = _task_ids(method)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    torch.manual_seed(123)
    got = _generate(patched, ids, mask, do_sample=True, top_k=None, top_p=None, temperature=1.0, **extra, **kwargs)
    assert last_prompt_path(patched) == HOISTED
    # the cache holds the real tokens only
    assert got.past_key_values.get_seq_length() == ids.shape[1] + NEW - 1
    # min_new_tokens only masks EOS, which the oracle sampler may draw: compare where it did not
    want = _sampling_oracle(oracle, ids, mask, NEW, extra, seed=123)
    first_eos = (want[:, 6:] == EOS).int().cumsum(1) == 0
    assert torch.equal(got.sequences[:, 6:][first_eos], want[:, 6:][first_eos])


def test_generation_leaves_the_model_as_it_was():
    patched, oracle = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=2, seq=5, padding="left")
    _generate(patched, ids, mask, do_sample=False)
    hf = patched.get_base_model()
    assert "prepare_inputs_for_generation" not in hf.__dict__
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask).logits,
                                   oracle(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
