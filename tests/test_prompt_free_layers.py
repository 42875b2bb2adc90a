"""A layer without a prompt, asked for nothing but plain attention, runs the attention the unpatched model runs (the
SDPA call of transformers' "sdpa" path, or of timm's fused path): its outputs are the unpatched model's, bit for
bit. fastprompt's op keeps every call that needs it: a prefix, a key padding mask, a bias, attention dropout,
soft-capping, a window, grouped KV heads, a causal block whose query and key lengths differ, and every call under a
backend the user chose (backend="auto" only)."""
import copy

import pytest
import torch

import fastprompt as fp
from fastprompt import ops
from fastprompt.integrations.transformers_attention import plain_sdpa_call
from prompts_helpers import single_thread  # noqa: F401 (autouse fixture)
from vision_helpers import _layers, pixels, tiny_vision_model


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of fastprompt's op (the integrations look `ops.prefix_attention` up per call)."""
    calls = []
    real = ops.prefix_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "prefix_attention", counting)
    return calls


def _pool(model, layers):
    prompt = fp.PromptPool(model, pool_size=4, length=2, top_k=1, placement="prefix", layers=list(layers))
    with torch.no_grad():
        for p in prompt.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return prompt


def _layer_outputs(model, x):
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
             for layer in _layers(model)]
    try:
        with torch.no_grad():
            model(pixel_values=x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_prompt_free_layers_are_the_unpatched_models(op_calls):
    model = tiny_vision_model("vit", "cls", layers=3)
    model.config._attn_implementation = "sdpa"
    twin = copy.deepcopy(model)
    prompt = _pool(model, layers=[2])
    fp.patch_model(model, prompt)
    x = pixels(3)
    patched, unpatched = _layer_outputs(model, x), _layer_outputs(twin, x)
    # the query pass (no prompt anywhere) and the prompted pass's layers 0-1 run no op; layer 2 reads its prefix
    assert len(op_calls) == 1
    query_pass, prompted = patched[:3], patched[3:]
    for got, want in zip(query_pass + prompted[:2], unpatched + unpatched[:2]):
        assert torch.equal(got, want)
    assert not torch.allclose(prompted[2], unpatched[2])  # the prompt changes layer 2


def test_a_chosen_backend_runs_every_layer(op_calls):
    model = tiny_vision_model("vit", "cls", layers=3)
    fp.patch_model(model, _pool(model, layers=[2]), backend="torch")
    with torch.no_grad():
        model(pixel_values=pixels(3))
    assert len(op_calls) == 6  # the query pass's three layers and the prompted pass's three


def _qk(hq=4, hkv=4, lq=5, lk=5):
    return torch.randn(2, hq, lq, 8), torch.randn(2, hkv, lk, 8)


@pytest.mark.parametrize("change,plain", [
    ({}, True),
    ({"causal": True}, True),                                 # Lq = Lk: top-left and bottom-right causality agree
    ({"causal": True, "shape": dict(lq=1, lk=7)}, True),      # one query sees every key
    ({"causal": True, "shape": dict(lq=3, lk=7)}, False),     # SDPA's causality would be top-left
    ({"causal": False, "shape": dict(lq=3, lk=7)}, True),
    ({"shape": dict(hkv=2)}, False),                          # grouped KV heads
    ({"kpm": True}, False),
    ({"bias": True}, False),
    ({"dropout_p": 0.1}, False),
    ({"softcap": 30.0}, False),
    ({"window": 4}, False),
])
def test_which_calls_are_plain_attention(change, plain):
    q, k = _qk(**change.get("shape", {}))
    kpm = torch.ones(2, k.shape[2], dtype=torch.bool) if change.get("kpm") else None
    bias = torch.zeros(1, q.shape[1], q.shape[2], k.shape[2]) if change.get("bias") else None
    assert plain_sdpa_call(q, k, kpm, bias, change.get("dropout_p", 0.0), change.get("softcap"),
                            change.get("window"), change.get("causal", False)) is plain


def test_attention_dropout_in_training_keeps_the_op(op_calls):
    model = tiny_vision_model("vit", "cls", layers=3)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):  # ViTSelfAttention: its probability, passed as `dropout` in train()
            module.attention_dropout = 0.1
    fp.patch_model(model, _pool(model, layers=[2]))
    model.train()
    model(pixel_values=pixels(3))
    assert len(op_calls) == 6


def test_timm_blocks_without_a_prompt_run_timms_attention(op_calls):
    pytest.importorskip("timm")
    from test_timm_vision import pixels as timm_pixels
    from test_timm_vision import tiny_vit

    model = tiny_vit(depth=3)
    twin = copy.deepcopy(model)
    prompt = fp.DualPrompt(model, g_length=2, e_length=3, pool_size=4, g_layers=[1], e_layers=[2])
    fp.patch_model(model, prompt)
    x = timm_pixels(2)
    got, want = [], []
    model.blocks[0].register_forward_hook(lambda m, a, out: got.append(out))
    twin.blocks[0].register_forward_hook(lambda m, a, out: want.append(out))
    with torch.no_grad():
        model(x)
        twin(x)
    # block 0 has no prompt: in the query pass and in the prompted pass it is timm's own block
    assert got and all(torch.allclose(g, want[0], rtol=0, atol=1e-6) for g in got)
    # the prompted pass's blocks 1 and 2 read their prefixes through the op; nothing else does
    assert len(op_calls) == 2
