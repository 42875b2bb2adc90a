"""generate() called every way transformers accepts gives the tokens of a no-cache greedy loop over the UNPATCHED
model (issue 19, defects 3 and 9: generate's arguments resolved the way transformers resolves them).

The spellings: the input positional, as `input_ids=`, as `inputs=`; the length as `max_new_tokens=`, in a passed
GenerationConfig (`max_length`, `max_new_tokens`, both: `max_new_tokens` wins), in a GenerationConfig passed
positionally, in the model's default generation config (its `max_new_tokens` wins over a `max_length=` keyword);
the cache dynamic or static, the static one asked for by keyword, in the passed config or in the model's default.
The oracle is `integration_helpers.greedy_no_cache`: step by step argmax over the unpatched PeftModel's full forward
of [prompt; tokens], no cache, no generate(). Each spelling's number of new tokens is written out here, from
transformers' documented rule, not computed by the code under test.
"""
import copy
import warnings

import pytest
import torch
from transformers import GenerationConfig

import fastprompt.patching as fpp
from fastprompt.integrations.prompt_hoisting import HOISTED, last_prompt_path, set_prompt_hoisting

import integration_helpers
from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import PAD, greedy_no_cache, make_inputs, tiny_peft_pair

pytest.importorskip("peft")

P = 4
S = 6
EOS = 3


def _spelling(name, ids, mask, static):
    """(args, kwargs, changes to the model's default generation config, new tokens transformers generates)."""
    cache = {"cache_implementation": "static"} if static else {}
    if name == "positional":
        return (ids,), dict(attention_mask=mask, max_new_tokens=4, **cache), {}, 4
    if name == "input_ids":
        return (), dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, **cache), {}, 4
    if name == "inputs":
        return (), dict(inputs=ids, attention_mask=mask, max_new_tokens=4, **cache), {}, 4
    if name == "config_max_new_tokens":
        return (ids,), dict(attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=3, **cache)), {}, 3
    if name == "config_max_length":
        return (), dict(inputs=ids, attention_mask=mask,
                        generation_config=GenerationConfig(max_length=S + 2, **cache)), {}, 2
    if name == "config_both":  # max_new_tokens takes precedence over max_length
        return (), dict(input_ids=ids, attention_mask=mask,
                        generation_config=GenerationConfig(max_length=S + 1, max_new_tokens=4, **cache)), {}, 4
    if name == "config_positional":
        return (ids, GenerationConfig(max_new_tokens=3, **cache)), dict(attention_mask=mask), {}, 3
    if name == "model_default":  # the model's default max_new_tokens wins over a max_length keyword
        return (), dict(inputs=ids, attention_mask=mask, max_length=S + 1), dict(max_new_tokens=4, **cache), 4
    raise KeyError(name)


SPELLINGS = ["positional", "input_ids", "inputs", "config_max_new_tokens", "config_max_length", "config_both",
             "config_positional", "model_default"]


def _task_ids(method):
    return {"task_ids": torch.tensor([1, 0, 1])} if method == "mpt" else {}


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("hoisting", [True, False])
@pytest.mark.parametrize("method", ["prompt", "mpt"])
def test_peft_input_prompt_every_spelling_matches_no_cache_greedy(method, hoisting, cache, spelling):
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    set_prompt_hoisting(patched, hoisting)
    ids, mask = make_inputs(batch=3, seq=S, padding="left")
    extra = _task_ids(method)
    args, kwargs, defaults, new = _spelling(spelling, ids, mask, cache == "static")
    for key, value in defaults.items():
        setattr(patched.generation_config, key, value)
    out = patched.generate(*args, **kwargs, **extra)
    assert last_prompt_path(patched) == (HOISTED if hoisting else "unhoisted: hoisting turned off")
    want = greedy_no_cache(oracle, ids, mask, new, pad=PAD, eos=EOS, positions=False, **extra)
    assert torch.equal(out, want), f"{spelling}: {out} != oracle {want}"


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_peft_prefix_tuning_every_spelling_matches_no_cache_greedy(cache, spelling):
    # the prefix is read by the attention, never cached: generate()'s own cache sizing is right as it is
    patched, oracle = tiny_peft_pair("llama", "prefix", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=S, padding="left")
    args, kwargs, defaults, new = _spelling(spelling, ids, mask, cache == "static")
    for key, value in defaults.items():
        setattr(patched.generation_config, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it shifts the position ids
        out = patched.generate(*args, **kwargs)
        # PEFT's prefix positions: generate()'s padding-aware ones, shifted by P inside PEFT's forward
        want = greedy_no_cache(oracle, ids, mask, new, pad=PAD, eos=EOS, positions=True)
    assert torch.equal(out, want), f"{spelling}: {out} != oracle {want}"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("method", ["prompt", "mpt"])
def test_peft_generate_without_input_starts_from_bos_as_transformers_does(method, cache):
    # no input at all: transformers starts from the BOS token, one row per row of the other tensors (MPT: task_ids)
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    extra = {"task_ids": torch.tensor([1, 0, 2])} if method == "mpt" else {}
    out = patched.generate(max_new_tokens=3, cache_implementation="static" if cache == "static" else None, **extra)
    assert last_prompt_path(patched) == HOISTED
    bos = torch.full((3 if extra else 1, 1), patched.generation_config.bos_token_id)
    want = greedy_no_cache(oracle, bos, torch.ones_like(bos), 3, pad=PAD, eos=EOS, positions=False, **extra)
    assert torch.equal(out, want)


def test_peft_inputs_embeds_is_refused_as_unpatched_peft_refuses_it():
    # PEFT's generate() swaps in its own prepare step, which takes no inputs_embeds: transformers refuses the call
    patched, oracle = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=S, padding="left")
    embeds = oracle.get_base_model().get_input_embeddings()(ids).detach()
    with pytest.raises(ValueError) as unpatched:
        oracle.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError) as got:
        patched.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=2)
    assert str(got.value) == str(unpatched.value)
    assert last_prompt_path(patched) == "unhoisted: generate() from inputs_embeds"


