"""fastprompt's own input-level prompts (PromptTuning, PTuning, MultiTaskPrompt mpt) attached to a causal LM are
hoisted: outputs, loss and prompt gradients equal the base model fed the explicitly concatenated prompt embeddings
(written out here, on an untouched copy with its own attention), and generate() equals a no-cache greedy loop."""
import copy

import pytest
import torch

import fastprompt as fp
from fastprompt.integrations.prompt_attach import attach
from fastprompt.integrations.prompt_hoisting import HOISTED, last_prompt_path

from gradient_checks import assert_grads_close
from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import PAD, assert_rel_close, make_inputs, tiny_model


def _prompt(kind, model):
    if kind == "prompt":
        return fp.PromptTuning(model, num_virtual_tokens=4, init="vocab")
    if kind == "ptuning_mlp":
        return fp.PTuning(model, num_virtual_tokens=3, encoder_hidden_size=16, init_std=0.5)
    if kind == "ptuning_lstm":
        return fp.PTuning(model, num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8, init_std=0.5)
    if kind == "mpt":
        return fp.MultiTaskPrompt(model, num_tasks=3, variant="mpt", length=4, rank=2, init_std=0.5)
    raise KeyError(kind)


def _rows(prompt, batch, task_ids):
    """[B, P, H]: the prompt of every row, from the module's own parameters, row by row."""
    if task_ids is not None:
        return torch.stack([prompt.task_prompts()[int(t)] for t in task_ids])
    single = prompt.input_prompts(1)
    return single[None].expand(batch, -1, -1)


def _reference(prompt, twin, ids, mask, labels, task_ids, positions=None):
    rows = _rows(prompt, ids.shape[0], task_ids)
    num = rows.shape[1]
    embeds = torch.cat([rows, twin.get_input_embeddings()(ids)], 1)
    ext = torch.cat([torch.ones(ids.shape[0], num, dtype=mask.dtype), mask], 1)
    kw = {}
    if labels is not None:
        kw["labels"] = torch.cat([torch.full((ids.shape[0], num), -100), labels], 1)
    if positions is not None:
        kw["position_ids"] = positions
    return twin(inputs_embeds=embeds, attention_mask=ext, **kw)


def _setup(family, kind):
    model = tiny_model(family)
    twin = copy.deepcopy(model)
    prompt = _prompt(kind, model)
    attach(model, prompt)
    return model, twin, prompt


KINDS = ["prompt", "ptuning_mlp", "ptuning_lstm", "mpt"]


@pytest.mark.parametrize("family,kind,padding", [
    ("llama", "prompt", "left"), ("llama", "ptuning_mlp", "hole"), ("llama", "ptuning_lstm", "right"),
    ("llama", "mpt", "left"), ("gpt2", "mpt", "right"), ("qwen3", "prompt", "hole"), ("gemma2", "ptuning_mlp", "left"),
    ("mistral", "mpt", "hole")])
def test_step_matches_explicit_concat(family, kind, padding):
    model, twin, prompt = _setup(family, kind)
    ids, mask = make_inputs(batch=3, seq=6, padding=padding)
    labels = ids.masked_fill(mask == 0, -100)
    task_ids = torch.tensor([2, 0, 2]) if prompt.needs_task_ids else None
    extra = {"task_ids": task_ids} if task_ids is not None else {}
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    assert last_prompt_path(model) == HOISTED
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in prompt.named_parameters() if p.grad is not None}
    prompt.zero_grad(set_to_none=True)
    ref = _reference(prompt, twin, ids, mask, labels, task_ids)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in prompt.named_parameters() if p.grad is not None}
    assert out.logits.shape == ref.logits.shape
    assert_rel_close(out.logits, ref.logits, 1e-5, what="logits")
    assert_rel_close(out.loss, ref.loss, 1e-5, what="loss")
    assert got.keys() == want.keys() and got
    assert_grads_close(got, want, 1e-4)


def test_explicit_position_ids_are_shifted_by_p():
    model, twin, prompt = _setup("llama", "prompt")
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
        num = prompt.num_input_tokens()
        head = torch.arange(num).expand(3, num)
        ref = _reference(prompt, twin, ids, mask, None, None, positions=torch.cat([head, positions + num], 1))
    assert last_prompt_path(model) == HOISTED
    assert_rel_close(out.logits, ref.logits, 1e-5, what="logits")


