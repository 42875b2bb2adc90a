"""Task heads and the weighted multi-task loss (fastprompt.prompts.task_heads) on a MultiTaskPrompt.

Shown: one forward over a mixed-task batch gives, row by row, what each task's rows give alone (logits, loss
terms, gradients of prompt, encoder, heads and unfrozen base weights), in training and in inference; the loss is
Σ_t α_t · L_t written out by hand over a float64 twin (prompt mixture, heads and cross-entropies by hand); heads
and α survive save/load; bad labels fail with a message that names the task and the expected shape.
"""

import copy
import json

import pytest
import torch

import fastprompt as fp
from fastprompt.integrations.prompt_attach import attach
from fastprompt.prompts.io import load_prompt

from gradient_checks import assert_grads_close
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from prompts_helpers import make_inputs, tiny_model, zero_grads

TASKS = torch.tensor([2, 0, 1, 2, 1])  # a mixed batch: qa, sentiment, ner, qa, ner
SEQ = 6


def rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _base(family):
    model = tiny_model(family)
    return model.bert if family == "bert" else model.model  # heads read last_hidden_state: a base model


def _heads(model, weights=(1.0, 0.7, 0.4), pooling="cls"):
    return fp.TaskHeads(model.config, {
        "sentiment": fp.SequenceClassificationHead(num_labels=3, pooling=pooling),
        "ner": fp.TokenClassificationHead(num_labels=5),
        "qa": fp.SpanExtractionHead(),
    }, loss_weights=dict(zip(("sentiment", "ner", "qa"), weights)))


def _prompt(model, variant="selector", **kw):
    heads = _heads(model, pooling="last" if model.config.model_type == "llama" else "cls")
    torch.manual_seed(1)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if variant == "mpt":
        return fp.MultiTaskPrompt(model, variant="mpt", length=3, rank=2, init_std=0.5, heads=heads)
    return fp.MultiTaskPrompt(model, pool_size=4, length=3, init_std=0.5, heads=heads, **kw)


def _batch(family, seed=0):
    ids, mask = make_inputs(batch=5, seq=SEQ, padding="left" if family == "llama" else "right", seed=seed)
    if family == "bert":  # more padded rows (make_inputs pads row 1): a span row and a token row
        mask[3, -1:] = 0
        mask[4, -3:] = 0
    else:
        mask[3, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    g = torch.Generator().manual_seed(seed + 1)
    token = torch.randint(0, 5, (5, SEQ), generator=g).masked_fill(mask == 0, -100)
    token[2, 1] = -100  # an unlabelled real token
    real = [torch.nonzero(mask[r]).flatten() for r in range(5)]
    spans = torch.stack([torch.stack([real[r][1], real[r][-2]]) for r in range(5)])
    labels = {"sentiment": torch.tensor([2]), "ner": token[TASKS == 1], "qa": spans[TASKS == 2]}
    return ids, mask, labels


def _rows_labels(labels, tasks, rows):
    """The labels of `rows` (a subset of the batch), per task, in batch order."""
    out = {}
    for t, name in enumerate(("sentiment", "ner", "qa")):
        mine = torch.nonzero(tasks == t).flatten().tolist()
        keep = [i for i, r in enumerate(mine) if r in set(rows.tolist())]
        if keep:
            out[name] = labels[name][keep]
    return out


def _trainable(prompt, model):
    return {n: p for n, p in list(prompt.named_parameters()) + [(f"base.{n}", p) for n, p in model.named_parameters()
                                                                  if not n.startswith("fastprompt_prompt.")]
            if p.requires_grad}


# ---- exactness -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,variant,training,unfrozen", [
    ("bert", "selector", True, False), ("bert", "selector", False, False), ("llama", "selector", True, False),
    ("llama", "mpt", False, False), ("bert", "mpt", True, True), ("llama", "selector", True, True)])
