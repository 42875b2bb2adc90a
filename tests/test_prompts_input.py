"""Input-placement prompts vs the unpatched model fed explicitly concatenated prompt embeddings (plain PyTorch)."""

import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp
from fastprompt.integrations.prompt_attach import attach, detach

import prompts_helpers as H
from gradient_checks import assert_grads_close
from integration_helpers import greedy_no_cache
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from prompts_helpers import make_inputs, positions_from_mask, prompt_grads, reference_copy, tiny_model, zero_grads


def _frozen_query(twin, ids, mask, mode="mean"):
    with torch.no_grad():
        hidden = twin.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def _reference_rows(prompt, twin, ids, mask, task_ids=None):
    """The prompt rows [B, P, d] written out per row, from the prompt's own parameters."""
    B = ids.shape[0]
    if isinstance(prompt, fp.PromptTuning):
        return [prompt.embedding for _ in range(B)], None
    if isinstance(prompt, fp.PTuning):
        x = prompt.embedding
        if prompt.lstm is not None:
            x = prompt.lstm(x[None])[0][0]
        enc = prompt.mlp(x)
        return [enc for _ in range(B)], None
    if isinstance(prompt, fp.PromptPool):
        c = prompt.config
        q = _frozen_query(twin, ids, mask, c.query)
        cos = torch.stack([torch.stack([F.cosine_similarity(q[b], prompt.keys[n], dim=0) for n in range(c.pool_size)])
                           for b in range(B)])
        if c.top_k is not None:
            top = cos.topk(c.top_k, dim=-1)
            rows = [torch.cat([prompt.pool[int(i)] for i in top.indices[b]], dim=0) for b in range(B)]
            aux = -c.pull_constraint_coeff * top.values.mean()
            return rows, aux
        w = torch.softmax(cos / c.temperature, dim=-1)
        return [sum(w[b, n] * prompt.pool[n] for n in range(c.pool_size)) for b in range(B)], None
    if isinstance(prompt, fp.MultiTaskPrompt):
        c = prompt.config
        rows = []
        if c.variant == "mpt":
            for b in range(B):
                t = int(task_ids[b])
                rows.append(prompt.shared_prompt * (prompt.task_cols[t] @ prompt.task_rows[t]))
            return rows, None
        q = _frozen_query(twin, ids, mask, c.query)
        for b in range(B):
            t = int(task_ids[b])
            s = torch.softmax(prompt.selector_weight[t] @ q[b] + prompt.selector_bias[t], dim=-1)
            rows.append(sum(s[i] * prompt.pool[i] for i in range(c.pool_size)))
        return rows, None
    raise TypeError(type(prompt))


def _reference_forward(prompt, twin, ids, mask, labels=None, task_ids=None):
    rows, aux = _reference_rows(prompt, twin, ids, mask, task_ids)
    embeds = twin.get_input_embeddings()(ids)
    full = torch.stack([torch.cat([rows[b], embeds[b]], dim=0) for b in range(ids.shape[0])])
    P = rows[0].shape[0]
    ext_mask = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], dim=1)
    kw = {}
    if labels is not None:
        kw["labels"] = torch.cat([torch.full((ids.shape[0], P), -100), labels], 1) if labels.dim() == 2 else labels
    out = twin(inputs_embeds=full, attention_mask=ext_mask, **kw)
    loss = out.loss + aux if (aux is not None and out.loss is not None) else out.loss
    return out.logits, loss


def _make(kind, model):
    if kind == "prompt_random":
        return fp.PromptTuning(model, num_virtual_tokens=3)
    if kind == "prompt_vocab":
        return fp.PromptTuning(model, num_virtual_tokens=4, init="vocab")
    if kind == "ptuning_mlp":
        return fp.PTuning(model, num_virtual_tokens=3, encoder_hidden_size=16, init_std=0.5)
    if kind == "ptuning_lstm":
        return fp.PTuning(model, num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8, init_std=0.5)
    if kind == "pool_hard":
        return fp.PromptPool(model, pool_size=5, length=2, top_k=2, init_std=0.5)
    if kind == "pool_soft":
        return fp.PromptPool(model, pool_size=5, length=3, top_k=None, temperature=0.1, init_std=0.5)
    if kind == "mt_selector":
        return fp.MultiTaskPrompt(model, num_tasks=3, pool_size=4, length=3, init_std=0.5)
    if kind == "mt_mpt":
        return fp.MultiTaskPrompt(model, num_tasks=3, variant="mpt", length=3, rank=2, init_std=0.5)
    raise KeyError(kind)