@pytest.mark.parametrize("kind", ["prompt", "mpt"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_no_cache_greedy_loop(kind, cache, monkeypatch):
    from fastprompt.integrations import prompt_hoisting

    passes = []
    real_pass = prompt_hoisting.prompt_kv_pass
    monkeypatch.setattr(prompt_hoisting, "prompt_kv_pass", lambda *a, **k: passes.append(1) or real_pass(*a, **k))
    model, twin, prompt = _setup("llama", kind)
    ids, mask = make_inputs(batch=3, seq=5, padding="left")
    task_ids = torch.tensor([1, 0, 1]) if prompt.needs_task_ids else None
    extra = {"task_ids": task_ids} if task_ids is not None else {}
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    got = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         pad_token_id=PAD, return_dict_in_generate=True, **extra, **kwargs)
    assert last_prompt_path(model) == HOISTED
    assert len(passes) == 1  # the prompt K/V computed once, at prefill
    assert got.past_key_values.get_seq_length() == ids.shape[1] + 3  # real tokens only
    tokens, m = ids, mask
    num = prompt.num_input_tokens()
    with torch.no_grad():
        for _ in range(4):
            ext = torch.cat([torch.ones(3, num, dtype=m.dtype), m], 1)
            # generate's positions: padding-aware, after the P virtual tokens (the unhoisted attached semantics)
            logits = _reference(prompt, twin, tokens, m, None, task_ids,
                                positions=(ext.cumsum(-1) - 1).clamp(min=0)).logits
            last = logits[:, -1].clone()
            last[:, 3] = float("-inf")  # min_new_tokens: no EOS
            nxt = last.argmax(-1, keepdim=True)
            tokens, m = torch.cat([tokens, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(got.sequences, tokens)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sampling_with_a_seed_matches_the_oracle_sampler(cache):
    model, twin, prompt = _setup("llama", "prompt")
    ids, mask = make_inputs(batch=3, seq=5, padding="left")
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    torch.manual_seed(321)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=True, top_k=None,
                         top_p=None, temperature=1.0, pad_token_id=PAD, return_dict_in_generate=True, **kwargs)
    assert last_prompt_path(model) == HOISTED
    assert got.past_key_values.get_seq_length() == ids.shape[1] + 3  # real tokens only
    torch.manual_seed(321)
    tokens, m = ids, mask
    num = prompt.num_input_tokens()
    with torch.no_grad():
        for _ in range(4):  # the oracle sampler: one multinomial draw per step over the full no-cache forward
            ext = torch.cat([torch.ones(3, num, dtype=m.dtype), m], 1)
            logits = _reference(prompt, twin, tokens, m, None, None,
                                positions=(ext.cumsum(-1) - 1).clamp(min=0)).logits
            nxt = torch.multinomial(torch.softmax(logits[:, -1].float(), dim=-1), num_samples=1)
            tokens, m = torch.cat([tokens, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    # min_new_tokens only masks EOS (3), which the oracle sampler may draw: compare up to its first EOS per row
    before_eos = (tokens[:, 5:] == 3).int().cumsum(1) == 0
    assert before_eos.any()
    assert torch.equal(got.sequences[:, 5:][before_eos], tokens[:, 5:][before_eos])


@pytest.mark.parametrize("kind", ["prompt", "mpt"])
def test_unhoisted_static_cache_unpadded_generate_matches_teacher_forcing(kind):
    """hoist_prompts=False, a static cache, no padding: generate() drops the all-ones mask and its decode steps get
    the mask transformers builds over the cache's keys, prompt slots included (it was refused as a mismatch before).
    Every step's logits equal the unpatched twin's teacher-forced logits over [prompt; generated text]."""
    model, twin, prompt = _setup("llama", kind)
    fp.unpatch_model(model)
    fp.patch_model(model, prompt, hoist_prompts=False)
    ids, mask = make_inputs(batch=2, seq=5, padding="none")
    task_ids = torch.tensor([1, 0]) if prompt.needs_task_ids else None
    extra = {"task_ids": task_ids} if task_ids is not None else {}
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=PAD, return_dict_in_generate=True, output_logits=True,
                             cache_implementation="static", **extra)
        seq = got.sequences
        num = prompt.num_input_tokens()
        want = _reference(prompt, twin, seq, torch.ones_like(seq), None, task_ids).logits
    for step, logits in enumerate(got.logits):
        reference = want[:, num + ids.shape[1] - 1 + step]
        assert_rel_close(logits, reference, 1e-5, f"{kind}: logits of new token {step}")
