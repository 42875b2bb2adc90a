"""The shared plumbing API: LayerPrefix / enable / disable / layer_prefixes / model_layout."""
import copy

import pytest
import torch

from gradient_checks import assert_grads_close
from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import FAMILIES, assert_close, make_inputs, tiny_model

from fastprompt.integrations.transformers_attention import (
    ATTENTION_NAME,
    LayerPrefix,
    disable_fastprompt_attention,
    enable_fastprompt_attention,
    layer_prefixes,
    model_layout,
)

EXPECTED_LAYOUT = {  # family -> (num_kv_heads, head_dim, is_causal, softcap, position_style)
    "llama": (2, 8, True, None, "offset"),
    "mistral": (2, 8, True, None, "offset"),
    "qwen2": (2, 8, True, None, "offset"),
    "qwen3": (2, 16, True, None, "offset"),
    "gemma": (1, 8, True, None, "offset"),
    "gemma2": (2, 8, True, 2.0, "offset"),
    "gpt2": (4, 8, True, None, "offset"),
    "bert": (4, 8, False, None, "offset"),
    "roberta": (4, 8, False, None, "roberta"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_model_layout(family):
    model = tiny_model(family, "FEATURE_EXTRACTION")
    layout = model_layout(model)
    kv, dim, causal, softcap, style = EXPECTED_LAYOUT[family]
    assert (layout.num_layers, layout.num_heads, layout.hidden_size) == (2, 4, 32)
    assert (layout.num_kv_heads, layout.head_dim, layout.is_causal, layout.softcap, layout.position_style) == (
        kv, dim, causal, softcap, style)
    assert len(layout.layer_types) == 2


def _explicit_prefix_model_output(model, ids, mask, prefixes):
    """Oracle: the same model, eager attention, prefix as a P-long DynamicCache (PEFT's way) per layer."""
    from transformers import DynamicCache

    oracle = copy.deepcopy(model)
    oracle.set_attn_implementation("eager")
    layout = model_layout(oracle)
    batch = ids.shape[0]
    P = next(iter(prefixes.values())).key.shape[-2]
    cache = DynamicCache(config=oracle.config)
    for idx in range(layout.num_layers):
        lp = prefixes[idx]
        cache.update(lp.key[None].expand(batch, -1, -1, -1), lp.value[None].expand(batch, -1, -1, -1), idx)
    full_mask = torch.cat([torch.ones(batch, P, dtype=mask.dtype), mask], dim=1)
    pos = torch.arange(P, P + ids.shape[1])[None]
    from fastprompt.integrations.cache_compat import cache_kwarg

    prefix_cache = {cache_kwarg(oracle.forward): cache}  # `cache` from transformers 5.24, `past_key_values` before
    return oracle(input_ids=ids, attention_mask=full_mask, position_ids=pos, **prefix_cache).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layer_prefixes_match_prefix_as_cache(family):
    model = tiny_model(family, "CAUSAL_LM")
    layout = model_layout(model)
    torch.manual_seed(3)
    P = 3
    prefixes = {i: LayerPrefix(torch.randn(layout.num_kv_heads, P, layout.head_dim),
                               torch.randn(layout.num_kv_heads, P, layout.head_dim))
                for i in range(layout.num_layers)}
    ids, mask = make_inputs(padding="left")
    expected = _explicit_prefix_model_output(model, ids, mask, prefixes)
    before = model.config._attn_implementation
    token = enable_fastprompt_attention(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    pos = torch.arange(P, P + ids.shape[1])[None]
    with layer_prefixes(model, prefixes):
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert_close(got, expected, what=family)
    # outside the block: no prefix at all
    plain = model(input_ids=ids, attention_mask=mask).logits
    disable_fastprompt_attention(model, token)
    assert model.config._attn_implementation == before
    assert_close(plain, model(input_ids=ids, attention_mask=mask).logits, what="no prefix")


def test_layers_absent_get_no_prefix_and_other_models_untouched():
    model = tiny_model("llama", "CAUSAL_LM")
    other = tiny_model("llama", "CAUSAL_LM")
    layout = model_layout(model)
    ids, mask = make_inputs(padding="none")
    ref = model(input_ids=ids, attention_mask=mask).logits
    token = enable_fastprompt_attention(model)
    assert other.config._attn_implementation == "sdpa"
    with layer_prefixes(model, {}):
        assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, what="empty prefixes")
    lp = LayerPrefix(torch.zeros(layout.num_kv_heads, 2, layout.head_dim),
                     torch.zeros(layout.num_kv_heads, 2, layout.head_dim))
    with layer_prefixes(model, {1: lp}):
        out = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(out, ref)
    disable_fastprompt_attention(model, token)
    assert not hasattr(model, "_fastprompt_attention_state")


def test_enable_twice_is_nested_noop():
    model = tiny_model("qwen2", "CAUSAL_LM")
    t1 = enable_fastprompt_attention(model)
    t2 = enable_fastprompt_attention(model)
    disable_fastprompt_attention(model, t2)
    assert model.config._attn_implementation == ATTENTION_NAME
    disable_fastprompt_attention(model, t1)
    assert model.config._attn_implementation == "sdpa"


def test_per_sample_and_pool_prefixes():
    model = tiny_model("llama", "CAUSAL_LM")
    layout = model_layout(model)
    ids, mask = make_inputs(padding="right")
    B = ids.shape[0]
    torch.manual_seed(0)
    pool_k = torch.randn(5, layout.num_kv_heads, 2, layout.head_dim)
    pool_v = torch.randn(5, layout.num_kv_heads, 2, layout.head_dim)
    index = torch.tensor([4, 0, 2])
    token = enable_fastprompt_attention(model)
    with layer_prefixes(model, {0: LayerPrefix(pool_k, pool_v, index)}):
        pooled = model(input_ids=ids, attention_mask=mask).logits
    with layer_prefixes(model, {0: LayerPrefix(pool_k[index], pool_v[index])}):
        per_sample = model(input_ids=ids, attention_mask=mask).logits
    disable_fastprompt_attention(model, token)
    assert_close(pooled, per_sample, what="pool vs per-sample")
    assert pooled.shape[0] == B


def test_refuses_model_without_attention_interface():
    import transformers

    cfg = transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, rotary_dim=4)
    model = transformers.GPTJForCausalLM(cfg)
    if getattr(type(model), "_supports_attention_backend", False) and type(model)._can_set_attn_implementation():
        pytest.skip("this transformers version routes GPT-J attention through the interface")
    with pytest.raises(TypeError, match="gptj"):
        enable_fastprompt_attention(model)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_layer_prefixes_survive_gradient_checkpointing(family):
    """The context manager's prefixes reach the backward recompute even when the model's forward is called directly
    (no top-level hook), as a prompt module wrapping `forward` does."""
    import warnings

    task = "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"
    model = tiny_model(family, task).train()
    layout = model_layout(model)
    torch.manual_seed(4)
    keys = torch.randn(layout.num_layers, layout.num_kv_heads, 3, layout.head_dim, requires_grad=True)
    values = torch.randn(layout.num_layers, layout.num_kv_heads, 3, layout.head_dim, requires_grad=True)
    ids, mask = make_inputs(padding="left")
    token = enable_fastprompt_attention(model)

    def grads():
        keys.grad = values.grad = None
        with layer_prefixes(model, {i: LayerPrefix(keys[i], values[i]) for i in range(layout.num_layers)}):
            out = model.forward(input_ids=ids, attention_mask=mask)
        hidden = out.logits if task == "CAUSAL_LM" else out.last_hidden_state
        hidden.square().mean().backward()  # after the block: a recompute must not depend on the block
        return keys.grad.clone(), values.grad.clone()

    plain = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    disable_fastprompt_attention(model, token)
    assert_grads_close(dict(zip(("keys", "values"), checkpointed)), dict(zip(("keys", "values"), plain)), 1e-4,
                       what="checkpointed prefix")


def test_deep_copy_of_an_enabled_model_uses_its_own_state():
    model = tiny_model("llama", "CAUSAL_LM")
    layout = model_layout(model)
    enable_fastprompt_attention(model)
    clone = copy.deepcopy(model)
    lp = LayerPrefix(torch.randn(layout.num_kv_heads, 2, layout.head_dim),
                     torch.randn(layout.num_kv_heads, 2, layout.head_dim))
    ids, mask = make_inputs(padding="left")
    with layer_prefixes(model, {0: lp}):
        expected = model(input_ids=ids, attention_mask=mask).logits
    with layer_prefixes(clone, {0: lp}):
        got = clone(input_ids=ids, attention_mask=mask).logits
        seen = []
        handle = clone.model.layers[0].self_attn.register_forward_pre_hook(
            lambda m, a, kw: seen.append("fastprompt_prefixes" in kw), with_kwargs=True)
        clone(input_ids=ids, attention_mask=mask)
        handle.remove()
    assert_close(got, expected, what="deep copy")
    assert seen == [True]  # the clone's own hook injected the clone's prefixes
