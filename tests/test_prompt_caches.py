"""KV caches of input-level prompts are recognized by what they hold, not by their identity.

The textbook decode loop (`out = model(ids, use_cache=True)`, then the next token with `out.past_key_values`), a
`copy.deepcopy` of a prompt cache reused in generate() (as transformers documents), and the same cache object
reused: each must continue from the prompt the cache was filled with. A cache that starts with the prompt (the
unhoisted path) and one that holds real tokens only (hoisting) are told apart by the record the cache object
carries, or else by their length against the attention mask; a cache that cannot be told apart is refused with a
clear error, never decoded on a guess. Oracle: the unpatched model fed `[prompt; tokens]` with no cache, greedy, step
by step (the prompt rows written out from the prompt module's parameters); PEFT: unpatched PEFT's full forward.
"""
import copy

import pytest
import torch
from transformers import DynamicCache

import fastprompt as fp
from fastprompt.integrations.prompt_cache import HOISTED as CACHE_HOISTED, INLINE, prompt_in_cache
from fastprompt.integrations.prompt_hoisting import set_prompt_hoisting

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import PAD, make_inputs, tiny_model, tiny_peft_pair

EOS = 3
TASK_IDS = torch.tensor([1, 0, 2])


def _setup(kind, hoist):
    model = tiny_model("llama")
    twin = copy.deepcopy(model)
    if kind == "prompt":
        prompt = fp.PromptTuning(model, num_virtual_tokens=4, init="vocab")
    else:
        prompt = fp.MultiTaskPrompt(model, num_tasks=3, variant="mpt", length=4, rank=2, init_std=0.5)
    fp.patch_model(model, prompt, hoist_prompts=hoist)
    extra = {"task_ids": TASK_IDS} if prompt.needs_task_ids else {}
    return model, twin, prompt, extra


def _oracle_logits(prompt, twin, tokens, mask, extra, positions_from_mask):
    """The unpatched twin on [prompt rows; tokens], no cache: logits at the last position."""
    batch = tokens.shape[0]
    if extra:
        rows = torch.stack([prompt.task_prompts()[int(t)] for t in extra["task_ids"]])
    else:
        rows = prompt.input_prompts(1)[None].expand(batch, -1, -1)
    num = rows.shape[1]
    ext = torch.cat([torch.ones(batch, num, dtype=mask.dtype), mask], 1)
    kw = {"position_ids": (ext.cumsum(-1) - 1).clamp(min=0)} if positions_from_mask else {}
    with torch.no_grad():
        embeds = torch.cat([rows, twin.get_input_embeddings()(tokens)], 1)
        return twin(inputs_embeds=embeds, attention_mask=ext, use_cache=False, **kw).logits[:, -1]


