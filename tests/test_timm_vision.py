"""fastprompt's prompts on timm's VisionTransformer (tiny models built from arguments, no download) vs an eager float64
oracle written out here with the reference implementations' semantics:

- attention: dualprompt-pytorch / CODA-Prompt's PreT_Attention on timm's Attention: `k = cat([key_prefix, k]); v =
  cat([value_prefix, v]); attn = (q @ k^T * scale).softmax(-1)`, the module's own qkv / q-k norms / proj (the
  prefix concatenated after k_norm);
- input-level prompts: l2p-pytorch's order [CLS (+ register tokens), prompts, patches], inserted after the position
  embedding (no position for the prompts);
- the pool query: the frozen model's pre-logits without prompts (l2p-pytorch's `original_model(x)['pre_logits']`:
  the final norm at [CLS]; with global_pool='avg', fc_norm of the patch mean);
- L2P: top-k keys by cosine, the chosen prompts end to end, reduce_sim = sum of the chosen cosines / batch;
  DualPrompt (and the same from a PromptStack of two prompts): G prefix in g_layers, the E entry of the task
  (training) or of the best key; CODA-Prompt: weights
  cos(q * A_n, K_n), first half key / second half value, earlier slices detached in training, ortho penalty.
Logits, loss (cross-entropy + the prompt's auxiliary loss, which a timm model's caller adds) and every prompt
gradient, torch and Triton backends (tests/conftest.py sets TRITON_INTERPRET=1)."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import fastprompt as fp  # noqa: E402
from prompts_helpers import single_thread  # noqa: E402,F401 (autouse fixture)
from vision_helpers import assert_grads_match, assert_threads_match_serial, grads_rel, rel  # noqa: E402,F401

CLASSES = 10


def tiny_vit(seed=0, depth=3, **kw):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4,
                              num_classes=CLASSES, **kw).eval()
    with torch.no_grad():  # tokens away from their near-zero init
        for name, p in model.named_parameters():
            if name in ("cls_token", "reg_token", "pos_embed"):
                p.normal_(0.0, 0.5)
    return model


def pixels(batch=3, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def labels_for(batch):
    return torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# the oracle


def _concat_attention(module, x, prefix=None):
    """PreT_Attention (dualprompt-pytorch / CODA-Prompt) over timm's Attention parameters."""
    B, N, _ = x.shape
    qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    if prefix is not None:
        k = torch.cat([prefix[0], k], dim=2)
        v = torch.cat([prefix[1], v], dim=2)
    attn = ((q @ k.transpose(-2, -1)) * module.scale).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, module.num_heads * module.head_dim)
    norm = getattr(module, "norm", None)  # scale_norm (timm >= 1.0.1x)
    return module.proj(norm(out) if norm is not None else out)


def _block(block, x, prefix):
    x = x + block.ls1(_concat_attention(block.attn, block.norm1(x), prefix))
    return x + block.ls2(block.mlp(block.norm2(x)))


def oracle_features(twin, x, prefixes=None, inputs=None):
    """forward_features written out: patch embedding, [CLS (+ registers)] + position embedding, the input prompts
    after the leading tokens, the blocks with their layer's prefix, the final norm."""
    t = twin._pos_embed(twin.patch_embed(x.double()))
    if inputs is not None:
        lead = twin.num_prefix_tokens
        t = torch.cat([t[:, :lead], inputs, t[:, lead:]], dim=1)
    t = twin.norm_pre(t)
    for i, block in enumerate(twin.blocks):
        t = _block(block, t, (prefixes or {}).get(i))
    return twin.norm(t)


def oracle_query(twin, x):
    """The frozen model's pre-logits without prompts."""
    with torch.no_grad():
        feats = oracle_features(twin, x)
        if twin.global_pool == "token":
            return feats[:, 0]
        return twin.fc_norm(feats[:, twin.num_prefix_tokens:].mean(dim=1))


def oracle_logits(twin, feats):
    pooled = feats[:, 0] if twin.global_pool == "token" else feats[:, twin.num_prefix_tokens:].mean(dim=1)
    return twin.head(twin.fc_norm(pooled))


