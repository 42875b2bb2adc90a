"""query_layer=k on Vision Transformers: the query is the read-out of the model cut to its first k layers (the
hidden state entering layer k through the final norm / pooling head, then [CLS] or the token mean), and where every
prefix enters at layer >= k the real pass reuses the query pass's layers [0, k), which then run once per step.

Oracles, nothing of fastprompt in them (vision_helpers): the query from a float64 twin whose layer list is cut to k
layers; the outputs, losses and prompt gradients from the two-full-passes formulation (the full twin with the
prefixes concatenated, lower layers computed again). Layer calls are counted on the attention submodules.
"""

import copy

import pytest
import torch

import fastprompt as fp
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from test_vision_prompts import oracle_prompts
from vision_helpers import (LEADING_TOKENS, MODELS, NUM_LABELS, _layers, grads_of, grads_rel, oracle_query, oracle_twin, pixels,
                            readout, rel, run_oracle, tiny_vision_model)

LAYERS = 3
FAMILIES = [MODELS[0], MODELS[1], MODELS[2], MODELS[5], MODELS[6]]  # ViT, DeiT, DINOv2, CLIP's and SigLIP's towers


def cut_to(twin, k):
    """A copy of the twin with its first k layers only (final norm and pooling head kept)."""
    cut = copy.deepcopy(twin)
    layers = _layers(cut)
    owner = next(m for m in cut.modules() if any(child is layers for child in m.children()))
    name = next(n for n, child in owner.named_children() if child is layers)
    setattr(owner, name, torch.nn.ModuleList(list(layers)[:k]))
    return cut


class LayerCalls:
    """Calls of each layer's attention submodule: a layer the reuse stands in for never reaches it."""

    def __init__(self, model):
        self.calls = [0] * LAYERS
        for i, layer in enumerate(_layers(model)):
            attn = layer.attention if hasattr(layer, "attention") else layer.self_attn
            attn.register_forward_pre_hook(lambda module, args, i=i: self._count(i))

    def _count(self, i):
        self.calls[i] += 1

    def take(self):
        calls, self.calls = self.calls, [0] * LAYERS
        return calls


def make_pool(model, kind="hard", layers=(1, 2), query_layer=1, query="cls"):
    soft = {} if kind == "hard" else {"soft_weighting": "cosine"}
    prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=2 if kind == "hard" else None, placement="prefix",
                           layers=list(layers), query=query, query_layer=query_layer, **soft)
    with torch.no_grad():
        for name, p in prompt.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "attention_vectors" in name or "keys" in name else 0.3))
    return prompt