def _greedy_oracle(prompt, twin, ids, mask, extra, steps, positions_from_mask=True):
    tokens, m = ids, mask
    for _ in range(steps):
        last = _oracle_logits(prompt, twin, tokens, m, extra, positions_from_mask).clone()
        last[:, EOS] = float("-inf")  # min_new_tokens: never EOS
        nxt = last.argmax(-1, keepdim=True)
        tokens, m = torch.cat([tokens, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return tokens


@pytest.mark.parametrize("hoist", [True, False])
@pytest.mark.parametrize("kind", ["prompt", "mpt"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_manual_decode_loop_with_the_returned_cache(kind, hoist, with_mask):
    model, twin, prompt, extra = _setup(kind, hoist)
    ids, mask = make_inputs(batch=3, seq=5, padding="left" if with_mask else "none")
    tokens, m = ids, mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask if with_mask else None, use_cache=True, **extra)
        layout = prompt_in_cache(out.past_key_values).layout
        for step in range(4):
            want = _oracle_logits(prompt, twin, tokens, m, extra, positions_from_mask=False)
            got = out.logits[:, -1]
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"step {step}: {(got - want).abs().max()}"
            nxt = got.argmax(-1, keepdim=True)
            tokens, m = torch.cat([tokens, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=m if with_mask else None, past_key_values=out.past_key_values,
                        **extra)
    assert layout == (CACHE_HOISTED if hoist else INLINE)  # what the cache object says it holds


@pytest.mark.parametrize("hoist", [True, False])
@pytest.mark.parametrize("kind", ["prompt", "mpt"])
@pytest.mark.parametrize("reuse", ["deepcopy", "same"])
@pytest.mark.parametrize("spelling", ["new_tokens", "full_sequence"])
def test_prompt_cache_reused_in_generate(kind, hoist, reuse, spelling):
    """transformers' "re-use a prompt cache": fill a cache with the first part, then generate() from it (a deep copy
    or the object itself) given the whole sequence, or only the new tokens with the whole attention mask."""
    model, twin, prompt, extra = _setup(kind, hoist)
    ids, mask = make_inputs(batch=3, seq=7, padding="left")
    first, rest = ids[:, :4], ids[:, 4:]
    prompt_cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=first, attention_mask=mask[:, :4], past_key_values=prompt_cache, **extra)
    cache = copy.deepcopy(prompt_cache) if reuse == "deepcopy" else prompt_cache
    given = ids if spelling == "full_sequence" else rest
    call = dict(attention_mask=mask, past_key_values=cache, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                pad_token_id=PAD, **extra)
    if spelling == "full_sequence" and not hoist:
        # generate() slices the new tokens by the cache length, which counts the prompt too: it would drop P tokens
        with pytest.raises(ValueError, match="drops 4 of them"):
            model.generate(given, **call)
        return
    got = model.generate(given, **call)
    want = _greedy_oracle(prompt, twin, ids, mask, extra, 4)
    assert torch.equal(got, want[:, -got.shape[1]:]), f"{got}\n!= no-cache greedy oracle\n{want}"


@pytest.mark.parametrize("hoist", [True, False])
def test_cache_without_its_record_is_told_by_length_or_refused(hoist):
    """A cache that lost its record (a cache type that cannot carry one) decodes right when the attention mask tells
    its layout, and is refused with a clear error when nothing does."""
    model, twin, prompt, extra = _setup("prompt", hoist)
    ids, mask = make_inputs(batch=3, seq=5, padding="left")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = out.past_key_values
        del cache.__dict__["_fastprompt_prompt_in_cache"]
        m = torch.cat([mask, torch.ones_like(nxt)], 1)
        with pytest.raises(ValueError, match="cannot tell whether the cache starts with the prompt"):
            model(input_ids=nxt, past_key_values=copy.deepcopy(cache))
        with pytest.raises(ValueError, match="should hold"):
            model(input_ids=nxt, attention_mask=m[:, 1:], past_key_values=copy.deepcopy(cache))
        got = model(input_ids=nxt, attention_mask=m, past_key_values=cache).logits[:, -1]
    want = _oracle_logits(prompt, twin, torch.cat([ids, nxt], 1), m, extra, positions_from_mask=False)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_pool_query_travels_with_the_cache():
    """A prefix pool's query, chosen at prefill, is carried by the cache (and its deep copy), not keyed by the
    cache object: decoding from a copy uses the prefill's selection."""
    model = tiny_model("llama")
    twin = copy.deepcopy(model)
    prompt = fp.PromptPool(model, pool_size=6, length=2, top_k=2, placement="prefix", init_std=0.5)
    fp.patch_model(model, prompt)
    ids, mask = make_inputs(batch=3, seq=5, padding="none")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        full = torch.cat([ids, nxt], 1)
        m = torch.ones_like(full)
        # the oracle: the same selection (the prefill's query) over the whole sequence, no cache
        query = prompt_in_cache(out.past_key_values).query
        want = model(input_ids=full, attention_mask=m, prompt_query=query, use_cache=False).logits[:, -1]
        got = model(input_ids=nxt, attention_mask=m, past_key_values=copy.deepcopy(out.past_key_values)).logits[:, -1]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    del twin


# ----------------------------------------------------------------------------------------------------------------
# PEFT prompt tuning, hoisted generate()


P = 4


def _peft_greedy_oracle(oracle, ids, mask, steps):
    tokens, m = ids, mask
    with torch.no_grad():
        for _ in range(steps):
            last = oracle(input_ids=tokens, attention_mask=m, use_cache=False).logits[:, -1].float()
            last[:, EOS] = float("-inf")
            nxt = last.argmax(-1, keepdim=True)
            tokens, m = torch.cat([tokens, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return tokens


@pytest.mark.parametrize("reuse", ["deepcopy", "same"])
def test_peft_hoisted_generate_continues_its_own_cache(reuse):
    pytest.importorskip("peft")
    patched, oracle = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=P)
    fp.patch_model(patched)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    prompt_cache = DynamicCache()
    first = patched.generate(input_ids=ids, attention_mask=mask, past_key_values=prompt_cache, max_new_tokens=3,
                             min_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert prompt_in_cache(prompt_cache).layout == CACHE_HOISTED
    cache = copy.deepcopy(prompt_cache) if reuse == "deepcopy" else prompt_cache
    more = torch.tensor([[11, 12], [13, 14], [15, 16]])
    full = torch.cat([first, more], 1)
    full_mask = torch.cat([mask, torch.ones(3, first.shape[1] - ids.shape[1] + 2, dtype=mask.dtype)], 1)
    got = patched.generate(input_ids=full, attention_mask=full_mask, past_key_values=cache, max_new_tokens=3,
                           min_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert torch.equal(got, _peft_greedy_oracle(oracle, full, full_mask, 3))
    with pytest.raises(ValueError, match="holds real tokens only"):
        patched(input_ids=more, past_key_values=copy.deepcopy(prompt_cache))


@pytest.mark.parametrize("model_kind,hoist", [("own", False), ("peft", True), ("peft", False)])
def test_prompt_first_cache_and_the_whole_unpadded_sequence_refused_in_generate(model_kind, hoist):
    """Unpadded, generate() drops the all-ones mask, so no decoding step can see the mismatch: a cache that starts
    with the prompt (an unhoisted forward filled it; a PEFT forward always does) and the whole sequence are refused
    before generation starts. Silently, generate() took the new tokens after the cache length, P real ones lost."""
    ids, mask = make_inputs(batch=2, seq=6, padding="none")
    if model_kind == "own":
        model, _, _, extra = _setup("prompt", hoist)
    else:
        model, _ = tiny_peft_pair("llama", "prompt", "CAUSAL_LM", num_virtual_tokens=4)
        fp.patch_model(model)
        set_prompt_hoisting(model, hoist)
        extra = {}
    with torch.no_grad():
        cache = model(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True, **extra).past_key_values
        assert cache.get_seq_length() == 4 + 3  # the prompt first
        for given in ({"attention_mask": mask}, {}):
            with pytest.raises(ValueError, match="drops 4 of them"):
                model.generate(ids, past_key_values=copy.deepcopy(cache), max_new_tokens=2, do_sample=False,
                               pad_token_id=PAD, **given, **extra)