def twin_of(model):
    twin = copy.deepcopy(model).double().eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def cos_rows(q, keys, attention=None):
    qa = q[:, None, :] * attention[None] if attention is not None else q[:, None, :].expand(-1, keys.shape[0], -1)
    return F.cosine_similarity(qa, keys[None].expand_as(qa), dim=-1)


def tuning_oracle(prompt, P, q, task):
    return {}, torch.stack([P["embedding"]] * q.shape[0]), None


def l2p_oracle(prompt, P, q, task):
    """l2p-pytorch prompt.py: top-k by cosine, the chosen prompts end to end, reduce_sim = sum / batch."""
    c = prompt.config
    sim = cos_rows(q, P["keys"])
    index = sim.topk(c.top_k, dim=-1).indices
    inputs = torch.stack([torch.cat([P["pool"][n] for n in index[b].tolist()], dim=0) for b in range(q.shape[0])])
    reduce_sim = sum(sim[b, index[b]].sum() for b in range(q.shape[0])) / q.shape[0]
    return {}, inputs, -c.pull_constraint_coeff * reduce_sim


def pool_prefix_oracle(prompt, P, q, task):
    """A hard pool as prefixes (L2P's selection, DualPrompt's E-prompt style): per layer, the top-k entries' key and
    value prefixes end to end; l2p-pytorch's reduce_sim."""
    c = prompt.config
    sim = cos_rows(q, P["keys"])
    index = sim.topk(c.top_k, dim=-1).indices
    batch = q.shape[0]
    prefixes = {layer: tuple(torch.stack([torch.cat([P["pool"][i, kv, n] for n in index[b].tolist()], dim=-2)
                                          for b in range(batch)]) for kv in (0, 1))
                for i, layer in enumerate(prompt.layers)}
    reduce_sim = sum(sim[b, index[b]].sum() for b in range(batch)) / batch
    return prefixes, None, -c.pull_constraint_coeff * reduce_sim


def dual_oracle(prompt, P, q, task):
    """dualprompt-pytorch: the G prefix in every row; the E entry of the task (training) or the best key."""
    c = prompt.config
    batch = q.shape[0]
    sim = cos_rows(q, P["e_keys"])
    index = [task] * batch if task is not None else sim.argmax(dim=-1).tolist()
    prefixes = {layer: tuple(torch.stack([P["g_prompt"][i, kv]] * batch) for kv in (0, 1))
                for i, layer in enumerate(c.g_layers)}
    for i, layer in enumerate(c.e_layers):
        prefixes[layer] = tuple(torch.stack([P["e_pool"][i, kv, index[b]] for b in range(batch)]) for kv in (0, 1))
    reduce_sim = sum(sim[b, index[b]] for b in range(batch)) / batch
    return prefixes, None, -c.pull_constraint_coeff * reduce_sim


def stack_oracle(prompt, P, q, task):
    """PromptStack(PTuningV2 in the G layers, PromptPool(top_k=1, task_entries=True) in the E layers): DualPrompt's
    semantics from two prompts; the pool's pull loss is the stack's auxiliary loss."""
    g, e = prompt.members
    batch = q.shape[0]
    sim = cos_rows(q, P["members.1.keys"])
    index = [task] * batch if task is not None else sim.argmax(dim=-1).tolist()
    prefixes = {layer: tuple(torch.stack([P["members.0.prefix"][i, kv]] * batch) for kv in (0, 1))
                for i, layer in enumerate(g.layers)}
    for i, layer in enumerate(e.layers):
        prefixes[layer] = tuple(torch.stack([P["members.1.pool"][i, kv, index[b]] for b in range(batch)])
                                for kv in (0, 1))
    reduce_sim = sum(sim[b, index[b]] for b in range(batch)) / batch
    return prefixes, None, -e.config.pull_constraint_coeff * reduce_sim


