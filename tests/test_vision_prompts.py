"""fastprompt's own prompts on Hugging Face Vision Transformers (ViT, DeiT, DINOv2) vs the reference
implementations' semantics written out eagerly in float64 (vision_helpers: concatenated prefix K/V, plain softmax;
input-level prompts after [CLS] / DeiT's distillation token, after the position embedding; the pool query = the
frozen model's [CLS] pre-logits without prompts). Logits, losses and every prompt gradient, every backend."""

import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from vision_helpers import (LEADING_TOKENS, MODELS, NUM_LABELS, assert_grads_match, assert_threads_match_serial, cos_rows, oracle_query, oracle_twin,
                            pixels, readout, rel, run_oracle, tiny_vision_model)

INPUT_KINDS = ["tuning", "pool-input-hard", "pool-input-soft"]
PREFIX_KINDS = ["prefix-reparam", "ptuning-v2", "pool-prefix-hard", "pool-prefix-cosine", "pool-prefix-softmax"]


def make_prompt(kind, model):
    if kind == "tuning":
        prompt = fp.PromptTuning(model, num_virtual_tokens=3)
    elif kind == "pool-input-hard":
        prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=2, query="cls")
    elif kind == "pool-input-soft":
        prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=None, query="cls")
    elif kind == "prefix-reparam":
        prompt = fp.PrefixTuning(model, num_virtual_tokens=3, encoder_hidden_size=16)
    elif kind == "ptuning-v2":  # a shared prefix in one layer
        prompt = fp.PTuningV2(model, num_virtual_tokens=3, layers=[1], prefix_dropout=0.0)
    elif kind == "pool-prefix-hard":  # L2P / DualPrompt's E-prompt style: top-k entries by key, read in place
        prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=2, placement="prefix", query="cls")
    elif kind == "pool-prefix-cosine":  # CODA-Prompt's weights: cos(q * A_n, K_n), no softmax
        prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=None, soft_weighting="cosine",
                               placement="prefix", layers=[0], query="cls")
    elif kind == "pool-prefix-softmax":
        prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=None, placement="prefix", query="cls",
                               temperature=0.5)
    else:
        raise KeyError(kind)
    with torch.no_grad():  # generic values: no all-ones attention vectors, prompts as large as the tokens
        for name, p in prompt.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "attention_vectors" in name or "keys" in name else 0.3))
    return prompt


def oracle_prompts(prompt, P, q, batch):
    """(prefixes {layer: (K [B, H, P, D], V)}, input prompts [B, P, d] or None, aux loss or None) written out per
    row from the float64 copies P of the prompt's parameters."""
    c = prompt.config
    if isinstance(prompt, fp.PromptTuning):
        return {}, torch.stack([P["embedding"]] * batch), None
    if isinstance(prompt, fp.PrefixTuning):
        if c.reparameterize:
            h = torch.tanh(P["embedding"] @ P["encoder.0.weight"].T + P["encoder.0.bias"])
            flat = h @ P["encoder.2.weight"].T + P["encoder.2.bias"]
            kv = flat.view(c.num_virtual_tokens, len(prompt.layers), 2, c.num_kv_heads, c.head_dim)
            per_layer = [(kv[:, i, 0].transpose(0, 1), kv[:, i, 1].transpose(0, 1)) for i in range(len(prompt.layers))]
        else:
            per_layer = [(P["prefix"][i, 0], P["prefix"][i, 1]) for i in range(len(prompt.layers))]
        return {layer: (torch.stack([k] * batch), torch.stack([v] * batch))
                for layer, (k, v) in zip(prompt.layers, per_layer)}, None, None
    assert isinstance(prompt, fp.PromptPool)
    hard = c.top_k is not None
    cosine = not hard and c.soft_weighting == "cosine"
    sim = cos_rows(q, P["keys"], P["attention_vectors"] if cosine else None)
    aux = None
    if hard:
        index = [sim[b].topk(c.top_k).indices.tolist() for b in range(batch)]
        aux = -c.pull_constraint_coeff * torch.stack([sim[b, j] for b in range(batch) for j in index[b]]).mean()
    else:
        weights = sim if cosine else torch.softmax(sim / c.temperature, dim=-1)

    def per_row(entry):  # entry(n) -> one pool entry; hard: chosen entries end to end, soft: the mixture
        if hard:
            return [torch.cat([entry(n) for n in index[b]], dim=-2) for b in range(batch)]
        return [sum(weights[b, n] * entry(n) for n in range(c.pool_size)) for b in range(batch)]

    if c.placement == "input":
        return {}, torch.stack(per_row(lambda n: P["pool"][n])), aux
    prefixes = {}
    for i, layer in enumerate(prompt.layers):
        prefixes[layer] = tuple(torch.stack(per_row(lambda n, kv=kv: P["pool"][i, kv, n])) for kv in (0, 1))
    return prefixes, None, aux