def test_mixed_batch_equals_each_task_alone(family, variant, training, unfrozen):
    model = _base(family)
    kw = {"encoder": "mlp", "query_layer": 1} if variant == "selector" else {}
    prompt = _prompt(model, variant, **kw)
    attach(model, prompt)
    if unfrozen:  # the seed's optional step: base weights trained too
        for p in model.parameters():
            p.requires_grad_(True)
    model.train(training)
    ids, mask, labels = _batch(family)
    out = model(ids, attention_mask=mask, task_ids=TASKS, labels=labels)
    out.loss.backward()
    params = _trainable(prompt, model)
    mixed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    zero_grads(prompt, model)
    weights = dict(zip(prompt.heads.names, prompt.heads.loss_weights))
    for t, name in enumerate(prompt.heads.names):
        rows = torch.nonzero(TASKS == t).flatten()
        alone = model(ids[rows], attention_mask=mask[rows], task_ids=TASKS[rows], labels=_rows_labels(labels, TASKS,
                                                                                                       rows))
        assert list(alone.task_losses) == [name] and torch.equal(out.task_rows[name], rows)
        assert rel_err(alone.task_logits[name], out.task_logits[name]) < 1e-5, name
        assert rel_err(alone.task_losses[name], out.task_losses[name]) < 1e-5, name
        assert rel_err(alone.loss, weights[name] * out.task_losses[name]) < 1e-5, name
        alone.loss.backward()  # the per-task gradients accumulate to the mixed batch's
    assert any(n.startswith("heads.") for n in mixed) and (not unfrozen or any(n.startswith("base.") for n in mixed))
    if variant == "selector":
        assert any(n.startswith("encoder.") for n in mixed)
    assert_grads_close({n: params[n].grad for n in mixed}, mixed, 1e-4, norm=True)


def _by_hand(prompt64, twin64, ids, mask, tasks, labels):
    """The whole multi-task forward written out in float64: query, S_t(x), the mixed prompt before the input,
    the heads and their cross-entropies, Σ α_t L_t."""
    with torch.no_grad():
        hidden = twin64(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).double()
        q = (hidden * m).sum(1) / m.sum(1)
    logits_sel = torch.einsum("bnd,bd->bn", prompt64.selector_weight[tasks], q) + prompt64.selector_bias[tasks]
    prompts = torch.einsum("bn,nld->bld", torch.softmax(logits_sel, -1), prompt64.pool)
    embeds = twin64.get_input_embeddings()(ids)
    P = prompts.shape[1]
    full_mask = torch.cat([torch.ones(len(ids), P, dtype=mask.dtype), mask], 1)
    h = twin64(inputs_embeds=torch.cat([prompts, embeds], 1), attention_mask=full_mask).last_hidden_state[:, P:]
    layers = prompt64.heads.layers
    per_task_logits, losses = {}, {}

    def ce(logits, y):  # mean over labelled entries
        keep = y != -100
        return -(torch.log_softmax(logits[keep], -1).gather(-1, y[keep, None])).mean()

    for t, name in enumerate(prompt64.heads.names):
        rows = torch.nonzero(tasks == t).flatten()
        hr, mr = h[rows], mask[rows].bool()
        if name == "sentiment":
            first = torch.stack([torch.nonzero(mr[i]).flatten()[0] for i in range(len(rows))])
            lg = hr[torch.arange(len(rows)), first] @ layers[name].weight.T + layers[name].bias
            losses[name] = ce(lg, labels[name])
        elif name == "ner":
            lg = hr @ layers[name].weight.T + layers[name].bias
            y = labels[name].masked_fill(~mr, -100)
            losses[name] = ce(lg.reshape(-1, lg.shape[-1]), y.reshape(-1))
        else:
            lg = (hr @ layers[name].weight.T + layers[name].bias).masked_fill(~mr[..., None], -1e300)
            y = labels[name]
            losses[name] = (ce(lg[..., 0], y[:, 0]) + ce(lg[..., 1], y[:, 1])) / 2
        per_task_logits[name] = lg
    alpha = dict(zip(prompt64.heads.names, prompt64.heads.loss_weights))
    total = alpha["sentiment"] * losses["sentiment"] + alpha["ner"] * losses["ner"] + alpha["qa"] * losses["qa"]
    return total, losses, per_task_logits