def coda_oracle(prompt, P, q, training):
    """CODA-Prompt zoo.py: slices 0..t (earlier ones detached in training), weights cos(q * A, K), P_ =
    einsum('bk,kld->bld'), first half the key prefix, second half the value prefix; the ortho penalty in training."""
    c = prompt.config
    t = prompt.task

    def used(name):
        return torch.cat([P[f"{name}.{s}"].detach() if (training and s < t) else P[f"{name}.{s}"]
                          for s in range(t + 1)], dim=1)

    K_all, A_all, p_all = used("keys"), used("attention_vectors"), used("components")
    batch = q.shape[0]
    prefixes, penalty = {}, 0.0
    for i, layer in enumerate(c.layers):
        K, A, p = K_all[i], A_all[i], p_all[i]
        aq_k = torch.einsum("bkd,kd->bk", F.normalize(torch.einsum("bd,kd->bkd", q, A), dim=2), F.normalize(K, dim=1))
        P_ = torch.einsum("bk,kld->bld", aq_k, p)
        half = c.length // 2
        prefixes[layer] = tuple(E.reshape(batch, -1, c.num_kv_heads, c.head_dim).permute(0, 2, 1, 3)
                                for E in (P_[:, :half], P_[:, half:]))
        if training and c.ortho_mu > 0:
            for T in (K, A, p.reshape(p.shape[0], -1)):
                penalty = penalty + ((T @ T.T - torch.eye(T.shape[0], dtype=T.dtype)) ** 2).mean() * c.ortho_mu
    return prefixes, None, (penalty if training and c.ortho_mu > 0 else None)


# ---------------------------------------------------------------------------------------------------------------
# the methods


def make(method, model, layers=None):
    """(prompt, oracle(prompt, P, q, task)) at small published-like settings."""
    deep = layers or tuple(range(len(model.blocks)))
    if method == "tuning":
        prompt, oracle = fp.PromptTuning(model, num_virtual_tokens=3), tuning_oracle
    elif method == "l2p":
        prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=3, query="cls", pull_reduction="l2p")
        oracle = l2p_oracle
    elif method == "l2p-prefix":
        prompt = fp.PromptPool(model, pool_size=5, length=2, top_k=2, query="cls", pull_reduction="l2p",
                               placement="prefix", layers=deep)
        oracle = pool_prefix_oracle
    elif method == "dual":
        prompt = fp.DualPrompt(model, g_length=2, e_length=3, pool_size=4, g_layers=deep[:1], e_layers=deep[1:])
        oracle = dual_oracle
    elif method == "stack":
        prompt = fp.PromptStack(
            fp.PTuningV2(model, num_virtual_tokens=2, layers=deep[:1], prefix_dropout=0.0),
            fp.PromptPool(model, pool_size=4, length=3, top_k=1, placement="prefix", layers=deep[1:], query="cls",
                          task_entries=True))
        oracle = stack_oracle
    elif method == "coda":
        prompt = fp.CodaPrompt(model, pool_size=6, num_tasks=3, length=4, layers=deep, ortho_mu=0.1)
        prompt.next_task()  # task 1: slice 0 frozen, slice 1 learning

        def oracle(prompt, P, q, task):
            return coda_oracle(prompt, P, q, training=task is not None)
    else:
        raise KeyError(method)
    with torch.no_grad():  # generic values, prompts as large as the tokens
        for name, p in prompt.named_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return prompt, oracle


def check_against_oracle(method, backend, training, model=None, batch=3):
    model = model if model is not None else tiny_vit()
    prompt, oracle = make(method, model, layers=(0, 1) if backend == "triton" else None)
    twin = twin_of(model)
    P = {n: p.detach().double().clone().requires_grad_(p.requires_grad) for n, p in prompt.named_parameters()}
    fp.patch_model(model, prompt, backend=backend)
    model.train(training)  # the attached prompt too (CODA's penalty is a training term)
    x, labels = pixels(batch), labels_for(batch)
    task = 1 if training else None
    call = {"task_ids": torch.tensor(task)} if (task is not None and method in ("dual", "stack")) else {}
    logits = model(x, **call)
    loss = F.cross_entropy(logits, labels)
    if prompt.aux_loss is not None:
        loss = loss + prompt.aux_loss
    loss.backward()

    q = oracle_query(twin, x)
    prefixes, inputs, aux = oracle(prompt, P, q, task)
    ref = oracle_logits(twin, oracle_features(twin, x, prefixes, inputs))
    ref_loss = F.cross_entropy(ref, labels)
    if aux is not None:
        ref_loss = ref_loss + aux
    ref_loss.backward()

    assert (prompt.aux_loss is None) == (aux is None)
    assert rel(logits, ref) < 1e-5, (method, backend)
    assert rel(loss, ref_loss) < 1e-5
    mine, theirs = assert_grads_match(prompt, P, what=(method, backend))
    assert any(float(g.abs().sum()) > 0 for g in mine.values())
    return model, prompt, mine