KINDS = ["prompt_random", "prompt_vocab", "ptuning_mlp", "ptuning_lstm", "pool_hard", "pool_soft", "mt_selector",
         "mt_mpt"]


@pytest.mark.parametrize("kind", KINDS)
def test_input_placement_matches_explicit_concat(kind):
    model = tiny_model("llama")
    twin = reference_copy(model)
    prompt = _make(kind, model)
    ids, mask = make_inputs(batch=3, seq=6, padding="left")
    task_ids = torch.tensor([2, 0, 2]) if prompt.needs_task_ids else None
    attach(model, prompt)
    extra = {"task_ids": task_ids} if task_ids is not None else {}
    out = model(ids, attention_mask=mask, labels=ids, **extra)
    out.loss.backward()
    got = prompt_grads(prompt)
    zero_grads(prompt)
    ref_logits, ref_loss = _reference_forward(prompt, twin, ids, mask, labels=ids, task_ids=task_ids)
    ref_loss.backward()
    want = prompt_grads(prompt)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and got
    assert_grads_close(got, want, 1e-4)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("fastprompt_prompt"))


@pytest.mark.parametrize("family", ["gpt2", "bert", "roberta", "mistral", "qwen3", "gemma2"])
def test_input_placement_other_families(family):
    model = tiny_model(family)
    twin = reference_copy(model)
    prompt = fp.PromptTuning(model, num_virtual_tokens=3, init="vocab")
    ids, mask = make_inputs(batch=3, seq=5, padding="right")
    labels = torch.tensor([0, 2, 1]) if family in ("bert", "roberta") else ids.masked_fill(mask == 0, -100)
    attach(model, prompt)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref_logits, ref_loss = _reference_forward(prompt, twin, ids, mask, labels=labels)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_bert_pool_cls_query_with_token_type_ids():
    model = tiny_model("bert")
    twin = reference_copy(model)
    prompt = fp.PromptPool(model, pool_size=4, length=2, top_k=1, query="cls", init_std=0.5, add_aux_loss=False)
    ids, mask = make_inputs(batch=3, seq=5, padding="right")
    attach(model, prompt)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    ref_logits, _ = _reference_forward(prompt, twin, ids, mask)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert prompt.aux_loss is not None  # computed, but not added (add_aux_loss=False)


def _greedy_reference(prompt, twin, ids, mask, steps, task_ids=None):
    """No-cache greedy decoding over the unpatched twin fed the reference prompt rows explicitly each step."""
    with torch.no_grad():
        rows, _ = _reference_rows(prompt, twin, ids, mask, task_ids)
    prompts = torch.stack(rows).detach()
    P = prompts.shape[1]

    def forward(input_ids, attention_mask, **_):
        embeds = torch.cat([prompts, twin.get_input_embeddings()(input_ids)], 1)
        ext = torch.cat([torch.ones(input_ids.shape[0], P, dtype=attention_mask.dtype), attention_mask], 1)
        return twin(inputs_embeds=embeds, attention_mask=ext, position_ids=positions_from_mask(ext))

    return greedy_no_cache(forward, ids, mask, steps, pad=H.PAD, eos=H.EOS, positions=False)


@pytest.mark.parametrize("kind", ["prompt_vocab", "pool_hard"])
def test_generate_input_placement(kind):
    model = tiny_model("llama")
    twin = reference_copy(model)
    prompt = _make(kind, model)
    ids, mask = make_inputs(batch=3, seq=5, padding="left")
    attach(model, prompt)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = _greedy_reference(prompt, twin, ids, mask, 4)
    assert torch.equal(got, want)


def test_detach_restores_model():
    model = tiny_model("llama")
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids, mask = make_inputs(batch=2, seq=4)
    before = model(ids, attention_mask=mask).logits
    prompt = fp.PromptTuning(model, num_virtual_tokens=2)
    attach(model, prompt)
    assert model.fastprompt_prompt is prompt and "forward" in model.__dict__
    assert attach(model, prompt) is model  # the same prompt again: a no-op
    with pytest.raises(ValueError, match="already has a fastprompt prompt"):
        attach(model, fp.PromptTuning(model, num_virtual_tokens=2))
    assert detach(model) is model and detach(model) is model
    assert "forward" not in model.__dict__ and not hasattr(model, "fastprompt_prompt")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, before, rtol=0, atol=0)
