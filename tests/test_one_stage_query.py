"""The one-stage query (query_pass="one_stage", OS-Prompt, ECCV 2024) on Vision Transformers: one forward through
the encoder layers instead of two, and the prompts each row gets equal OS-Prompt's rule written out by hand.

OS-Prompt's rule (its code, a fork of CODA-Prompt's: the ViT calls `prompt.forward(q, i, x_block)` before block i,
and the prompt takes `x_block[:, 0, :]` as the query of block i's prompt, not detached). The oracle is the float64
twin of vision_helpers (concatenated prefix K/V, plain softmax) with a pre-hook on each twin layer that reads the
[CLS] of the hidden state entering it and builds that layer's prefix from the float64 copies of the parameters,
per the method's formula (CODA: cos(q * A, K) weights, per layer; DualPrompt and PromptPool pick once, entering their
first prompted layer, for all their layers). Nothing of fastprompt runs in the oracle.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers

import fastprompt as fp
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from vision_helpers import ORACLE, NUM_LABELS, assert_grads_match, assert_threads_match_serial, cos_rows, oracle_twin, pixels, rel, run_oracle, \
    tiny_vision_model

LAYERS = 5


def _layers(model):
    base = model.base_model
    if hasattr(base, "layers"):
        return base.layers
    return base.encoder.layers if hasattr(base.encoder, "layers") else base.encoder.layer


def _labels(batch):
    return torch.randint(0, NUM_LABELS, (batch,), generator=torch.Generator().manual_seed(3))


def _copies(prompt):
    return {n: p.detach().double().clone().requires_grad_(p.requires_grad) for n, p in prompt.named_parameters()}


def _perturb(prompt, scale=0.3):
    with torch.no_grad():  # generic values, off the initialization
        for p in prompt.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def _coda(model, **kw):
    kw.setdefault("query_pass", "one_stage")
    kw.setdefault("ortho_mu", 0.1)
    return fp.CodaPrompt(model, pool_size=6, num_tasks=3, length=4, **kw)


def _dual(model, **kw):
    kw.setdefault("query_pass", "one_stage")
    return fp.DualPrompt(model, g_length=2, e_length=3, pool_size=4, **kw)


# ---------------------------------------------------------------------------------------------------------------
# OS-Prompt's rule, by hand


def coda_rule(prompt, P, training):
    """layer -> (q [B, d] -> (K [B, H, P/2, D], V)), and the orthogonality penalty (training)."""
    c = prompt.config
    t = prompt.task

    def used(name, i):
        return torch.cat([P[f"{name}.{s}"][i].detach() if (training and s < t) else P[f"{name}.{s}"][i]
                          for s in range(t + 1)], dim=0)

    def build(i):
        def prefix(q):
            K, A, p = used("keys", i), used("attention_vectors", i), used("components", i)
            aq_k = torch.einsum("bkd,kd->bk", F.normalize(torch.einsum("bd,kd->bkd", q, A), dim=2),
                                F.normalize(K, dim=1))
            P_ = torch.einsum("bk,kld->bld", aq_k, p)
            half = c.length // 2
            return tuple(E.reshape(q.shape[0], -1, c.num_kv_heads, c.head_dim).permute(0, 2, 1, 3)
                         for E in (P_[:, :half], P_[:, half:]))
        return prefix

    aux = None
    if training and c.ortho_mu > 0:  # as CodaPrompt: no penalty (aux_loss None) without its weight
        aux = 0.0
        for i in range(len(c.layers)):
            for T in (used("keys", i), used("attention_vectors", i), used("components", i).reshape(
                    used("components", i).shape[0], -1)):
                aux = aux + ((T @ T.T - torch.eye(T.shape[0], dtype=T.dtype)) ** 2).mean() * c.ortho_mu
    return {layer: build(i) for i, layer in enumerate(c.layers)}, aux


def run_rule(twin, x, labels, rule, fixed=None):
    """The twin with OS-Prompt's loop: entering layer l, `rule[l]([CLS] of the hidden state)` is layer l's prefix."""
    handles = []
    for l, make in rule.items():
        def hook(module, args, kwargs, l=l, make=make):
            hidden = args[0] if args else kwargs["hidden_states"]
            ORACLE["prefixes"][l] = make(hidden[:, 0])
        handles.append(_layers(twin)[l].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return run_oracle(twin, x, labels, fixed or {})
    finally:
        for h in handles:
            h.remove()


def _compare(model, prompt, twin, P, x, labels, rule, fixed=None, aux=None, **call):
    out = model(pixel_values=x, labels=labels, **call)
    out.loss.backward()
    ref = run_rule(twin, x, labels, rule, fixed)
    ref_loss = ref.loss + aux() if aux is not None else ref.loss
    ref_loss.backward()
    assert rel(out.logits, ref.logits) < 1e-5
    assert rel(out.loss, ref_loss) < 1e-5
    mine, theirs = assert_grads_match(prompt, P)
    return mine, theirs


# ---------------------------------------------------------------------------------------------------------------
# CODA-Prompt (OS-Prompt's own setting)


# ortho_mu=0: the orthogonality penalty's gradient dominates the components' gradient scale, so only without it
# would a detached query (a different rule) stand out in training
@pytest.mark.parametrize("task,training,ortho_mu", [(0, True, 0.1), (1, True, 0.1), (1, True, 0.0), (1, False, 0.1)])
def test_coda_one_stage_matches_os_prompts_rule(task, training, ortho_mu):
    model = tiny_vision_model("vit", "cls", layers=LAYERS)
    prompt = _coda(model, ortho_mu=ortho_mu)
    for t in range(task + 1):
        if t:
            prompt.next_task()
        _perturb(prompt)
    twin = oracle_twin(model)
    P = _copies(prompt)
    fp.patch_model(model, prompt)
    model.train(training)
    x, labels = pixels(3), _labels(3)
    rule, aux = coda_rule(prompt, P, training)
    mine, _ = _compare(model, prompt, twin, P, x, labels, rule, aux=(lambda: aux) if aux is not None else None)
    # the weights each row got in each layer: OS-Prompt's, from the [CLS] entering that layer of this very pass
    assert sorted(prompt.last_weights) == list(prompt.config.layers)
    for name in ("components", "keys", "attention_vectors"):
        for t in range(prompt.config.num_tasks):
            assert (float(mine[f"{name}.{t}"].abs().sum()) > 0) == (t == task), (name, t)


def test_coda_one_stage_weights_are_those_of_the_cls_entering_each_layer():
    model = tiny_vision_model("vit", "cls", layers=LAYERS)
    prompt = _coda(model)
    _perturb(prompt)
    twin = oracle_twin(model)
    P = _copies(prompt)
    fp.patch_model(model, prompt)
    x = pixels(4)
    rule, _ = coda_rule(prompt, P, training=False)
    entering = {}
    for l in rule:
        def record(module, args, kwargs, l=l):
            entering[l] = (args[0] if args else kwargs["hidden_states"])[:, 0]
        _layers(twin)[l].register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(pixel_values=x)
        run_rule(twin, x, None, rule)
    for i, l in enumerate(prompt.config.layers):
        q = entering[l]
        want = cos_rows(q, P["keys.0"][i], P["attention_vectors.0"][i])
        assert rel(prompt.last_weights[l], want) < 1e-5, l
    # entering layer 0, the [CLS] is the [CLS] token plus its position embedding: the same for every image
    assert torch.allclose(prompt.last_weights[0], prompt.last_weights[0][:1].expand(4, -1))
    assert not torch.allclose(prompt.last_weights[1], prompt.last_weights[1][:1].expand(4, -1))


@pytest.mark.parametrize("family,head", [("dinov2", "cls"), ("clip", "features")])
def test_coda_one_stage_on_other_families(family, head):
    model = tiny_vision_model(family, head, layers=3)
    prompt = fp.CodaPrompt(model, pool_size=4, num_tasks=2, length=2, layers=(0, 1, 2), query_pass="one_stage")
    _perturb(prompt)
    twin = oracle_twin(model)
    P = _copies(prompt)
    fp.patch_model(model, prompt)
    x = pixels(2)
    rule, _ = coda_rule(prompt, P, training=False)
    out = model(pixel_values=x)
    ref = run_rule(twin, x, None, rule)
    got = out.logits if head == "cls" else out.last_hidden_state
    want = ref.logits if head == "cls" else ref.last_hidden_state
    assert rel(got, want) < 1e-5
    got.square().mean().backward()
    want.square().mean().backward()
    mine, theirs = assert_grads_match(prompt, P)


# ---------------------------------------------------------------------------------------------------------------
# DualPrompt and PromptPool: one pick, entering the first prompted layer


def dual_rule(prompt, P, task, record):
    c = prompt.config
    first = c.e_layers[0]
    chosen = {}

    def pick(q):
        sim = cos_rows(q, P["e_keys"])
        index = [task] * q.shape[0] if task is not None else [int(sim[b].argmax()) for b in range(q.shape[0])]
        chosen["index"] = index
        chosen["pull"] = -c.pull_constraint_coeff * sum(sim[b, index[b]] for b in range(q.shape[0])) / q.shape[0]
        record.append(index)
        return index

    def e_prefix(i, layer):
        def prefix(q):
            index = pick(q) if layer == first else chosen["index"]
            return tuple(torch.stack([P["e_pool"][i, kv, index[b]] for b in range(q.shape[0])]) for kv in (0, 1))
        return prefix

    rule = {layer: e_prefix(i, layer) for i, layer in enumerate(c.e_layers)}
    return rule, (lambda batch: {layer: (torch.stack([P["g_prompt"][i, 0]] * batch),
                                         torch.stack([P["g_prompt"][i, 1]] * batch))
                                 for i, layer in enumerate(c.g_layers)}), (lambda: chosen["pull"])


@pytest.mark.parametrize("phase", ["training", "inference"])
def test_dualprompt_one_stage_matches_os_prompts_rule(phase):
    model = tiny_vision_model("vit", "cls", layers=LAYERS)
    prompt = _dual(model)
    _perturb(prompt)
    twin = oracle_twin(model)
    fp.patch_model(model, prompt)
    x, labels = pixels(6), _labels(6)
    entering = []
    hook = _layers(model)[2].register_forward_pre_hook(
        lambda module, args, kwargs: entering.append((args[0] if args else kwargs["hidden_states"])[:, 0]),
        with_kwargs=True)
    with torch.no_grad():  # key n: row n's own part of its [CLS] entering layer 2 (their common part projected
        model(pixel_values=x)  # out, as it dominates): rows 0-3 pick entries 0-3 by a margin far above rounding
        q = entering[0]
        common = F.normalize(q.mean(dim=0), dim=0)
        own = q[:4] - q.mean(dim=0)
        prompt.e_keys.copy_(own - (own @ common)[:, None] * common)
    hook.remove()
    P = _copies(prompt)
    task = 2 if phase == "training" else None
    model.train(phase == "training")
    picked = []
    rule, fixed, pull = dual_rule(prompt, P, task, picked)
    call = {"task_ids": torch.tensor(task)} if task is not None else {}
    mine, theirs = _compare(model, prompt, twin, P, x, labels, rule, fixed(6), aux=pull, **call)
    assert prompt.last_index.tolist() == picked[-1]
    if phase == "inference":
        assert picked[-1][:4] == [0, 1, 2, 3]
    # the query is not detached (OS-Prompt's x_block[:, 0, :]): the key-pull loss reaches the G-prompt through it.
    # The same rule with a detached query gives the G-prompt another gradient.
    P2 = _copies(prompt)
    rule2, fixed2, pull2 = dual_rule(prompt, P2, task, [])
    detached = {l: (lambda q, f=f: f(q.detach())) for l, f in rule2.items()}
    (run_rule(twin, x, labels, detached, fixed2(6)).loss + pull2()).backward()
    assert rel(P2["g_prompt"].grad, theirs["g_prompt"]) > 1e-3


def test_prompt_pool_one_stage_picks_entering_its_first_layer():
    model = tiny_vision_model("vit", "cls", layers=3)
    prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=2, placement="prefix", layers=[1, 2], query="cls",
                           query_pass="one_stage", pull_reduction="l2p")
    _perturb(prompt)
    twin = oracle_twin(model)
    P = _copies(prompt)
    fp.patch_model(model, prompt)
    x, labels = pixels(4), _labels(4)
    chosen = {}

    def prefix(i):
        def make(q):
            if i == 0:
                sim = cos_rows(q, P["keys"])
                chosen["index"] = [sim[b].topk(2).indices.tolist() for b in range(q.shape[0])]
                chosen["pull"] = -0.1 * torch.stack([sim[b, j] for b in range(q.shape[0])
                                                     for j in chosen["index"][b]]).sum() / q.shape[0]
            idx = chosen["index"]
            return tuple(torch.stack([torch.cat([P["pool"][i, kv, n] for n in idx[b]], dim=-2)
                                      for b in range(q.shape[0])]) for kv in (0, 1))
        return make

    _compare(model, prompt, twin, P, x, labels, {1: prefix(0), 2: prefix(1)}, aux=lambda: chosen["pull"])
    assert prompt.last_index.tolist() == chosen["index"]


# ---------------------------------------------------------------------------------------------------------------
# one forward


def _count_layer_calls(model):
    counts = []
    for layer in _layers(model):
        layer.register_forward_pre_hook(lambda *a: counts.append(1))
    return counts


@pytest.mark.parametrize("make", [_coda, _dual], ids=["coda", "dual"])
def test_one_stage_runs_the_encoder_layers_once(make):
    x = pixels(2)
    for query_pass, passes in (("one_stage", 1), ("two_pass", 2)):
        model = tiny_vision_model("vit", "cls", layers=LAYERS)
        prompt = make(model, query_pass=query_pass)
        fp.patch_model(model, prompt)
        counts = _count_layer_calls(model)
        model.train()
        model(pixel_values=x, labels=_labels(2)).loss.backward()
        assert len(counts) == passes * LAYERS, query_pass
        counts.clear()
        model.eval()
        with torch.no_grad():
            model(pixel_values=x)
        assert len(counts) == passes * LAYERS, query_pass


# ---------------------------------------------------------------------------------------------------------------
# the rest of the contract


def test_one_stage_survives_checkpointing_copies_and_unpatch():
    import copy
    import pickle

    model = tiny_vision_model("vit", "cls", layers=3)
    prompt = fp.CodaPrompt(model, pool_size=4, num_tasks=2, length=2, layers=(0, 1, 2), query_pass="one_stage")
    _perturb(prompt)
    x, labels = pixels(3), _labels(3)
    with torch.no_grad():
        before = model(pixel_values=x).logits
    fp.patch_model(model, prompt)
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
    fp.unpatch_model(model)
    assert not any(layer._forward_pre_hooks for layer in _layers(model))
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, before)


def test_one_stage_saves_and_loads(tmp_path):
    model = tiny_vision_model("vit", "cls", layers=LAYERS)
    prompt = _dual(model)
    prompt.save_pretrained(str(tmp_path))
    loaded = fp.load_prompt(str(tmp_path))
    assert loaded.one_stage and loaded.config.query_pass == "one_stage"


def test_one_stage_refuses_what_it_cannot_do():
    model = tiny_vision_model("vit", "cls", layers=LAYERS)
    fp.patch_model(model, _dual(model))
    with pytest.raises(ValueError, match="prompt_query"):
        model(pixel_values=pixels(2), prompt_query=torch.randn(2, 32))
    with pytest.raises(ValueError, match="query_pass"):
        fp.DualPrompt(model, query_pass="three_pass")
    with pytest.raises(ValueError, match="placement='prefix'"):
        fp.PromptPool(model, pool_size=3, length=2, top_k=1, query="cls", query_pass="one_stage")
    with pytest.raises(ValueError, match="query_layer"):
        fp.PromptPool(model, pool_size=3, length=2, top_k=1, query="cls", placement="prefix", query_layer=1,
                      query_pass="one_stage")
    with pytest.raises(ValueError, match="one_stage"):
        fp.PromptStack(fp.PTuningV2(model, num_virtual_tokens=2, layers=[0]),
                       fp.CodaPrompt(model, pool_size=2, num_tasks=1, length=2, layers=[1], query_pass="one_stage"))
    siglip = tiny_vision_model("siglip", "features")
    with pytest.raises(ValueError, match="no \\[CLS\\]"):
        fp.patch_model(siglip, fp.CodaPrompt(siglip, pool_size=2, num_tasks=1, length=2, layers=[0],
                                             query_pass="one_stage"))
    text = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=48, vocab_size=50))
    with pytest.raises(ValueError, match="Vision Transformers only"):
        fp.patch_model(text, fp.CodaPrompt(text, pool_size=2, num_tasks=1, length=2, layers=[0],
                                           query_pass="one_stage"))


def test_one_stage_calls_from_threads_stay_with_their_call():
    model = tiny_vision_model("vit", "cls", layers=3)
    prompt = fp.CodaPrompt(model, pool_size=4, num_tasks=2, length=2, layers=(0, 1, 2), query_pass="one_stage")
    _perturb(prompt)
    fp.patch_model(model, prompt)
    batches = [pixels(b, seed=b) for b in (1, 2, 3, 4)]
    assert_threads_match_serial(lambda x: model(pixel_values=x).logits, batches, repeats=5)