METHODS = ["tuning", "l2p", "l2p-prefix", "dual", "stack", "coda"]


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("method", METHODS)
def test_prompts_match_the_eager_oracle(method, training):
    check_against_oracle(method, "torch", training)


# The backend is that of the prefix attention: input-level prompts on timm run through timm's own attention (no
# prefix to read). The Triton interpreter is slow: two prompt layers; training for DualPrompt (the task's E entry)
# and CODA (its frozen slice, its penalty).
TRITON_CASES = [("l2p-prefix", False), ("dual", True), ("coda", True)]


@pytest.mark.parametrize("method,training", TRITON_CASES, ids=[m for m, _ in TRITON_CASES])
def test_prompts_match_the_eager_oracle_triton(method, training):
    check_against_oracle(method, "triton", training)


@pytest.mark.parametrize("method", ["l2p", "dual"])
def test_variants_qk_norm_registers_and_avg_pool(method):
    """qk_norm (prefix keys after the sequence keys' norm), two register tokens (the prompts follow them), average
    pooling (the query is fc_norm of the patch mean, the pre-logits of forward_head)."""
    model = tiny_vit(qk_norm=True, reg_tokens=2, global_pool="avg", class_token=False)
    assert model.num_prefix_tokens == 2
    check_against_oracle(method, "torch", training=False, model=model)