def check_against_oracle(name, family, head, kind, backend="torch", batch=3):
    model = tiny_vision_model(family, head)
    prompt = make_prompt(kind, model)
    twin = oracle_twin(model)
    P = {n: p.detach().double().clone().requires_grad_() for n, p in prompt.named_parameters()}
    fp.patch_model(model, prompt, backend=backend)
    x = pixels(batch)
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=torch.Generator().manual_seed(1))
    tokens = (16 // 4) ** 2 + LEADING_TOKENS[model.config.model_type] + prompt.num_input_tokens()
    weights = torch.randn(batch, tokens, 32, generator=torch.Generator().manual_seed(2))
    kwargs = {"labels": labels} if head == "cls" else {}
    out = model(pixel_values=x, **kwargs)
    got, loss = readout(out, head, labels, weights)
    if head != "cls" and prompt.aux_loss is not None:  # no model loss to add the key-pull loss to
        loss = loss + prompt.aux_loss
    loss.backward()

    q = oracle_query(twin, x)
    prefixes, inputs, aux = oracle_prompts(prompt, P, q, batch)
    ref = run_oracle(twin, x, labels if head == "cls" else None, prefixes, inputs)
    want, ref_loss = readout(ref, head, labels, weights)
    if aux is not None:
        ref_loss = ref_loss + aux
    ref_loss.backward()

    assert got.shape == want.shape
    assert rel(got, want) < 1e-5, (name, kind, backend)
    assert rel(loss.detach(), ref_loss.detach()) < 1e-5
    mine, theirs = assert_grads_match(prompt, P, what=(name, kind, backend))
    assert any(float(g.abs().sum()) > 0 for g in mine.values())
    return model, prompt


@pytest.mark.parametrize("name,family,head", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("kind", INPUT_KINDS + PREFIX_KINDS)
def test_prompts_match_the_eager_oracle(name, family, head, kind):
    check_against_oracle(name, family, head, kind)


BACKEND_MODELS = [MODELS[0], MODELS[2], MODELS[5], MODELS[6]]  # ViT, DINOv2, CLIP, SigLIP


@pytest.mark.parametrize("name,family,head", BACKEND_MODELS, ids=[m[0] for m in BACKEND_MODELS])
@pytest.mark.parametrize("kind", ["ptuning-v2", "pool-prefix-hard", "pool-prefix-cosine"])
def test_prefix_prompts_reference_backend(name, family, head, kind):
    check_against_oracle(name, family, head, kind, backend="reference")


# The Triton interpreter takes ~20 s a case: each family once, each prefix kind at least once.
TRITON_CASES = [(MODELS[0], "pool-prefix-hard"), (MODELS[2], "pool-prefix-cosine"), (MODELS[5], "ptuning-v2"),
                (MODELS[6], "pool-prefix-hard")]


@pytest.mark.parametrize("spec,kind", TRITON_CASES, ids=[f"{m[0]}-{k}" for m, k in TRITON_CASES])
def test_prefix_prompts_triton_backend(spec, kind):
    check_against_oracle(*spec, kind, backend="triton")


def test_hard_pool_query_and_selection_are_the_cls_pre_logits():
    model = tiny_vision_model("vit")
    prompt = make_prompt("pool-prefix-hard", model)
    twin = oracle_twin(model)
    fp.patch_model(model, prompt)
    x = pixels(4)
    model(pixel_values=x)
    q = oracle_query(twin, x).float()
    want = cos_rows(q, prompt.keys.detach()).topk(2, dim=-1).indices
    assert torch.equal(prompt.last_index, want)
    # an explicit query takes the place of the query pass
    model(pixel_values=x, prompt_query=-q)
    assert torch.equal(prompt.last_index, cos_rows(-q, prompt.keys.detach()).topk(2, dim=-1).indices)


@pytest.mark.parametrize("kind", ["tuning", "pool-prefix-hard"])
def test_unpatch_restores_the_model(kind):
    model = tiny_vision_model("deit")
    x = pixels(2)
    with torch.no_grad():
        before = model(pixel_values=x).logits
    prompt = make_prompt(kind, model)
    fp.patch_model(model, prompt)
    with torch.no_grad():
        assert rel(model(pixel_values=x).logits, before) > 1e-4  # the prompt changes the output
    fp.unpatch_model(model)
    assert not model.base_model.embeddings._forward_hooks
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, before)


def test_input_prompts_keep_cls_first_and_extend_a_given_mask():
    model = tiny_vision_model("vit", "features")
    prompt = make_prompt("tuning", model)
    twin = oracle_twin(model)
    fp.patch_model(model, prompt)
    x = pixels(2)
    mask = torch.ones(2, 17, dtype=torch.long)
    out = model(pixel_values=x, attention_mask=mask, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 1 + 3 + 16, 32)
    emb = out.hidden_states[0]
    no_prompt = twin.base_model.embeddings(x.double())
    assert rel(emb[:, :1], no_prompt[:, :1]) < 1e-6 and rel(emb[:, 4:], no_prompt[:, 1:]) < 1e-6
    assert rel(emb[:, 1:4], prompt.embedding.detach().expand(2, -1, -1)) < 1e-6


def test_bad_inputs_are_refused_clearly():
    model = tiny_vision_model("vit")
    with pytest.raises(ValueError, match="query='cls'"):
        fp.patch_model(model, fp.PromptPool(model, pool_size=3, length=2, top_k=1, query="embeddings"))
    with pytest.raises(ValueError, match="query_layer must be"):  # query_layer itself: test_vision_query_layer
        fp.patch_model(model, fp.PromptPool(model, pool_size=3, length=2, top_k=1, query="cls", query_layer=3))
    fp.patch_model(model, fp.PrefixTuning(model, num_virtual_tokens=2, reparameterize=False))
    with pytest.raises(ValueError, match="pixel_values"):
        model(labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="task_ids"):
        model(pixel_values=pixels(1), task_ids=torch.tensor([0]))


def test_peft_is_not_offered_for_pixel_models():
    from fastprompt.integrations.families import pixel_model_types, supported_model_types

    assert set(pixel_model_types()) >= {"vit", "deit", "dinov2"}
    assert not set(pixel_model_types()) & set(supported_model_types())


def test_image_text_models_take_the_prompt_in_their_vision_tower():
    import transformers

    vision = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    torch.manual_seed(0)
    model = transformers.CLIPForImageClassification(
        transformers.CLIPConfig(vision_config=vision, text_config=text, num_labels=3)).eval()
    prompt = make_prompt("pool-prefix-hard", model.vision_model)
    with pytest.raises(TypeError, match="model.vision_model"):
        fp.patch_model(model, prompt)
    fp.patch_model(model.vision_model, prompt)
    x = pixels(2)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        tower = model.vision_model(pixel_values=x).last_hidden_state  # the patched tower, called directly
    assert torch.allclose(logits, model.classifier(tower[:, 1:].mean(dim=1)), atol=1e-6)


def test_input_prompts_from_threads_stay_with_their_call():
    model = tiny_vision_model("vit")
    prompt = make_prompt("pool-input-hard", model)
    fp.patch_model(model, prompt)
    batches = [pixels(b, seed=b) for b in (1, 2, 3, 4)]
    assert_threads_match_serial(lambda x: model(pixel_values=x).logits, batches, repeats=5)


@pytest.mark.parametrize("kind", ["pool-input-hard", "pool-prefix-hard"])
def test_gradient_checkpointing_and_copies_give_the_same_results(kind):
    import copy
    import pickle

    model = tiny_vision_model("dinov2")
    prompt = make_prompt(kind, model)
    fp.patch_model(model, prompt)
    x, labels = pixels(3), torch.tensor([0, 1, 2])
    model.train()
    model(pixel_values=x, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in prompt.named_parameters() if p.grad is not None}
    prompt.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(pixel_values=x, labels=labels).loss.backward()
    for n, g in plain.items():
        assert torch.allclose(prompt.get_parameter(n).grad, g, rtol=1e-5, atol=1e-7), n
    model.gradient_checkpointing_disable()
    model.eval()
    with torch.no_grad():
        want = model(pixel_values=x).logits
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(twin(pixel_values=x).logits, want)
