"""Prefix-placement prompts vs a hand-written eager attention over explicitly concatenated [prefix; sequence] K/V
(prompts_helpers.REFERENCE_PREFIXES), with the prefixes written out per row from the prompt's own parameters."""

import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp
from fastprompt.integrations.prompt_attach import attach

import prompts_helpers as H
from gradient_checks import assert_grads_close
from integration_helpers import greedy_no_cache
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from prompts_helpers import make_inputs, positions_from_mask, prompt_grads, reference_copy, tiny_model, zero_grads


def _query(twin, ids, mask, mode):
    H.REFERENCE_PREFIXES.clear()  # the query pass runs without prompts
    with torch.no_grad():
        hidden = twin.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        return hidden[:, -1]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def _reference_prefixes(prompt, twin, ids, mask):
    """{layer: (K [B, Hkv, P, D], V)} written out per row."""
    B = ids.shape[0]
    c = prompt.config
    out = {}
    if isinstance(prompt, fp.PrefixTuning):
        if c.reparameterize:
            lin1, lin2 = prompt.encoder[0], prompt.encoder[2]
            flat = torch.tanh(prompt.embedding @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
            kv = flat.view(c.num_virtual_tokens, len(prompt.layers), 2, c.num_kv_heads, c.head_dim)
            per_layer = [(kv[:, i, 0].transpose(0, 1), kv[:, i, 1].transpose(0, 1)) for i in range(len(prompt.layers))]
        else:
            per_layer = [(prompt.prefix[i, 0], prompt.prefix[i, 1]) for i in range(len(prompt.layers))]
        for i, layer in enumerate(prompt.layers):
            k, v = per_layer[i]
            out[layer] = (torch.stack([k] * B), torch.stack([v] * B))
        return out
    assert isinstance(prompt, fp.PromptPool)
    q = _query(twin, ids, mask, c.query)
    N = c.pool_size
    if c.top_k is None and c.soft_weighting == "cosine":
        w = torch.stack([torch.stack([F.cosine_similarity(q[b] * prompt.attention_vectors[n], prompt.keys[n], dim=0)
                                      for n in range(N)]) for b in range(B)])
    else:
        cos = torch.stack([torch.stack([F.cosine_similarity(q[b], prompt.keys[n], dim=0) for n in range(N)])
                           for b in range(B)])
        w = torch.softmax(cos / c.temperature, dim=-1)
    for i, layer in enumerate(prompt.layers):
        ks, vs = [], []
        for b in range(B):
            if c.top_k is not None:
                idx = cos[b].topk(c.top_k).indices
                ks.append(torch.cat([prompt.pool[i, 0, int(n)] for n in idx], dim=1))
                vs.append(torch.cat([prompt.pool[i, 1, int(n)] for n in idx], dim=1))
            else:
                ks.append(sum(w[b, n] * prompt.pool[i, 0, n] for n in range(N)))
                vs.append(sum(w[b, n] * prompt.pool[i, 1, n] for n in range(N)))
        out[layer] = (torch.stack(ks), torch.stack(vs))
    aux = None
    if c.top_k is not None and c.add_aux_loss:
        aux = -c.pull_constraint_coeff * cos.topk(c.top_k, dim=-1).values.mean()
    return out, aux


def _make(kind, model):
    if kind == "prefix_reparam":
        return fp.PrefixTuning(model, num_virtual_tokens=3, encoder_hidden_size=16)
    if kind == "prefix_layer1":
        return fp.PrefixTuning(model, num_virtual_tokens=2, reparameterize=False, layers=[1], init_std=0.5)
    if kind == "ptuning_v2":
        return fp.PTuningV2(model, num_virtual_tokens=4, init_std=0.5)
    if kind == "pool_hard":
        return fp.PromptPool(model, pool_size=5, length=2, top_k=2, placement="prefix", init_std=0.5)
    if kind == "pool_hard_layer0":
        return fp.PromptPool(model, pool_size=4, length=3, top_k=1, placement="prefix", layers=[0], init_std=0.5,
                             query="last")
    if kind == "pool_soft":
        return fp.PromptPool(model, pool_size=4, length=2, top_k=None, placement="prefix", temperature=0.2,
                             init_std=0.5)
    if kind == "pool_coda":
        p = fp.PromptPool(model, pool_size=4, length=2, top_k=None, placement="prefix", soft_weighting="cosine",
                          init_std=0.5)
        with torch.no_grad():
            p.attention_vectors.uniform_(0.5, 1.5)
        return p
    raise KeyError(kind)


def _reference(prompt, twin, ids, mask, **kw):
    ref = _reference_prefixes(prompt, twin, ids, mask)
    prefixes, aux = ref if isinstance(ref, tuple) else (ref, None)
    H.REFERENCE_PREFIXES.clear()
    H.REFERENCE_PREFIXES.update(prefixes)
    try:
        out = twin(input_ids=ids, attention_mask=mask, **kw)
    finally:
        H.REFERENCE_PREFIXES.clear()
    loss = out.loss + aux if (aux is not None and out.loss is not None) else out.loss
    return out.logits, loss


def _check(family, kind, padding="left"):
    model = tiny_model(family)
    twin = reference_copy(model)
    prompt = _make(kind, model)
    prompt.eval()  # no prefix dropout: exact comparison
    ids, mask = make_inputs(batch=3, seq=5, padding=padding)
    # Causal LM labels: also drop the token predicted from a padding position (a query that sees no real key).
    after_pad = F.pad(mask[:, :-1], (1, 0), value=1) == 0
    encoder = family in ("bert", "roberta")
    labels = torch.tensor([1, 0, 2]) if encoder else ids.masked_fill((mask == 0) | after_pad, -100)
    attach(model, prompt)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    got = prompt_grads(prompt)
    zero_grads(prompt)
    ref_logits, ref_loss = _reference(prompt, twin, ids, mask, labels=labels)
    ref_loss.backward()
    want = prompt_grads(prompt)
    real = mask.bool() if not encoder else slice(None)  # a padding query with no visible key: undefined
    torch.testing.assert_close(out.logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and got
    assert_grads_close(got, want, 1e-4)


@pytest.mark.parametrize("kind", ["prefix_reparam", "prefix_layer1", "ptuning_v2", "pool_hard", "pool_hard_layer0",
                                  "pool_soft", "pool_coda"])
def test_prefix_placement_llama(kind):
    _check("llama", kind)


@pytest.mark.parametrize("family, kind", [("gpt2", "prefix_reparam"), ("gpt2", "pool_hard"),
                                          ("bert", "ptuning_v2"), ("bert", "pool_soft"), ("roberta", "pool_hard"),
                                          ("mistral", "ptuning_v2"), ("qwen3", "pool_soft"),
                                          ("gemma2", "prefix_reparam")])
def test_prefix_placement_other_families(family, kind):
    _check(family, kind, padding="right")


def test_prefix_dropout_only_in_training():
    model = tiny_model("llama")
    prompt = fp.PTuningV2(model, num_virtual_tokens=4, init_std=0.5, prefix_dropout=0.5)
    attach(model, prompt)
    ids, mask = make_inputs(batch=2, seq=4)
    prompt.eval()
    a = model(ids, attention_mask=mask).logits
    b = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    prompt.train()
    torch.manual_seed(0)
    c = model(ids, attention_mask=mask).logits
    assert not torch.allclose(a, c)


def _greedy_reference(prompt, twin, ids, mask, steps):
    """No-cache greedy decoding over the unpatched twin whose attention concatenates the reference prefixes."""
    with torch.no_grad():
        ref = _reference_prefixes(prompt, twin, ids, mask)
    prefixes = ref[0] if isinstance(ref, tuple) else ref
    H.REFERENCE_PREFIXES.update(prefixes)
    try:
        return greedy_no_cache(twin, ids, mask, steps, pad=H.PAD, eos=H.EOS)
    finally:
        H.REFERENCE_PREFIXES.clear()


@pytest.mark.parametrize("kind", ["prefix_reparam", "pool_hard", "pool_soft"])
def test_generate_prefix_placement(kind):
    model = tiny_model("llama")
    twin = reference_copy(model)
    prompt = _make(kind, model)
    ids, mask = make_inputs(batch=3, seq=5, padding="left")
    attach(model, prompt)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = _greedy_reference(prompt, twin, ids, mask, 4)
    assert torch.equal(got, want)
