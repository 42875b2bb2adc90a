"""The learned prompt encoder E(x) and the cheap query pass (query_layer=k) of PromptPool / MultiTaskPrompt.

Oracles: a float64 twin of the model whose attention concatenates the prefixes explicitly (prompts_helpers), its
own output_hidden_states for the query, and E, the pool selection and the mixture written out by hand. Layer
calls are counted to show what the query pass runs and what the real pass reuses.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastprompt as fp
from fastprompt.integrations import query_pass
from fastprompt.integrations.prompt_attach import attach, detach
from fastprompt.integrations.transformers_attention import find_layers
from fastprompt.prompts.io import load_prompt

import prompts_helpers as H
from gradient_checks import assert_grads_close
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from prompts_helpers import make_inputs, reference_copy, tiny_model, zero_grads


def rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _perturb(module, scale=0.3, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


class _Count:
    """Computations per layer: calls of each layer's first submodule (its attention), which a skipped layer never
    reaches (the layer's own hooks still fire when the reuse stands in for its forward)."""

    def __init__(self, model):
        self.layers = find_layers(model.base_model if hasattr(model, "base_model") else model)[1]
        self.calls = [0] * len(self.layers)
        self.handles = [next(layer.children()).register_forward_pre_hook(self._hook(i))
                        for i, layer in enumerate(self.layers)]

    def _hook(self, i):
        def hook(module, args):
            self.calls[i] += 1
        return hook

    def reset(self):
        self.calls = [0] * len(self.layers)


def _inputs(family, batch=3, seq=6):
    return make_inputs(batch=batch, seq=seq, padding="left" if family == "llama" else "right", seed=11)


def _labels(family, ids, mask):
    if family == "bert":
        return torch.tensor([1, 0, 2][: ids.shape[0]])
    # also drop the token predicted from a padding position (a query that sees no real key)
    after_pad = F.pad(mask[:, :-1], (1, 0), value=1) == 0
    return ids.masked_fill((mask == 0) | after_pad, -100)


# ---- the oracle: E, selection and prefixes written out, float64 twin ---------------------------------------------


def _reference_query(twin64, ids, mask, k, mode="mean"):
    H.REFERENCE_PREFIXES.clear()
    with torch.no_grad():
        hidden = twin64.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[k]
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)
    return hidden[:, 0]


def _by_hand_encoder(prompt64, q):
    enc = prompt64.encoder
    if enc is None:
        return q
    if isinstance(enc, fp.prompts.encoder.LinearQueryEncoder):
        return q @ enc.linear.weight.T + enc.linear.bias
    if isinstance(enc, fp.prompts.encoder.MLPQueryEncoder):
        return q + torch.relu(q @ enc.up.weight.T + enc.up.bias) @ enc.down.weight.T + enc.down.bias
    return enc(q)


def _reference_pool_forward(prompt64, twin64, ids, mask, labels):
    """A soft-mixture prefix pool (softmax of cosine / temperature) on the twin, every step by hand."""
    c = prompt64.config
    q = _reference_query(twin64, ids, mask, c.query_layer if c.query_layer is not None else -1, c.query)
    e = _by_hand_encoder(prompt64, q)
    cos = (e / e.norm(dim=-1, keepdim=True)) @ (prompt64.keys / prompt64.keys.norm(dim=-1, keepdim=True)).T
    w = torch.softmax(cos / c.temperature, dim=-1)  # [B, N]
    prefixes = {}
    for i, layer in enumerate(prompt64.layers):
        k = sum(w[:, n, None, None, None] * prompt64.pool[i, 0, n][None] for n in range(c.pool_size))
        v = sum(w[:, n, None, None, None] * prompt64.pool[i, 1, n][None] for n in range(c.pool_size))
        prefixes[layer] = (k, v)
    H.REFERENCE_PREFIXES.clear()
    H.REFERENCE_PREFIXES.update(prefixes)
    try:
        out = twin64(input_ids=ids, attention_mask=mask, labels=labels)
    finally:
        H.REFERENCE_PREFIXES.clear()
    return out


