"""The one-stage query (query_pass="one_stage", OS-Prompt, ECCV 2024) on timm's VisionTransformer: one forward
through the blocks, and logits, loss (with the prompt's auxiliary loss, which a timm model's caller adds) and every
prompt gradient equal to OS-Prompt's rule written out by hand, torch and Triton backends (tests/conftest.py sets
TRITON_INTERPRET=1).

The oracle is test_timm_vision's eager float64 forward_features (PreT_Attention's concatenated prefix K/V over timm's
Attention parameters) with OS-Prompt's loop: entering block l, the [CLS] of the hidden state (not detached) is the
query of block l's prefix, built from float64 copies of the parameters by test_one_stage_query's rules (CODA: its
cos(q * A, K) weights at every prompted layer; DualPrompt: one pick entering its first E-layer, for all of them).
Nothing of fastprompt runs in the oracle."""
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import fastprompt as fp  # noqa: E402
from prompts_helpers import single_thread  # noqa: E402,F401 (autouse fixture)
from test_one_stage_query import coda_rule, dual_rule  # noqa: E402
from test_timm_vision import _block, cos_rows, labels_for, oracle_logits, pixels, tiny_vit, twin_of  # noqa: E402
from vision_helpers import assert_grads_match, rel  # noqa: E402

DEPTH = 5


def _perturb(prompt, scale=0.3):
    with torch.no_grad():  # generic values, off the initialization
        for p in prompt.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


def _copies(prompt):
    return {n: p.detach().double().clone().requires_grad_(p.requires_grad) for n, p in prompt.named_parameters()}


def oracle_one_stage(twin, x, rule, fixed=None):
    """forward_features and the head, with OS-Prompt's loop: `rule[l]([CLS] entering block l))` is block l's
    prefix; `fixed` the prefixes that need no query (DualPrompt's G-prompt)."""
    t = twin.norm_pre(twin._pos_embed(twin.patch_embed(x.double())))
    prefixes = dict(fixed or {})
    for l, block in enumerate(twin.blocks):
        if l in rule:
            prefixes[l] = rule[l](t[:, 0])
        t = _block(block, t, prefixes.get(l))
    return oracle_logits(twin, twin.norm(t))


def _compare(model, prompt, twin, P, x, labels, rule, fixed=None, aux=None, **call):
    logits = model(x, **call)
    loss = F.cross_entropy(logits, labels)
    if prompt.aux_loss is not None:
        loss = loss + prompt.aux_loss
    loss.backward()
    ref = oracle_one_stage(twin, x, rule, fixed)
    ref_loss = F.cross_entropy(ref, labels)
    if aux is not None:
        ref_loss = ref_loss + aux()
    ref_loss.backward()
    assert (prompt.aux_loss is None) == (aux is None)
    assert rel(logits, ref) < 1e-5
    assert rel(loss, ref_loss) < 1e-5
    mine, theirs = assert_grads_match(prompt, P)
    assert any(float(g.abs().sum()) > 0 for g in mine.values())
    return mine, theirs


def _coda(model, layers, **kw):
    kw.setdefault("ortho_mu", 0.1)
    return fp.CodaPrompt(model, pool_size=6, num_tasks=3, length=4, layers=layers, query_pass="one_stage", **kw)


def _dual(model, g_layers, e_layers, **kw):
    return fp.DualPrompt(model, g_length=2, e_length=3, pool_size=4, g_layers=g_layers, e_layers=e_layers,
                         query_pass="one_stage", **kw)


# The Triton interpreter is slow: three blocks there, prompts in all of them.
LAYOUT = {"torch": (DEPTH, tuple(range(DEPTH)), (0, 1), (2, 3, 4)), "triton": (3, (0, 1, 2), (0,), (1, 2))}