def test_weighted_loss_is_the_sum_written_out_by_hand():
    model = _base("bert")
    prompt = _prompt(model)
    twin64 = copy.deepcopy(model).double()
    prompt64 = copy.deepcopy(prompt).double()
    attach(model, prompt)
    ids, mask, labels = _batch("bert")
    out = model(ids, attention_mask=mask, task_ids=TASKS, labels=labels)
    total, losses, logits = _by_hand(prompt64, twin64, ids, mask, TASKS, labels)
    assert rel_err(out.loss, total) < 1e-5
    alpha = dict(zip(prompt.heads.names, prompt.heads.loss_weights))
    assert torch.equal(out.loss, sum(alpha[n] * out.task_losses[n] for n in ("sentiment", "ner", "qa")))
    for name in losses:
        assert rel_err(out.task_losses[name], losses[name]) < 1e-5, name
        real = torch.isfinite(logits[name]) & (logits[name] > -1e299)
        assert rel_err(out.task_logits[name][real], logits[name][real]) < 1e-5, name
    # padding of a span is masked to the dtype's minimum: argmax never lands on it
    qa_rows = out.task_rows["qa"]
    pad = ~mask[qa_rows].bool()
    assert pad.any() and (out.task_logits["qa"][pad] == torch.finfo(torch.float32).min).all()
    # gradients: the hand-written float64 loss against the patched one
    out.loss.backward()
    total.backward()
    p64 = dict(prompt64.named_parameters())
    assert_grads_close({n: p.grad for n, p in prompt.named_parameters()},
                       {n: p64[n].grad for n, _ in prompt.named_parameters()}, 1e-4, norm=True)


def test_tasks_absent_from_the_batch_and_unlabelled_forward():
    model = _base("bert")
    prompt = _prompt(model)
    attach(model, prompt)
    ids, mask, labels = _batch("bert")
    rows = torch.tensor([1, 2, 4])  # sentiment + ner only: no qa labels needed
    out = model(ids[rows], attention_mask=mask[rows], task_ids=TASKS[rows], labels=_rows_labels(labels, TASKS, rows))
    assert set(out.task_losses) == {"sentiment", "ner"} and "qa" not in out.task_logits
    assert torch.equal(out.loss, 1.0 * out.task_losses["sentiment"] + 0.7 * out.task_losses["ner"])
    plain = model(ids, attention_mask=mask, task_ids=TASKS)  # inference: logits, no loss
    assert plain.get("loss") is None and set(plain.task_logits) == {"sentiment", "ner", "qa"}
    assert plain.task_logits["ner"].shape == (2, SEQ, 5) and plain.task_logits["qa"].shape == (2, SEQ, 2)
    assert plain.task_logits["sentiment"].shape == (1, 3)


def test_heads_and_alpha_round_trip(tmp_path):
    model = _base("bert")
    prompt = _prompt(model, encoder="linear")
    prompt.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "fastprompt_config.json").read_text())
    assert [h["name"] for h in saved["task_heads"]] == ["sentiment", "ner", "qa"]
    assert [h["kind"] for h in saved["task_heads"]] == ["sequence", "token", "span"]
    assert saved["loss_weights"] == [1.0, 0.7, 0.4] and saved["num_tasks"] == 3
    loaded = load_prompt(str(tmp_path), model)
    assert loaded.heads.names == prompt.heads.names and loaded.heads.loss_weights == prompt.heads.loss_weights
    assert loaded.heads.specs == prompt.heads.specs
    for k, v in prompt.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids, mask, labels = _batch("bert")
    twin = copy.deepcopy(model)
    attach(model, prompt)
    attach(twin, loaded)
    a = model(ids, attention_mask=mask, task_ids=TASKS, labels=labels)
    b = twin(ids, attention_mask=mask, task_ids=TASKS, labels=labels)
    assert torch.equal(a.loss, b.loss)