def test_inputs_twice_is_refused_as_transformers_refuses_it():
    patched, _ = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=S, padding="left")
    with pytest.raises(ValueError, match="inputs"):
        patched.generate(ids, input_ids=ids, attention_mask=mask, max_new_tokens=2)


# ----------------------------------------------------------------------------------------------------------------
# defect 9: a sliding window must hold the whole generation, whose length is transformers' max_new_tokens first

WINDOW = 12  # P + S = 10 fits; P + S + 2 new = 12 fits; P + S + 10 new does not


@pytest.mark.parametrize("where", ["model_default", "passed_config", "passed_config_and_model_default", "fits"])
def test_sliding_window_length_read_as_transformers_reads_it(where, monkeypatch):
    integration_helpers.override_tiny_config(monkeypatch, sliding_window=WINDOW)
    patched, oracle = tiny_peft_pair("gemma2", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fpp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=S, padding="left")
    kwargs, new = dict(attention_mask=mask), 10
    if where == "model_default":  # the model's max_new_tokens beats the max_length keyword
        patched.generation_config.max_new_tokens = 10
        kwargs["max_length"] = S + 2
    elif where == "passed_config":
        kwargs["generation_config"] = GenerationConfig(max_length=S + 2, max_new_tokens=10)
    elif where == "passed_config_and_model_default":  # the passed config's unset max_new_tokens is the model's
        patched.generation_config.max_new_tokens = 10
        kwargs["generation_config"] = GenerationConfig(max_length=S + 2)
    else:
        kwargs["max_new_tokens"] = new = 2
    out = patched.generate(ids, **kwargs)
    if where == "fits":
        assert last_prompt_path(patched) == HOISTED
    else:
        assert last_prompt_path(patched) == f"unhoisted: sliding window {WINDOW} shorter than P + length = " \
                                            f"{P + S + new}"
    want = greedy_no_cache(oracle, ids, mask, new, pad=PAD, eos=EOS, positions=False)
    assert torch.equal(out, want), f"{where}: {out} != oracle {want}"


# ----------------------------------------------------------------------------------------------------------------
# fastprompt's own input-level prompts attached to a causal LM (hoisted per forward call; generate() is the model's)

ATTACHED_SPELLINGS = SPELLINGS + ["inputs_embeds"]


@pytest.mark.parametrize("spelling", ATTACHED_SPELLINGS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("hoisting", [True, False])
@pytest.mark.parametrize("kind", ["prompt", "mpt"])
def test_attached_prompt_every_spelling_matches_no_cache_greedy(kind, hoisting, cache, spelling):
    """Unhoisted, the virtual tokens enter the KV cache at prefill: a static cache needs room for them."""
    from test_hoisting_attach import _prompt, _reference

    from fastprompt.integrations.prompt_attach import attach

    model = integration_helpers.tiny_model("llama")
    twin = copy.deepcopy(model)
    prompt = _prompt(kind, model)
    attach(model, prompt)
    set_prompt_hoisting(model, hoisting)
    model.generation_config.eos_token_id = None  # every row runs all steps
    ids, mask = make_inputs(batch=3, seq=S, padding="left")
    task_ids = torch.tensor([1, 0, 1]) if prompt.needs_task_ids else None
    extra = {"task_ids": task_ids} if task_ids is not None else {}
    if spelling == "inputs_embeds":
        embeds = model.get_input_embeddings()(ids).detach()
        args, kwargs, defaults, new = (), dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4), {}, 4
        if cache == "static":
            kwargs["cache_implementation"] = "static"
    else:
        args, kwargs, defaults, new = _spelling(spelling, ids, mask, cache == "static")
    for key, value in defaults.items():
        setattr(model.generation_config, key, value)
    with torch.no_grad():
        out = model.generate(*args, **kwargs, **extra)
        assert last_prompt_path(model) == (HOISTED if hoisting else "unhoisted: hoisting turned off")
        tokens, m = ids, mask
        num = prompt.num_input_tokens()
        for _ in range(new):  # the unpatched model on [prompt; tokens], generate's padding-aware positions after P
            ext = torch.cat([torch.ones(3, num, dtype=m.dtype), m], 1)
            logits = _reference(prompt, twin, tokens, m, None, task_ids,
                                positions=(ext.cumsum(-1) - 1).clamp(min=0)).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens, m = torch.cat([tokens, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    want = tokens[:, S:] if spelling == "inputs_embeds" else tokens  # from embeddings: the new tokens only
    assert torch.equal(out, want), f"{spelling}: {out} != oracle {want}"


def test_attached_generate_wrapper_pickles_and_unpatch_removes_it():
    import pickle

    import fastprompt as fp

    model = integration_helpers.tiny_model("llama")
    fp.patch_model(model, fp.PromptTuning(model, num_virtual_tokens=P, init="vocab"))
    assert "generate" in model.__dict__
    set_prompt_hoisting(model, False)
    clone = pickle.loads(pickle.dumps(model))
    ids, mask = make_inputs(batch=3, seq=S, padding="left")
    a = model.generate(ids, attention_mask=mask, max_new_tokens=3, cache_implementation="static")
    b = clone.generate(ids, attention_mask=mask, max_new_tokens=3, cache_implementation="static")
    assert torch.equal(a, b)
    fp.unpatch_model(model)
    assert "generate" not in model.__dict__ and "forward" not in model.__dict__