def check_coda(backend, training, task=1, ortho_mu=0.1):
    depth, layers, _, _ = LAYOUT[backend]
    model = tiny_vit(depth=depth)
    prompt = _coda(model, layers, ortho_mu=ortho_mu)
    for t in range(task + 1):
        if t:
            prompt.next_task()  # the slices before `task` frozen
        _perturb(prompt)
    twin = twin_of(model)
    P = _copies(prompt)
    fp.patch_model(model, prompt, backend=backend)
    model.train(training)
    x, labels = pixels(3), labels_for(3)
    rule, aux = coda_rule(prompt, P, training)
    mine, _ = _compare(model, prompt, twin, P, x, labels, rule, aux=(lambda: aux) if aux is not None else None)
    assert sorted(prompt.last_weights) == list(layers)
    for name in ("components", "keys", "attention_vectors"):
        for t in range(prompt.config.num_tasks):
            # only the current task's slice learns (the earlier ones are frozen parameters, the later ones unused)
            assert (float(mine[f"{name}.{t}"].abs().sum()) > 0) == (t == task), (name, t)
    return model, prompt, twin, P


def check_dual(backend, training):
    depth, _, g_layers, e_layers = LAYOUT[backend]
    model = tiny_vit(depth=depth)
    prompt = _dual(model, g_layers, e_layers)
    _perturb(prompt)
    twin = twin_of(model)
    fp.patch_model(model, prompt, backend=backend)
    x, labels = pixels(6), labels_for(6)
    first = e_layers[0]
    entering = []
    hook = model.blocks[first].register_forward_pre_hook(lambda module, args: entering.append(args[0][:, 0]))
    # key n: row n's own part of its [CLS] entering the first E-layer (their common part projected out, as it
    # dominates): in inference rows 0-3 pick entries 0-3 by a margin far above rounding
    with torch.no_grad():
        model(x)
        q = entering[0]
        common = F.normalize(q.mean(dim=0), dim=0)
        own = q[:4] - q.mean(dim=0)
        prompt.e_keys.copy_(own - (own @ common)[:, None] * common)
    hook.remove()
    P = _copies(prompt)
    task = 2 if training else None
    model.train(training)
    picked = []
    rule, fixed, pull = dual_rule(prompt, P, task, picked)
    call = {"task_ids": torch.tensor(task)} if task is not None else {}
    mine, theirs = _compare(model, prompt, twin, P, x, labels, rule, fixed(6), aux=pull, **call)
    assert prompt.last_index.tolist() == picked[-1]
    if training:
        assert picked[-1] == [2] * 6
        for n in range(prompt.config.pool_size):
            assert (float(mine["e_pool"][:, :, n].abs().sum()) > 0) == (n == 2)
    else:
        assert picked[-1][:4] == [0, 1, 2, 3]
    # the query is not detached (OS-Prompt's x_block[:, 0, :]): the key-pull loss reaches the G-prompt through it;
    # the same rule with a detached query gives the G-prompt another gradient
    P2 = _copies(prompt)
    rule2, fixed2, pull2 = dual_rule(prompt, P2, task, [])
    detached = {l: (lambda q, f=f: f(q.detach())) for l, f in rule2.items()}
    (F.cross_entropy(oracle_one_stage(twin, x, detached, fixed2(6)), labels) + pull2()).backward()
    assert rel(P2["g_prompt"].grad, theirs["g_prompt"]) > 1e-3


# ortho_mu=0: the orthogonality penalty's gradient dominates the components' gradient scale, so only without it
# does a query detached from the prompted pass show in the compared gradients (as in tests/test_one_stage_query.py)
@pytest.mark.parametrize("training,ortho_mu", [(True, 0.1), (True, 0.0), (False, 0.1)],
                         ids=["training", "training-no-ortho", "inference"])
def test_coda_one_stage_on_timm_matches_os_prompts_rule(training, ortho_mu):
    check_coda("torch", training, ortho_mu=ortho_mu)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_dualprompt_one_stage_on_timm_matches_os_prompts_rule(training):
    check_dual("torch", training)


@pytest.mark.parametrize("method,training", [("coda", True), ("dual", True), ("dual", False)])
def test_one_stage_on_timm_matches_os_prompts_rule_triton(method, training):
    check_coda("triton", training) if method == "coda" else check_dual("triton", training)