def test_deit_distilled_prompts_follow_both_leading_tokens():
    """timm's DeiT with a distillation token (a VisionTransformer subclass): input-level prompts after [CLS] and the
    distillation token; the query its pre-logits, the mean of the two tokens' features; logits the mean of the two
    heads (eval)."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                       num_classes=CLASSES).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("cls_token", "dist_token", "pos_embed"):
                p.normal_(0.0, 0.5)
    prompt, oracle = make("l2p", model)
    twin = twin_of(model)
    P = {n: p.detach().double().clone().requires_grad_() for n, p in prompt.named_parameters()}
    fp.patch_model(model, prompt)
    model.eval()
    x, labels = pixels(3), labels_for(3)
    logits = model(x)
    loss = F.cross_entropy(logits, labels) + prompt.aux_loss
    loss.backward()

    with torch.no_grad():
        plain = oracle_features(twin, x)
    q = (plain[:, 0] + plain[:, 1]) / 2
    _, inputs, aux = oracle(prompt, P, q, None)
    feats = oracle_features(twin, x, None, inputs)
    assert model.num_prefix_tokens == 2
    ref = (twin.head(feats[:, 0]) + twin.head_dist(feats[:, 1])) / 2
    ref_loss = F.cross_entropy(ref, labels) + aux
    ref_loss.backward()
    assert rel(logits, ref) < 1e-5 and rel(loss, ref_loss) < 1e-5
    mine = {n: p.grad for n, p in prompt.named_parameters()}
    assert grads_rel(mine, {n: t.grad for n, t in P.items()}) < 1e-4


def test_dual_prompt_training_gives_the_task_entry_and_inference_the_best_key():
    model = tiny_vit()
    _, prompt, grads = check_against_oracle("dual", "torch", training=True)
    assert prompt.last_index.tolist() == [1, 1, 1]
    for n in range(prompt.config.pool_size):
        assert (float(grads["e_pool"][:, :, n].abs().sum()) > 0) == (n == 1)
    twin = twin_of(model)
    model.eval()
    with torch.no_grad():
        prompt2, _ = make("dual", model)
        fp.patch_model(model, prompt2)
        x = pixels(5, seed=4)
        model(x)
        want = cos_rows(oracle_query(twin, x), prompt2.e_keys.detach().double()).argmax(dim=-1)
    assert prompt2.last_index.tolist() == want.tolist()


def test_unpatch_restores_the_model_exactly():
    model = tiny_vit()
    x = pixels(2)
    with torch.no_grad():
        before = model(x)
    for method in ("tuning", "dual"):
        prompt, _ = make(method, model)
        fp.patch_model(model, prompt)
        assert fp.integrations.transformers_attention.is_fastprompt_enabled(model) == (method == "dual")
        with torch.no_grad():
            assert rel(model(x), before) > 1e-4  # the prompt changes the output
        fp.unpatch_model(model)
        assert not model.norm_pre._forward_pre_hooks
        assert all("forward" not in block.attn.__dict__ for block in model.blocks)
        assert all(not any(k.startswith("_fastprompt") for k in vars(block.attn)) for block in model.blocks)
        assert not any(k.startswith("_fastprompt") for k in vars(model))
        assert all(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            assert torch.equal(model(x), before)


def test_a_patched_model_deep_copies_with_its_prompt():
    model = tiny_vit()
    prompt, _ = make("dual", model)
    fp.patch_model(model, prompt)
    x = pixels(2)
    with torch.no_grad():
        want = model(x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), want)
        twin.fastprompt_prompt.g_prompt.add_(1.0)  # the copy reads its own prompt
        assert torch.equal(model(x), want) and not torch.equal(twin(x), want)


def test_a_patched_model_pickles_and_calls_without_a_prompt_keep_timm_semantics(tmp_path):
    model = tiny_vit()
    x = pixels(2)
    mask = torch.ones(17, 17, dtype=torch.bool).tril()  # timm >= 1.0.1x: a mask through forward_features
    takes_mask = "attn_mask" in inspect.signature(VisionTransformer.forward_features).parameters
    with torch.no_grad():
        plain = model.forward_features(x, attn_mask=mask) if takes_mask else None
    prompt, _ = make("coda", model)
    fp.patch_model(model, prompt)
    with torch.no_grad():
        want = model(x)
        if takes_mask:  # no prompt bound: the patched attention hands the mask to timm's own forward
            assert torch.equal(model.forward_features(x, attn_mask=mask), plain)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    fp.unpatch_model(loaded)
    assert all("forward" not in block.attn.__dict__ for block in loaded.blocks)


def test_calls_from_threads_read_their_own_prefixes():
    model = tiny_vit()
    prompt, _ = make("l2p-prefix", model)
    fp.patch_model(model, prompt)
    batches = [pixels(b, seed=b) for b in (1, 2, 3, 4)]
    assert_threads_match_serial(model, batches, repeats=4)


def test_the_backend_reaches_every_attention_module(monkeypatch):
    model = tiny_vit()
    prompt, _ = make("coda", model)
    fp.patch_model(model, prompt, backend="reference")
    seen = []
    real = fp.ops.prefix_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["backend"], args[3] is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(fp.ops, "prefix_attention", spy)
    with torch.no_grad():
        model(pixels(2))
    # the query pass (timm's own forward_features, no prefix bound), then the prompted pass
    assert seen == [("reference", False)] * 3 + [("reference", True)] * 3
    seen.clear()  # forward_features called directly: the patched attention, no prompt
    with torch.no_grad():
        model.forward_features(pixels(2))
    assert seen == [("reference", False)] * 3


def test_what_is_not_supported_is_refused_by_name():
    model = tiny_vit()
    prompt, _ = make("dual", model)
    fp.patch_model(model, prompt)
    x = pixels(2)
    # (timm < 1.0.1x has no such arguments: the patched forward's signature refuses them by name, TypeError)
    with pytest.raises((ValueError, TypeError), match="attn_mask"):
        model(x, attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="is_causal"):
        model(x, is_causal=True)
    model.set_grad_checkpointing(True)
    model.train()
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        model(x)
    fp.unpatch_model(model)

    with pytest.raises(ValueError, match="query_layer"):
        fp.patch_model(model, fp.PromptPool(model, pool_size=3, length=2, top_k=1, query="cls", query_layer=1))
    other = tiny_vit(attn_layer="diff") if "diff" in getattr(timm.models.vision_transformer, "ATTN_LAYERS", {}) \
        else None
    if other is not None:
        with pytest.raises(TypeError, match="standard Attention"):
            fp.patch_model(other, fp.PTuningV2(other, num_virtual_tokens=2, layers=[0]))
        assert "forward" not in other.blocks[0].attn.__dict__
