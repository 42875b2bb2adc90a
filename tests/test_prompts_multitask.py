"""Mixed-task batches: each row gives what its task's rows give when run on their own (outputs and gradients, in
training and in generate); plus the bad-input errors of the multi-task and pool paths."""

import pytest
import torch

import fastprompt as fp
from fastprompt.integrations.prompt_attach import attach
from fastprompt.ops.gather_prompts import gather_prompts

import prompts_helpers as H
from gradient_checks import assert_grads_close
from integration_helpers import greedy_no_cache
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from prompts_helpers import make_inputs, prompt_grads, tiny_model, tiny_config, zero_grads

TASKS = torch.tensor([1, 0, 1, 2])


def _prompt(kind, model):
    if kind == "selector":
        return fp.MultiTaskPrompt(model, num_tasks=3, pool_size=4, length=3, init_std=0.5)
    if kind == "selector_embeddings":
        return fp.MultiTaskPrompt(model, num_tasks=3, pool_size=4, length=3, init_std=0.5, query="embeddings")
    if kind == "mpt":
        return fp.MultiTaskPrompt(model, num_tasks=3, variant="mpt", length=3, rank=2, init_std=0.5)
    if kind == "pool_prefix":
        return fp.PromptPool(model, pool_size=5, length=2, top_k=2, placement="prefix", init_std=0.5,
                             add_aux_loss=False)
    raise KeyError(kind)


def _row_loss(logits, mask, weights):
    real = mask.bool()[:, :, None]
    return (logits[:, -mask.shape[1]:] * weights * real).sum()


@pytest.mark.parametrize("kind", ["selector", "selector_embeddings", "mpt", "pool_prefix"])
def test_mixed_task_batch_equals_per_task_runs(kind):
    model = tiny_model("llama")
    prompt = _prompt(kind, model)
    attach(model, prompt)
    ids, mask = make_inputs(batch=4, seq=5, padding="left")
    weights = torch.randn(4, 5, model.config.vocab_size, generator=torch.Generator().manual_seed(3))
    tasks = {"task_ids": TASKS} if prompt.needs_task_ids else {}
    out = model(ids, attention_mask=mask, **tasks)
    _row_loss(out.logits, mask, weights).backward()
    batch_grads = prompt_grads(prompt)
    zero_grads(prompt)
    groups = [torch.nonzero(TASKS == t).flatten() for t in TASKS.unique()]
    for rows in groups:
        sub = {"task_ids": TASKS[rows]} if prompt.needs_task_ids else {}
        part = model(ids[rows], attention_mask=mask[rows], **sub)
        real = mask[rows].bool()
        torch.testing.assert_close(part.logits[:, -5:][real], out.logits[rows][:, -5:][real], rtol=1e-5, atol=1e-5)
        _row_loss(part.logits, mask[rows], weights[rows]).backward()  # grads accumulate over the groups
    group_grads = prompt_grads(prompt)
    assert batch_grads.keys() == group_grads.keys() and batch_grads
    assert_grads_close(batch_grads, group_grads, 1e-4)


@pytest.mark.parametrize("kind", ["selector", "mpt"])
def test_mixed_task_generate_equals_per_task_generate(kind):
    model = tiny_model("llama")
    prompt = _prompt(kind, model)
    attach(model, prompt)
    ids, mask = make_inputs(batch=4, seq=5, padding="left")
    full = model.generate(ids, attention_mask=mask, task_ids=TASKS, max_new_tokens=4, do_sample=False,
                          pad_token_id=0)
    # the truth: a no-cache greedy argmax over the attached model's full forward (checked against the reference in
    # the forward tests), untouched by generate()'s cache handling
    want = greedy_no_cache(model, ids, mask, 4, pad=H.PAD, eos=H.EOS, task_ids=TASKS)
    assert torch.equal(full, want)
    for t in TASKS.unique():
        rows = torch.nonzero(TASKS == t).flatten()
        part = model.generate(ids[rows], attention_mask=mask[rows], task_ids=TASKS[rows], max_new_tokens=4,
                              do_sample=False, pad_token_id=0)
        assert torch.equal(part, full[rows][:, : part.shape[1]])