# ---- the query pass ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,k", [("llama", 0), ("llama", 1), ("bert", 1), ("bert", 2)])
def test_query_is_the_hidden_state_entering_layer_k(family, k):
    model = tiny_model(family)
    twin64 = reference_copy(model).double()
    pool = fp.PromptPool(model, pool_size=4, length=2, top_k=2, placement="prefix", query_layer=k)
    seen = []
    original = pool.encode
    pool.encode = lambda q: (seen.append(q.detach()), original(q))[1]
    attach(model, pool)
    ids, mask = _inputs(family)
    model(ids, attention_mask=mask)
    assert rel_err(seen[-1], _reference_query(twin64, ids, mask, k)) < 1e-5


def test_query_pass_runs_only_the_layers_below_k_and_the_real_pass_reuses_them():
    model = tiny_model("llama")
    ids, mask = _inputs("llama")

    def calls(**pool_kwargs):
        m = copy.deepcopy(model)
        c = _Count(m)
        attach(m, fp.PromptPool(m, pool_size=4, length=2, top_k=2, placement="prefix", **pool_kwargs))
        m(ids, attention_mask=mask, use_cache=False)
        return c.calls

    assert calls() == [2, 2]  # full query pass + real pass
    assert calls(query_layer=1, layers=[0, 1]) == [2, 1]  # query pass stops before layer 1; a layer-0 prompt
    assert calls(query_layer=1, layers=[1]) == [1, 1]  # prompts at >= 1: layer 0 runs once per step
    assert calls(query_layer=2, layers=[1]) == [2, 2]  # a prompt below k: nothing to reuse
    assert calls(query_layer=0, layers=[0, 1]) == [1, 1]  # the query is the embeddings' output: no layer for it


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("encoder", [None, "linear", "mlp"])
def test_reused_lower_layers_are_exact_training(family, encoder):
    """Prefixes at layer >= k, layers [0, k) computed once: loss, logits and every prompt gradient (pool, keys,
    encoder) equal the float64 explicit formulation, which runs the lower layers twice."""
    model = tiny_model(family)
    twin64 = reference_copy(model).double()
    prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=None, temperature=0.3, placement="prefix",
                           layers=[1], query_layer=1, encoder=encoder, init_std=0.5)
    if encoder is not None:
        _perturb(prompt.encoder, 0.2)
    prompt64 = copy.deepcopy(prompt).double()
    count = _Count(model)
    attach(model, prompt)
    model.train()
    ids, mask = _inputs(family)
    labels = _labels(family, ids, mask)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert count.calls == [1, 1]  # the reuse was taken
    out.loss.backward()
    ref = _reference_pool_forward(prompt64, twin64, ids, mask, labels)
    ref.loss.backward()
    real = mask.bool()
    logits, ref_logits = (out.logits, ref.logits) if family == "bert" else (out.logits[real], ref.logits[real])
    assert rel_err(logits, ref_logits) < 1e-5
    assert rel_err(out.loss, ref.loss) < 1e-5
    grads64 = dict(prompt64.named_parameters())
    names = [n for n, p in prompt.named_parameters() if p.grad is not None]
    assert {"pool", "keys"} <= set(names) and (encoder is None or any(n.startswith("encoder.") for n in names))
    params = dict(prompt.named_parameters())
    assert_grads_close({n: params[n].grad for n in names}, {n: grads64[n].grad for n in names}, 1e-4, norm=True)


def test_reuse_equals_recompute_bitwise():
    model = tiny_model("llama")
    ids, mask = _inputs("llama")
    prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=2, placement="prefix", layers=[1], query_layer=1,
                           encoder="linear", init_std=0.5)
    attach(model, prompt)
    a = model(ids, attention_mask=mask, use_cache=False).logits
    original = query_pass._can_reuse
    query_pass._can_reuse = lambda *args: False
    try:
        b = model(ids, attention_mask=mask, use_cache=False).logits
    finally:
        query_pass._can_reuse = original
    assert torch.equal(a, b)