def run_both(family, head, kind="hard", layers=(1, 2), query_layer=1, query="cls", backend="torch", batch=3,
             **call):
    """(fastprompt's (output, loss), the two-pass oracle's, prompt gradients of each, layer calls of one step)."""
    model = tiny_vision_model(family, head, layers=LAYERS)
    prompt = make_pool(model, kind, layers, query_layer, query)
    twin = oracle_twin(model)
    P = {n: p.detach().double().clone().requires_grad_() for n, p in prompt.named_parameters()}
    counter = LayerCalls(model)
    fp.patch_model(model, prompt, backend=backend)
    x = pixels(batch)
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=torch.Generator().manual_seed(1))
    tokens = (16 // 4) ** 2 + LEADING_TOKENS[model.config.model_type]
    weights = torch.randn(batch, tokens, 32, generator=torch.Generator().manual_seed(2))
    kwargs = {"labels": labels} if head == "cls" else {}
    got, loss = readout(model(pixel_values=x, **kwargs, **call), head, labels, weights)
    if head != "cls" and prompt.aux_loss is not None:
        loss = loss + prompt.aux_loss
    loss.backward()
    calls = counter.take()

    q = oracle_query(cut_to(twin, query_layer), x, query)
    prefixes, _, aux = oracle_prompts(prompt, P, q, batch)
    want, ref_loss = readout(run_oracle(twin, x, labels if head == "cls" else None, prefixes), head, labels, weights)
    if aux is not None:
        ref_loss = ref_loss + aux
    ref_loss.backward()
    mine, theirs = grads_of(prompt.named_parameters()), grads_of(P.items())
    return (got, loss), (want, ref_loss), (mine, theirs), calls


def assert_equal_to_oracle(mine, theirs, grads):
    (got, loss), (want, ref_loss) = mine, theirs
    assert got.shape == want.shape
    assert rel(got, want) < 1e-5
    assert rel(loss.detach(), ref_loss.detach()) < 1e-5
    assert grads_rel(*grads) < 1e-4
    assert any(float(g.abs().sum()) > 0 for g in grads[0].values())


@pytest.mark.parametrize("name,family,head", FAMILIES, ids=[m[0] for m in FAMILIES])
@pytest.mark.parametrize("kind", ["hard", "cosine"])
def test_reused_lower_layers_equal_two_full_passes(name, family, head, kind):
    """Prefixes in layers 1-2, query_layer=1: a training step runs each layer once, and its outputs, loss and every
    prompt gradient equal the two-pass oracle's."""
    mine, theirs, grads, calls = run_both(family, head, kind)
    assert calls == [1, 1, 1]
    assert_equal_to_oracle(mine, theirs, grads)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_reuse_on_the_other_backends(backend):
    mine, theirs, grads, calls = run_both("vit", "cls", "hard", layers=(2,), query_layer=2, backend=backend)
    assert calls == [1, 1, 1]
    assert_equal_to_oracle(mine, theirs, grads)


def test_token_mean_query_of_the_cut_model():
    mine, theirs, grads, calls = run_both("dinov2", "features", "cosine", query="mean")
    assert calls == [1, 1, 1]
    assert_equal_to_oracle(mine, theirs, grads)


@pytest.mark.parametrize("name,family,head", [FAMILIES[0], FAMILIES[3], FAMILIES[4]],
                         ids=[FAMILIES[i][0] for i in (0, 3, 4)])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_query_is_the_read_out_of_the_model_cut_to_k_layers(name, family, head, k):
    """ViT: the final layer norm at [CLS]; CLIP: post_layernorm at [CLS]; SigLIP: the attention-pooling head."""
    model = tiny_vision_model(family, head, layers=LAYERS)
    twin = oracle_twin(model)
    prompt = make_pool(model, layers=(0, 1, 2), query_layer=k)
    seen = []
    encode = prompt.encode
    prompt.encode = lambda q: (seen.append(q.detach()), encode(q))[1]
    counter = LayerCalls(model)
    fp.patch_model(model, prompt)
    x = pixels(2)
    with torch.no_grad():
        model(pixel_values=x)
    assert rel(seen[-1], oracle_query(cut_to(twin, k), x)) < 1e-5
    # the query pass runs layers [0, k) only; a prefix in layer 0 leaves nothing to reuse
    assert counter.take() == [1 + (i < k) for i in range(LAYERS)]


def test_query_layer_num_layers_is_the_default_query():
    model = tiny_vision_model("vit", layers=LAYERS)
    x = pixels(3)
    outs = []
    for query_layer in (None, LAYERS):
        m = copy.deepcopy(model)
        torch.manual_seed(3)  # the same prompt values in both
        fp.patch_model(m, make_pool(m, layers=(0, 2), query_layer=query_layer))
        with torch.no_grad():
            outs.append(m(pixel_values=x).logits)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case", ["hidden-states", "prefix-below-k", "trainable-embeddings", "pixels-with-grad"])
def test_lower_layers_run_again_where_the_reuse_would_not_be_exact(case):
    """Still equal to the oracle; layers [0, k) run in both passes."""
    model = tiny_vision_model("vit", layers=LAYERS)
    twin = oracle_twin(model)
    layers = (0, 2) if case == "prefix-below-k" else (1, 2)
    prompt = make_pool(model, layers=layers, query_layer=1)
    P = {n: p.detach().double().clone().requires_grad_() for n, p in prompt.named_parameters()}
    counter = LayerCalls(model)
    fp.patch_model(model, prompt)
    if case == "trainable-embeddings":
        model.base_model.embeddings.cls_token.requires_grad_(True)
    x = pixels(3)
    if case == "pixels-with-grad":
        x.requires_grad_(True)
    out = model(pixel_values=x, output_hidden_states=case == "hidden-states")
    out.logits.square().mean().backward()
    assert counter.take() == [2, 1, 1]
    q = oracle_query(cut_to(twin, 1), x.detach())
    prefixes, _, _ = oracle_prompts(prompt, P, q, 3)
    ref = run_oracle(twin, x.detach(), None, prefixes)
    assert rel(out.logits, ref.logits) < 1e-5
    if case == "hidden-states":
        with torch.no_grad():  # below the prefixes: the model's own hidden states without prompts
            plain = twin.base_model(pixel_values=x.detach().double(), output_hidden_states=True).hidden_states
        assert len(out.hidden_states) == LAYERS + 1
        assert all(rel(out.hidden_states[i], plain[i]) < 1e-5 for i in (0, 1))
    ref.logits.square().mean().backward()
    mine = {n: p.grad for n, p in prompt.named_parameters() if n == "pool"}
    assert grads_rel(mine, {n: P[n].grad for n in mine}) < 1e-4


def test_unpatch_removes_every_layer_forward():
    model = tiny_vision_model("deit", layers=LAYERS)
    x = pixels(2)
    with torch.no_grad():
        before = model(pixel_values=x).logits
    fp.patch_model(model, make_pool(model, query_layer=1))
    assert all("forward" in layer.__dict__ for layer in _layers(model))
    fp.unpatch_model(model)
    assert not any("forward" in layer.__dict__ for layer in _layers(model))
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, before)