def test_tasks_really_differ():
    model = tiny_model("llama")
    attach(model, _prompt("mpt", model))
    ids, mask = make_inputs(batch=2, seq=4, padding="none")
    a = model(ids, attention_mask=mask, task_ids=torch.tensor([0, 0])).logits
    b = model(ids, attention_mask=mask, task_ids=torch.tensor([0, 1])).logits
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


# ---- bad input -------------------------------------------------------------------------------------------------


def test_unknown_and_missing_task_ids():
    model = tiny_model("llama")
    attach(model, _prompt("selector", model))
    ids, mask = make_inputs(batch=2, seq=4)
    with pytest.raises(ValueError, match="unknown task id 3"):
        model(ids, attention_mask=mask, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="unknown task id -1"):
        model(ids, attention_mask=mask, task_ids=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="needs task_ids"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"task_ids must be \[B\] with B = 2"):
        model(ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="task_ids must be an integer"):
        model(ids, attention_mask=mask, task_ids=torch.tensor([0.0, 1.0]))


def test_task_ids_for_a_prompt_without_tasks():
    model = tiny_model("llama")
    attach(model, fp.PromptTuning(model, num_virtual_tokens=2))
    ids, mask = make_inputs(batch=2, seq=4)
    with pytest.raises(ValueError, match="has no tasks"):
        model(ids, attention_mask=mask, task_ids=torch.tensor([0, 1]))


@pytest.mark.parametrize("placement", ["input", "prefix"])
def test_wrong_query_width(placement):
    model = tiny_model("llama")
    attach(model, fp.PromptPool(model, pool_size=4, length=2, top_k=2, placement=placement))
    ids, mask = make_inputs(batch=2, seq=4)
    with pytest.raises(ValueError, match="wrong query width"):
        model(ids, attention_mask=mask, prompt_query=torch.randn(2, 31))
    out = model(ids, attention_mask=mask, prompt_query=torch.randn(2, 32))  # the right width works
    assert out.logits.shape[0] == 2


def test_pool_index_out_of_range():
    model = tiny_model("llama")
    pool = fp.PromptPool(model, pool_size=4, length=2, top_k=2, placement="prefix")
    with pytest.raises(ValueError, match=r"index values must lie in \[-1, 3\]"):
        gather_prompts(pool.pool[0, 0], torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="top_k must be in"):
        fp.PromptPool(model, pool_size=4, top_k=5)


@pytest.mark.parametrize("make", [
    lambda m: fp.PromptPool(m, pool_size=3, length=2, top_k=1),
    lambda m: fp.PromptPool(m, pool_size=3, length=2, top_k=1, placement="prefix"),
    lambda m: fp.PrefixTuning(m, num_virtual_tokens=2),
    lambda m: fp.MultiTaskPrompt(m, num_tasks=2),
])
def test_pool_model_mismatch(make):
    small = tiny_model("llama")
    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads = 48, 4, 2
    import transformers

    other = transformers.AutoModelForCausalLM.from_config(cfg)
    prompt = make(small)
    with pytest.raises(ValueError, match="built for another model shape.*hidden_size: prompt 32 vs model 48"):
        attach(other, prompt)
    assert "forward" not in other.__dict__ and all(p.requires_grad for p in other.parameters())


def test_prefix_prompt_on_fewer_layers_is_refused():
    model = tiny_model("llama")
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 1
    import transformers

    shallow = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="num_layers: prompt 2 vs model 1"):
        attach(shallow, fp.PTuningV2(model))
    with pytest.raises(ValueError, match="out of range for a model with 2 layers"):
        fp.PTuningV2(model, layers=[2])