def test_reuse_is_not_taken_where_it_would_be_wrong():
    model = tiny_model("llama")
    ids, mask = _inputs("llama")
    prompt = fp.PromptPool(model, pool_size=4, length=2, top_k=2, placement="prefix", layers=[1], query_layer=1)
    count = _Count(model)
    attach(model, prompt)

    def calls(**kw):
        count.reset()
        out = model(ids, attention_mask=mask, **kw)
        return count.calls, out

    assert calls(use_cache=False)[0] == [1, 1]
    assert calls()[0] == [1, 1]  # a plain forward: reused, and no half-filled cache comes back
    c, out = calls(use_cache=True)  # a cache is asked for: every layer must fill it
    assert c == [2, 1] and out.past_key_values.get_seq_length() == ids.shape[1]
    c, out = calls(output_hidden_states=True)
    assert c == [2, 1] and len(out.hidden_states) == 3
    c, _ = calls(prompt_query=torch.randn(3, 32))  # no query pass: nothing to reuse
    assert c == [1, 1]
    layer0 = find_layers(model)[1][0]
    layer0.mlp.down_proj.weight.requires_grad_(True)  # unfrozen lower weights need the real pass through them
    c, out = calls(labels=ids.masked_fill(mask == 0, -100))
    assert c == [2, 1]
    out.loss.backward()
    assert layer0.mlp.down_proj.weight.grad is not None and layer0.mlp.down_proj.weight.grad.abs().sum() > 0


def test_cached_decoding_after_a_query_layer_prefill():
    """A prefill that fills a cache runs every layer (no reuse), and a decode step over that cache gives the
    logits of the full no-cache forward with the same query."""
    model = tiny_model("llama")
    ids, mask = make_inputs(batch=2, seq=5, padding="none", seed=4)
    prompt = fp.PromptPool(model, pool_size=4, length=2, top_k=2, placement="prefix", layers=[1], query_layer=1,
                           init_std=0.5)
    attach(model, prompt)
    with torch.no_grad():
        query = query_pass.compute(model, model.__dict__["_fastprompt_attach_state"], prompt,
                                   {"input_ids": ids, "attention_mask": mask})[0]
        first = model(ids, attention_mask=mask, use_cache=True)
        assert first.past_key_values.get_seq_length() == 5
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, attention_mask=torch.ones(2, 6, dtype=torch.long), past_key_values=first.past_key_values,
                     prompt_query=query)  # the model made its own cache: the prefill's query is not keyed to it
        full = model(torch.cat([ids, nxt], 1), attention_mask=torch.ones(2, 6, dtype=torch.long), prompt_query=query,
                     use_cache=False)
    assert rel_err(first.logits, full.logits[:, :5]) < 1e-6
    assert rel_err(step.logits[:, -1], full.logits[:, -1]) < 1e-5


# ---- the encoder ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["linear", "mlp"])
def test_builtin_encoders_start_as_the_identity_and_learn(encoder):
    model = tiny_model("llama")
    ids, mask = _inputs("llama")
    outs = {}
    for enc in (None, encoder):
        m = copy.deepcopy(model)
        prompt = fp.PromptPool(m, pool_size=5, length=2, top_k=None, placement="prefix", encoder=enc, init_std=0.5)
        attach(m, prompt)
        outs[enc] = m(ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(outs[encoder].logits, outs[None].logits, rtol=1e-6, atol=1e-6)
    outs[encoder].loss.backward()
    grads = [p.grad for p in prompt.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


class TwoLayerEncoder(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.a = nn.Linear(width, 8)
        self.b = nn.Linear(8, width)

    def forward(self, q):
        return self.b(torch.tanh(self.a(q)))


def test_custom_encoder_trains_saves_and_needs_its_module_on_load(tmp_path):
    model = tiny_model("bert")
    ids, mask = _inputs("bert")
    torch.manual_seed(0)
    prompt = fp.MultiTaskPrompt(model, num_tasks=2, pool_size=3, length=2, encoder=TwoLayerEncoder(),
                                query_layer=1, init_std=0.5)
    assert prompt.config.encoder == "custom" and prompt.config.encoder_class.endswith("TwoLayerEncoder")
    attach(model, prompt)
    tasks = torch.tensor([0, 1, 1])
    out = model(ids, attention_mask=mask, task_ids=tasks)
    out.logits.sum().backward()
    assert prompt.encoder.a.weight.grad is not None and prompt.encoder.a.weight.grad.abs().sum() > 0
    prompt.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="custom encoder .*TwoLayerEncoder.*pass the module"):
        load_prompt(str(tmp_path))
    with pytest.raises(ValueError, match="does not match its config"):
        load_prompt(str(tmp_path), encoder=TwoLayerEncoder(width=32).a)  # another module's weights
    for given in (TwoLayerEncoder, TwoLayerEncoder()):
        loaded = load_prompt(str(tmp_path), model, encoder=given)
        for k, v in prompt.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    detach(model)
    twin = copy.deepcopy(model)
    attach(model, prompt.eval())
    attach(twin, loaded.eval())
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask, task_ids=tasks).logits,
                           twin(ids, attention_mask=mask, task_ids=tasks).logits)