def test_param_groups_partition_the_trainable_weights():
    model = _base("bert")
    prompt = _prompt(model, encoder="mlp")
    attach(model, prompt)
    groups = fp.param_groups(model)
    assert [g["name"] for g in groups] == ["prompt", "encoder", "heads"]  # base frozen: no base group
    assert [g["lr"] for g in groups] == [3e-2, 1e-3, 1e-3]
    for p in model.encoder.layer[1].parameters():
        p.requires_grad_(True)
    groups = fp.param_groups(model, base_lr=1e-5)
    assert groups[-1]["name"] == "base" and groups[-1]["lr"] == 1e-5
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == sum(p.requires_grad for p in model.parameters())
    torch.optim.AdamW(groups)  # accepted as is
    with pytest.raises(ValueError, match="param_groups needs a model patched"):
        fp.param_groups(_base("bert"))


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_bad_labels_name_the_task_and_the_shape():
    model = _base("bert")
    attach(model, _prompt(model))
    ids, mask, labels = _batch("bert")

    def call(lab):
        return model(ids, attention_mask=mask, task_ids=TASKS, labels=lab)

    with pytest.raises(TypeError, match="labels must be a {task name"):
        call(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"unknown tasks \['pos'\]"):
        call({**labels, "pos": torch.zeros(1)})
    with pytest.raises(ValueError, match="no entry for task 'qa', which has 2 rows"):
        call({k: v for k, v in labels.items() if k != "qa"})
    with pytest.raises(ValueError, match=r"labels\['ner'\] must be \[n_t, L\] = \(2, 6\)"):
        call({**labels, "ner": labels["ner"][:, :4]})
    with pytest.raises(ValueError, match=r"labels\['qa'\] must be \[n_t, 2\] \(start, end\)"):
        call({**labels, "qa": labels["qa"][:, 0]})
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\) or -100, got 3"):
        call({**labels, "sentiment": torch.tensor([3])})
    with pytest.raises(ValueError, match=r"token positions in \[0, L\)"):
        call({**labels, "qa": torch.tensor([[0, 6], [1, 2]])})
    with pytest.raises(TypeError, match="must be an integer tensor"):
        call({**labels, "sentiment": torch.tensor([1.0])})


def test_bad_heads_arguments():
    model = _base("bert")
    with pytest.raises(ValueError, match="num_tasks=2 but heads names 3 tasks"):
        fp.MultiTaskPrompt(model, num_tasks=2, heads=_heads(model))
    with pytest.raises(ValueError, match="heads are 16 wide"):
        fp.MultiTaskPrompt(model, heads=fp.TaskHeads(16, {"a": fp.SpanExtractionHead()}))
    with pytest.raises(TypeError, match="heads must be a fastprompt TaskHeads"):
        fp.MultiTaskPrompt(model, heads={"a": fp.SpanExtractionHead()})
    with pytest.raises(ValueError, match="task names must be identifiers"):
        fp.TaskHeads(model.config, {"a.b": fp.SpanExtractionHead()})
    with pytest.raises(ValueError, match=r"loss_weights has unknown tasks \['b'\]"):
        fp.TaskHeads(model.config, {"a": fp.SpanExtractionHead()}, loss_weights={"b": 1.0})
    with pytest.raises(ValueError, match="pooling must be one of"):
        fp.SequenceClassificationHead(2, pooling="max")
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        fp.TokenClassificationHead(0)
    with_head = tiny_model("bert")  # BertForSequenceClassification: no last_hidden_state
    attach(with_head, _prompt(with_head))
    ids, mask, _ = _batch("bert")
    with pytest.raises(TypeError, match="patch a base model"):
        with_head(ids, attention_mask=mask, task_ids=TASKS)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_span_labels_on_padding_are_refused(family):
    # A span head masks padding to the dtype's minimum (no prediction lands there), so a label on padding is a
    # target it cannot score: the loss was about 1e38 (or inf), silently. transformers' QA heads do not mask
    # padding and ignore only positions outside the input; out-of-range positions are already refused here, and a
    # position on padding is refused the same way, naming the argument, the row and the position.
    model = _base(family)
    attach(model, _prompt(model))
    ids, mask, labels = _batch(family)
    pad = 5 if family == "bert" else 0  # batch row 3 (the second qa row) is padded there
    assert not mask[3, pad]

    def call(qa):
        return model(ids, attention_mask=mask, task_ids=TASKS, labels={**labels, "qa": qa})

    on_padding = labels["qa"].clone()
    on_padding[1, 1 if family == "bert" else 0] = pad
    side = "end" if family == "bert" else "start"
    with pytest.raises(ValueError, match=rf"labels\['qa'\] row 1 .* {side} position {pad} on padding"):
        call(on_padding)
    no_answer = labels["qa"].clone()
    no_answer[1] = -100  # -100 stays "no answer", whatever the padding
    loss = call(no_answer).loss
    assert torch.isfinite(loss) and loss.item() < 100
    assert torch.isfinite(call(labels["qa"]).loss)
