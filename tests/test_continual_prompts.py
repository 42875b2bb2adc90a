"""DualPrompt, CODA-Prompt and L2P's key-pull loss on a tiny ViT, step by step: against the reference
implementations' semantics written out eagerly in float64 (dualprompt-pytorch's G/E prefixes and E selection,
CODA-Prompt's zoo.py weights / split / orthogonality penalty, l2p-pytorch's reduce_sim), which prompt each row gets in
training and at inference, frozen slices unchanged by an optimizer step, new slices orthogonal to the old, and
save / load of the whole prompt state."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from vision_helpers import (NUM_LABELS, assert_grads_match, cos_rows, oracle_query, oracle_twin, pixels, rel, run_oracle,
                            tiny_vision_model)

LAYERS = 5  # the published prompt layers 0-4 need five


def _model(layers=LAYERS):
    return tiny_vision_model("vit", "cls", layers=layers)


# The Triton interpreter is slow: its cases run a 2-layer model with the prompts in both layers.
SMALL = {"triton": dict(layers=2), "reference": dict(layers=2)}


def _dual(model, **kw):
    return fp.DualPrompt(model, g_length=2, e_length=3, pool_size=4, **kw)


def _coda(model, **kw):
    kw.setdefault("ortho_mu", 0.1)
    return fp.CodaPrompt(model, pool_size=6, num_tasks=3, length=4, **kw)


def _copies(prompt):
    return {n: p.detach().double().clone().requires_grad_(p.requires_grad) for n, p in prompt.named_parameters()}


def _labels(batch):
    return torch.randint(0, NUM_LABELS, (batch,), generator=torch.Generator().manual_seed(3))


def dual_oracle(prompt, P, q, task=None):
    """dualprompt-pytorch: G prefix in g_layers for every row; E entry = the task's (training) or the best key's."""
    c = prompt.config
    batch = q.shape[0]
    sim = cos_rows(q, P["e_keys"])
    index = [task] * batch if task is not None else [int(sim[b].argmax()) for b in range(batch)]
    prefixes = {layer: (torch.stack([P["g_prompt"][i, 0]] * batch), torch.stack([P["g_prompt"][i, 1]] * batch))
                for i, layer in enumerate(c.g_layers)}
    for i, layer in enumerate(c.e_layers):
        prefixes[layer] = (torch.stack([P["e_pool"][i, 0, index[b]] for b in range(batch)]),
                           torch.stack([P["e_pool"][i, 1, index[b]] for b in range(batch)]))
    reduce_sim = sum(sim[b, index[b]] for b in range(batch)) / batch
    return prefixes, -c.pull_constraint_coeff * reduce_sim, index


def coda_oracle(prompt, P, q, training):
    """CODA-Prompt zoo.py: slices 0..t (earlier ones detached in training), weights cos(q * A, K) without softmax,
    P_ = einsum('bk,kld->bld'), first half key / second half value, ortho penalty in training."""
    c = prompt.config
    t = prompt.task
    H, D = c.num_kv_heads, c.head_dim

    def used(name):
        parts = [P[f"{name}.{s}"].detach() if (training and s < t) else P[f"{name}.{s}"] for s in range(t + 1)]
        return torch.cat(parts, dim=1)

    K_all, A_all, p_all = used("keys"), used("attention_vectors"), used("components")
    batch = q.shape[0]
    prefixes, loss = {}, 0.0
    for i, layer in enumerate(c.layers):
        K, A, p = K_all[i], A_all[i], p_all[i]
        a_querry = torch.einsum("bd,kd->bkd", q, A)
        aq_k = torch.einsum("bkd,kd->bk", F.normalize(a_querry, dim=2), F.normalize(K, dim=1))
        P_ = torch.einsum("bk,kld->bld", aq_k, p)
        half = c.length // 2
        Ek, Ev = P_[:, :half, :], P_[:, half:, :]
        prefixes[layer] = tuple(E.reshape(batch, -1, H, D).permute(0, 2, 1, 3) for E in (Ek, Ev))  # vit.py
        if training and c.ortho_mu > 0:
            for T in (K, A, p.reshape(p.shape[0], -1)):
                loss = loss + ((T @ T.T - torch.eye(T.shape[0], dtype=T.dtype)) ** 2).mean() * c.ortho_mu
    return prefixes, (loss if training and c.ortho_mu > 0 else None)


def _run_both(model, prompt, twin, P, x, labels, oracle, **call):
    out = model(pixel_values=x, labels=labels, **call)
    out.loss.backward()
    q = oracle_query(twin, x)
    prefixes, aux = oracle(q)
    ref = run_oracle(twin, x, labels, prefixes)
    ref_loss = ref.loss + aux if aux is not None else ref.loss
    ref_loss.backward()
    assert rel(out.logits, ref.logits) < 1e-5
    assert rel(out.loss, ref_loss) < 1e-5
    mine, theirs = assert_grads_match(prompt, P)
    return mine


# ---------------------------------------------------------------------------------------------------------------
# DualPrompt


@pytest.mark.parametrize("phase,backend", [("training", "torch"), ("inference", "torch"), ("training", "triton"),
                                           ("inference", "reference")])
def test_dualprompt_matches_the_reference_semantics(phase, backend):
    if backend in SMALL:
        model = _model(**SMALL[backend])
        prompt = _dual(model, g_layers=(0,), e_layers=(1,))
    else:
        model = _model()
        prompt = _dual(model)
    twin = oracle_twin(model)
    P = _copies(prompt)
    fp.patch_model(model, prompt, backend=backend)
    x, labels = pixels(4), _labels(4)
    task = 2 if phase == "training" else None
    if phase == "training":
        model.train()
    call = {"task_ids": torch.tensor(task)} if task is not None else {}
    grads = _run_both(model, prompt, twin, P, x, labels,
                      lambda q: dual_oracle(prompt, P, q, task)[:2], **call)
    # the G-prompt and the chosen E entries learn; the others get nothing
    chosen = set(prompt.last_index.tolist())
    for n in range(prompt.config.pool_size):
        assert (float(grads["e_pool"][:, :, n].abs().sum()) > 0) == (n in chosen)
    assert float(grads["g_prompt"].abs().sum()) > 0


def test_dualprompt_rows_get_the_task_entry_in_training_and_the_best_key_at_inference():
    model = _model()
    prompt = _dual(model)
    twin = oracle_twin(model)
    fp.patch_model(model, prompt)
    x = pixels(6)
    q = oracle_query(twin, x).float()
    model.train()
    model(pixel_values=x, labels=_labels(6), task_ids=torch.full((6,), 3))
    assert prompt.last_index.tolist() == [3] * 6
    model.eval()
    with torch.no_grad():
        model(pixel_values=x)
    best = cos_rows(q, prompt.e_keys.detach()).argmax(dim=-1)
    assert torch.equal(prompt.last_index, best)
    # rows whose queries lie near different keys get different entries
    with torch.no_grad():
        model(pixel_values=x, prompt_query=prompt.e_keys.detach()[[2, 0, 3, 1, 1, 0]] + 0.01 * torch.randn(6, 32))
    assert prompt.last_index.tolist() == [2, 0, 3, 1, 1, 0]
    with pytest.raises(ValueError, match="unknown task id 4"):
        model(pixel_values=x, task_ids=torch.full((6,), 4))


def test_dualprompt_refuses_overlapping_layers():
    with pytest.raises(ValueError, match="overlap"):
        _dual(_model(), g_layers=(0, 1), e_layers=(1, 2))


# ---------------------------------------------------------------------------------------------------------------
# CODA-Prompt


@pytest.mark.parametrize("task,training,backend", [(0, True, "torch"), (0, False, "torch"), (1, True, "torch"),
                                                   (1, False, "torch"), (1, True, "triton"), (2, False, "reference")])
def test_coda_matches_the_reference_semantics(task, training, backend):
    if backend in SMALL:
        model = _model(**SMALL[backend])
        prompt = _coda(model, layers=(0, 1))
    else:
        model = _model()
        prompt = _coda(model)
    for t in range(task + 1):
        if t:
            prompt.next_task()
        with torch.no_grad():  # trained-looking slices, off their orthonormal start (the penalty then has a gradient
            for p in prompt.parameters():  # above float32 rounding)
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    twin = oracle_twin(model)
    P = _copies(prompt)
    fp.patch_model(model, prompt, backend=backend)
    model.train(training)
    grads = _run_both(model, prompt, twin, P, pixels(3), _labels(3), lambda q: coda_oracle(prompt, P, q, training))
    for name in ("components", "keys", "attention_vectors"):
        for t in range(prompt.config.num_tasks):
            learns = float(grads[f"{name}.{t}"].abs().sum()) > 0
            assert learns == (t == task), (name, t)  # earlier slices frozen, later ones unused


def test_coda_frozen_slices_are_unchanged_by_optimizer_steps():
    model = _model()
    prompt = _coda(model)
    fp.patch_model(model, prompt)
    model.train()
    opt = torch.optim.AdamW([p for p in prompt.parameters()], lr=0.05, weight_decay=0.1)

    def step(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=False)  # stale zero grads must not move frozen slices either
            model(pixel_values=pixels(3), labels=_labels(3)).loss.backward()
            opt.step()

    step(2)
    prompt.next_task()
    frozen = {n: p.detach().clone() for n, p in prompt.named_parameters() if n.endswith(".0")}
    fresh = {n: p.detach().clone() for n, p in prompt.named_parameters() if n.endswith(".1")}
    step(2)
    for n, p in prompt.named_parameters():
        if n in frozen:
            assert not p.requires_grad and torch.equal(p, frozen[n]), n
        if n in fresh:
            assert p.requires_grad and not torch.equal(p, fresh[n]), n


def test_coda_new_slices_start_orthonormal_and_orthogonal_to_the_old():
    prompt = _coda(_model())
    for name in ("components", "keys", "attention_vectors"):
        for i in range(len(prompt.layers)):
            rows = getattr(prompt, name)[0][i].reshape(2, -1).double()
            assert torch.allclose(rows @ rows.T, torch.eye(2, dtype=torch.float64), atol=1e-6)
    for task in (1, 2):
        with torch.no_grad():  # training moved the old slices off their orthonormal start
            for p in prompt.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
        prompt.next_task()
        for name in ("components", "keys", "attention_vectors"):
            slices = getattr(prompt, name)
            for i in range(len(prompt.layers)):
                new = slices[task][i].detach().reshape(2, -1).double()
                old = torch.cat([slices[t][i].detach().reshape(2, -1) for t in range(task)]).double()
                assert torch.allclose(new @ new.T, torch.eye(2, dtype=torch.float64), atol=1e-6), (name, task)
                assert float((new @ old.T).abs().max()) < 1e-5 * float(old.norm(dim=1).max()), (name, task)
    with pytest.raises(ValueError, match="num_tasks=3"):
        prompt.next_task()


# ---------------------------------------------------------------------------------------------------------------
# save / load, L2P's key-pull loss


@pytest.mark.parametrize("make", [_dual, _coda], ids=["dualprompt", "coda"])
def test_save_load_keeps_the_whole_prompt_state(make, tmp_path):
    model = _model()
    prompt = make(model)
    with torch.no_grad():
        for p in prompt.parameters():
            p.add_(0.2 * torch.randn_like(p))
    if isinstance(prompt, fp.CodaPrompt):
        prompt.next_task()
    prompt.save_pretrained(str(tmp_path))
    loaded = fp.load_prompt(str(tmp_path), model)
    assert type(loaded) is type(prompt) and loaded.config == prompt.config
    want, got = prompt.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == \
           {n: p.requires_grad for n, p in prompt.named_parameters()}
    other = copy.deepcopy(model)
    fp.patch_model(model, prompt)
    fp.patch_model(other, loaded)
    x = pixels(2)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, other(pixel_values=x).logits)


def test_l2p_key_pull_loss_is_reduce_sim():
    model = _model()
    prompt = fp.PromptPool(model, pool_size=6, length=2, top_k=3, query="cls", pull_reduction="l2p",
                           pull_constraint_coeff=0.1)
    twin = oracle_twin(model)
    fp.patch_model(model, prompt)
    x = pixels(4)
    model(pixel_values=x)
    q = oracle_query(twin, x)
    sim = cos_rows(q, prompt.keys.detach().double())
    reduce_sim = sim.topk(3, dim=-1).values.sum() / 4  # l2p-pytorch: torch.sum(sim) / x_embed.shape[0]
    assert rel(prompt.aux_loss, -0.1 * reduce_sim) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# several prompts at once


def test_a_stack_of_prompts_matches_its_members_written_out():
    from test_vision_prompts import oracle_prompts

    model = tiny_vision_model("vit", "cls")
    shared = fp.PTuningV2(model, num_virtual_tokens=3, layers=[0], prefix_dropout=0.0)
    pool = fp.PromptPool(model, pool_size=5, length=2, top_k=2, placement="prefix", layers=[1], query="cls")
    stack = fp.PromptStack(shared, pool)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.3 * torch.randn_like(p))
    twin = oracle_twin(model)
    P = _copies(stack)
    fp.patch_model(model, stack)
    x, labels = pixels(3), _labels(3)

    def oracle(q):
        prefixes, aux = {}, None
        for i, member in enumerate(stack.members):
            mine = {n[len(f"members.{i}."):]: t for n, t in P.items() if n.startswith(f"members.{i}.")}
            pre, _, member_aux = oracle_prompts(member, mine, q, 3)
            prefixes.update(pre)
            aux = member_aux if aux is None else aux + member_aux
        return prefixes, aux

    _run_both(model, stack, twin, P, x, labels, oracle)
    assert stack.aux_loss is not None and set(stack.layers) == {0, 1}


def test_a_stack_saves_and_loads_as_one_prompt(tmp_path):
    model = _model()
    stack = fp.PromptStack(fp.PTuningV2(model, num_virtual_tokens=2, layers=[0, 1]), _coda(model, layers=(2, 3, 4)))
    stack.members[1].next_task()
    stack.save_pretrained(str(tmp_path))
    loaded = fp.load_prompt(str(tmp_path), model)
    assert isinstance(loaded, fp.PromptStack) and loaded.config == stack.config
    assert loaded.members[1].task == 1 and not loaded.members[1].keys[0].requires_grad
    want, got = stack.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="overlap in layer 1"):
        fp.PromptStack(fp.PTuningV2(model, layers=[0, 1]), _coda(model, layers=(1, 2)))
    with pytest.raises(ValueError, match="prefix prompts"):
        fp.PromptStack(fp.PTuningV2(model, layers=[0]), fp.PromptTuning(model))


@pytest.mark.parametrize("phase", ["training", "inference"])
def test_dualprompt_is_a_stack_of_a_shared_prefix_and_a_task_aware_pool(phase):
    """DualPrompt == PromptStack(PTuningV2 in the G layers, PromptPool(top_k=1, task_entries=True) in the E
    layers) with the same parameters: logits, loss, chosen entries and gradients."""
    model = _model()
    dual = _dual(model)
    other = copy.deepcopy(model)
    g = fp.PTuningV2(model, num_virtual_tokens=2, layers=[0, 1], prefix_dropout=0.0)
    e = fp.PromptPool(model, pool_size=4, length=3, top_k=1, placement="prefix", layers=[2, 3, 4], query="cls",
                      task_entries=True, pull_constraint_coeff=1.0)
    with torch.no_grad():
        g.prefix.copy_(dual.g_prompt)
        e.pool.copy_(dual.e_pool)
        e.keys.copy_(dual.e_keys)
    stack = fp.PromptStack(g, e)
    fp.patch_model(model, dual)
    fp.patch_model(other, stack)
    x, labels = pixels(4), _labels(4)
    call = {"task_ids": torch.full((4,), 1)} if phase == "training" else {}
    model.train(phase == "training")
    other.train(phase == "training")
    out_d = model(pixel_values=x, labels=labels, **call)
    out_s = other(pixel_values=x, labels=labels, **call)
    out_d.loss.backward()
    out_s.loss.backward()
    assert torch.allclose(out_d.logits, out_s.logits, atol=1e-6) and torch.allclose(out_d.loss, out_s.loss)
    assert torch.equal(dual.last_index, e.last_index[:, 0])
    if phase == "training":
        assert dual.last_index.tolist() == [1] * 4
    for mine, theirs in ((dual.g_prompt, g.prefix), (dual.e_pool, e.pool), (dual.e_keys, e.keys)):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-5, atol=1e-8)


def test_l2p_prompt_mask_gives_each_task_its_own_entries():
    model = _model(layers=2)
    prompt = fp.PromptPool(model, pool_size=6, length=2, top_k=2, query="cls", task_entries=True,
                           pull_reduction="l2p")
    twin = oracle_twin(model)
    fp.patch_model(model, prompt)
    x = pixels(3)
    model(pixel_values=x, task_ids=torch.tensor([2, 0, 1]))
    assert prompt.last_index.tolist() == [[4, 5], [0, 1], [2, 3]]
    sim = cos_rows(oracle_query(twin, x), prompt.keys.detach().double())
    pulled = (sim[0, 4] + sim[0, 5] + sim[1, 0] + sim[1, 1] + sim[2, 2] + sim[2, 3]) / 3  # toward the task's keys
    assert rel(prompt.aux_loss, -prompt.config.pull_constraint_coeff * pulled) < 1e-6
    model(pixel_values=x)  # no task ids: the keys choose
    assert torch.equal(prompt.last_index, sim.float().topk(2, dim=-1).indices)
    with pytest.raises(ValueError, match="unknown task id 3"):
        model(pixel_values=x, task_ids=torch.tensor([3, 0, 0]))
    with pytest.raises(ValueError, match="task_entries needs a hard pool"):
        fp.PromptPool(model, pool_size=6, length=2, top_k=None, task_entries=True)