def test_coda_one_stage_on_timm_weights_are_those_of_the_cls_entering_each_block():
    model, prompt, twin, P = check_coda("torch", training=False, task=0)
    entering = {}  # the oracle's [CLS] entering each block, as its rule receives it
    rule, _ = coda_rule(prompt, P, training=False)
    recording = {l: (lambda q, l=l, f=f: f(entering.setdefault(l, q))) for l, f in rule.items()}
    x = pixels(3)
    with torch.no_grad():
        model(x)
        oracle_one_stage(twin, x, recording)
    for i, l in enumerate(prompt.config.layers):
        want = cos_rows(entering[l], P["keys.0"][i], P["attention_vectors.0"][i])
        assert rel(prompt.last_weights[l], want) < 1e-5, l
    # entering block 0, the [CLS] is the class token plus its position embedding: the same for every image
    assert torch.allclose(prompt.last_weights[0], prompt.last_weights[0][:1].expand(3, -1))
    assert not torch.allclose(prompt.last_weights[1], prompt.last_weights[1][:1].expand(3, -1))


@pytest.mark.parametrize("method", ["coda", "dual"])
def test_one_stage_on_timm_runs_the_blocks_once(method):
    x, labels = pixels(2), labels_for(2)
    for query_pass, passes in (("one_stage", 1), ("two_pass", 2)):
        model = tiny_vit(depth=DEPTH)
        if method == "coda":
            prompt = fp.CodaPrompt(model, pool_size=6, num_tasks=3, length=4, layers=tuple(range(DEPTH)),
                                   query_pass=query_pass)
        else:
            prompt = fp.DualPrompt(model, g_length=2, e_length=3, pool_size=4, g_layers=(0, 1), e_layers=(2, 3, 4),
                                   query_pass=query_pass)
        fp.patch_model(model, prompt)
        counts = []
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *a: counts.append(1))
        model.train()
        call = {"task_ids": torch.tensor(1)} if method == "dual" else {}
        loss = F.cross_entropy(model(x, **call), labels)
        (loss + prompt.aux_loss if prompt.aux_loss is not None else loss).backward()
        assert len(counts) == passes * DEPTH, query_pass
        counts.clear()
        model.eval()
        with torch.no_grad():
            model(x)
        assert len(counts) == passes * DEPTH, query_pass


def test_one_stage_on_timm_unpatch_removes_the_hooks():
    model = tiny_vit(depth=DEPTH)
    mine = model.blocks[3].register_forward_pre_hook(lambda *a: None)  # a hook of the user's: kept
    before_hooks = [dict(block._forward_pre_hooks) for block in model.blocks]
    x = pixels(2)
    with torch.no_grad():
        before = model(x)
    for prompt in (_coda(model, tuple(range(DEPTH))), _dual(model, (0, 1), (2, 3, 4))):
        _perturb(prompt)
        fp.patch_model(model, prompt)
        assert any(len(block._forward_pre_hooks) > len(b) for block, b in zip(model.blocks, before_hooks))
        with torch.no_grad():
            assert rel(model(x), before) > 1e-4  # the prompt changes the output
        fp.unpatch_model(model)
        assert [dict(block._forward_pre_hooks) for block in model.blocks] == before_hooks
        assert not any(block._forward_pre_hooks_with_kwargs for block in model.blocks)
        assert all("forward" not in block.attn.__dict__ for block in model.blocks)
        with torch.no_grad():
            assert torch.equal(model(x), before)
    mine.remove()


@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_one_stage_on_timm_without_a_class_token_is_refused(reg_tokens):
    """query='cls' reads index 0 of the hidden state: without a class token that is a register token (or a patch),
    not a [CLS]; query='mean' is accepted."""
    model = tiny_vit(class_token=False, reg_tokens=reg_tokens, global_pool="avg")
    with pytest.raises(ValueError, match="no \\[CLS\\] token; use query='mean'"):
        fp.patch_model(model, _coda(model, (0, 1)))
    fp.patch_model(model, fp.CodaPrompt(model, pool_size=4, num_tasks=2, length=2, layers=(0, 1), query="mean",
                                        query_pass="one_stage"))
    with torch.no_grad():
        assert model(pixels(2)).shape == (2, 10)