@pytest.mark.parametrize("kind", ["pool_linear", "pool_mlp", "selector_linear"])
def test_builtin_encoder_round_trip_is_exact(kind, tmp_path):
    model = tiny_model("llama")
    if kind.startswith("pool"):
        prompt = fp.PromptPool(model, pool_size=4, length=2, top_k=2, placement="prefix", layers=[1],
                               encoder=kind.split("_")[1], encoder_hidden_size=12, encoder_activation="gelu",
                               query_layer=1)
    else:
        prompt = fp.MultiTaskPrompt(model, num_tasks=2, pool_size=3, length=2, encoder="linear", query_layer=2)
    _perturb(prompt)
    prompt.save_pretrained(str(tmp_path))
    loaded = load_prompt(str(tmp_path), model)
    assert loaded.config == prompt.config
    for k, v in prompt.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(ValueError, match="has no custom encoder"):
        load_prompt(str(tmp_path), encoder=TwoLayerEncoder())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_selector_with_encoder_mixed_batch_equals_per_task_runs(family):
    model = tiny_model(family)
    prompt = fp.MultiTaskPrompt(model, num_tasks=3, pool_size=4, length=3, encoder="mlp", query_layer=1,
                                init_std=0.5)
    _perturb(prompt.encoder, 0.2)
    attach(model, prompt)
    ids, mask = make_inputs(batch=4, seq=5, padding="left" if family == "llama" else "right")
    tasks = torch.tensor([1, 0, 1, 2])
    weights = torch.randn(4, model.config.num_labels if family == "bert" else 5 * model.config.vocab_size,
                          generator=torch.Generator().manual_seed(3))

    def loss_of(logits, rows):
        flat = logits.reshape(len(rows), -1) if family == "bert" else logits[:, -5:].reshape(len(rows), -1)
        return (flat * weights[rows]).sum()

    out = model(ids, attention_mask=mask, task_ids=tasks)
    loss_of(out.logits, torch.arange(4)).backward()
    mixed = {n: p.grad.clone() for n, p in prompt.named_parameters() if p.grad is not None}
    zero_grads(prompt)
    for t in range(3):
        rows = torch.nonzero(tasks == t).flatten()
        part = model(ids[rows], attention_mask=mask[rows], task_ids=tasks[rows])
        torch.testing.assert_close(part.logits, out.logits[rows], rtol=1e-5, atol=1e-6)
        loss_of(part.logits, rows).backward()
    assert any(n.startswith("encoder.") for n in mixed)
    params = dict(prompt.named_parameters())
    assert_grads_close({n: params[n].grad for n in mixed}, mixed, 1e-5, norm=True)


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_bad_encoder_and_query_layer_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"query_layer must be an int in \[0, num_layers=2\]"):
        fp.PromptPool(model, query_layer=3)
    with pytest.raises(ValueError, match="query_layer must be"):
        fp.PromptPool(model, query_layer=-1)
    with pytest.raises(ValueError, match="query_layer does not apply to query='embeddings'"):
        fp.PromptPool(model, query="embeddings", query_layer=1)
    with pytest.raises(ValueError, match="encoder must be one of"):
        fp.PromptPool(model, encoder="lstm")
    with pytest.raises(ValueError, match="needs the module itself"):
        fp.PromptPool(model, encoder="custom")
    with pytest.raises(ValueError, match="encoder_activation must be one of"):
        fp.MultiTaskPrompt(model, encoder="linear", encoder_activation="swish")
    with pytest.raises(ValueError, match="variant='selector' only"):
        fp.MultiTaskPrompt(model, variant="mpt", encoder="linear")
    pool = fp.PromptPool(model, pool_size=4, length=2, top_k=2, encoder=nn.Linear(32, 16))
    attach(model, pool)
    ids, mask = _inputs("llama")
    with pytest.raises(ValueError, match=r"must map the query \[B, 32\] to \[B, 32\]; Linear returned \(3, 16\)"):
        model(ids, attention_mask=mask)
