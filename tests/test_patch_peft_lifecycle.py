"""patch/unpatch lifecycle, what the patched prefix path hands the attention, save/load, refusals."""
import copy

import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import (
    assert_rel_close,
    greedy_no_cache,
    make_inputs,
    peft_config,
    tiny_model,
    tiny_peft_pair,
)

import fastprompt
import fastprompt.patching as fpp
from fastprompt.integrations.transformers_attention import ATTENTION_NAME, model_layout

peft = pytest.importorskip("peft")


def _module_dicts(model):
    return {name: sorted(m.__dict__.keys()) for name, m in model.named_modules()}


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_unpatch_restores_exactly(method):
    patched, oracle = tiny_peft_pair("qwen2", method, "CAUSAL_LM")
    before_dicts, before_hooks = _module_dicts(patched), _hooks(patched)
    before_impl = patched.get_base_model().config._attn_implementation
    ids, mask = make_inputs(padding="left")
    reference = patched(input_ids=ids, attention_mask=mask).logits
    assert fpp.patch_model(patched) is patched
    if method == "prefix":
        assert patched.get_base_model().config._attn_implementation == ATTENTION_NAME
    assert fpp.unpatch_model(patched) is patched
    assert _module_dicts(patched) == before_dicts
    assert _hooks(patched) == before_hooks
    assert patched.get_base_model().config._attn_implementation == before_impl
    assert torch.equal(patched(input_ids=ids, attention_mask=mask).logits, reference)
    assert fpp.unpatch_model(patched) is patched  # unpatching an unpatched model: nothing to do


def test_patch_twice_is_noop_and_other_models_untouched():
    patched, other = tiny_peft_pair("llama", "prefix", "CAUSAL_LM")
    cls_forward = type(patched).forward
    fpp.patch_model(patched)
    state = copy.copy(patched.__dict__)
    fpp.patch_model(patched)
    assert patched.__dict__.keys() == state.keys()
    assert all(patched.__dict__[k] is state[k] for k in state)
    assert type(patched).forward is cls_forward  # no class-level monkey patching
    assert "forward" not in other.__dict__
    assert other.get_base_model().config._attn_implementation == "sdpa"
    fpp.unpatch_model(patched)
    assert patched.get_base_model().config._attn_implementation == "sdpa"


def test_public_names():
    assert fastprompt.patch_model is fpp.patch_model
    assert fastprompt.unpatch_model is fpp.unpatch_model


class _OpSpy:
    def __init__(self, monkeypatch):
        import fastprompt.ops

        self.calls = []
        real = fastprompt.ops.prefix_attention

        def spy(q, k, v, prefix_k=None, prefix_v=None, **kwargs):
            self.calls.append(dict(q=q.shape, k=k.shape, prefix_k=None if prefix_k is None else prefix_k.shape,
                                   mask=None if kwargs.get("key_padding_mask") is None
                                   else kwargs["key_padding_mask"].shape, **{
                                       n: kwargs.get(n) for n in ("causal", "backend", "window", "softcap")}))
            return real(q, k, v, prefix_k, prefix_v, **kwargs)

        monkeypatch.setattr(fastprompt.ops, "prefix_attention", spy)


@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_attention_gets_shared_prefix_no_concat_no_repeat(family, monkeypatch):
    task = "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"
    patched, _ = tiny_peft_pair(family, "prefix", task, num_virtual_tokens=5)
    fpp.patch_model(patched, backend="torch")
    layout = model_layout(patched)
    spy = _OpSpy(monkeypatch)
    ids, mask = make_inputs(batch=3, seq=7, padding="hole")
    out = patched(input_ids=ids, attention_mask=mask)
    assert len(spy.calls) == layout.num_layers
    for call in spy.calls:
        assert call["q"] == (3, layout.num_heads, 7, layout.head_dim)
        assert call["k"] == (3, layout.num_kv_heads, 7, layout.head_dim)      # not P+S, not repeated
        assert call["prefix_k"] == (layout.num_kv_heads, 5, layout.head_dim)  # stored once, not per row
        assert call["mask"] == (3, 7)                                         # 2D key padding mask
        assert call["causal"] == layout.is_causal and call["backend"] == "torch"
    if family == "gemma2":
        assert {c["softcap"] for c in spy.calls} == {2.0}
    if task == "CAUSAL_LM":
        from fastprompt.integrations.cache_compat import output_cache

        assert output_cache(out).get_seq_length() == 7  # the returned cache holds real tokens only


def test_no_padding_means_no_mask(monkeypatch):
    patched, _ = tiny_peft_pair("mistral", "prefix", "CAUSAL_LM")
    fpp.patch_model(patched)
    spy = _OpSpy(monkeypatch)
    ids, mask = make_inputs(padding="none")
    patched(input_ids=ids, attention_mask=mask)
    assert spy.calls and all(c["mask"] is None for c in spy.calls)
    assert all(c["window"] == 64 for c in spy.calls)


@pytest.mark.parametrize("method,expected_shape", [("prefix", (4,)), ("prefix_proj", (4,)), ("prompt", (1, 4)),
                                                    ("ptuning_mlp", (1, 4)), ("ptuning_lstm", (1, 4))])
def test_prompt_encoder_runs_once_on_p_tokens(method, expected_shape):
    patched, _ = tiny_peft_pair("llama", method, "CAUSAL_LM", num_virtual_tokens=4)
    fpp.patch_model(patched)
    shapes = []
    encoder = patched.prompt_encoder["default"]
    handle = encoder.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    ids, mask = make_inputs(batch=3, padding="left")
    patched(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    handle.remove()
    assert shapes == [expected_shape]


def test_mpt_looks_up_shared_prompt_once():
    patched, oracle = tiny_peft_pair("llama", "mpt", "CAUSAL_LM", num_virtual_tokens=4)
    fpp.patch_model(patched)
    shapes = []
    emb = patched.prompt_encoder["default"].embedding
    handle = emb.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    ids, mask = make_inputs(batch=3, padding="left")
    patched(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 2]))
    handle.remove()
    assert shapes == [(4,)]


@pytest.mark.parametrize("method", ["prefix_proj", "ptuning_mlp"])
def test_save_load_round_trip(method, tmp_path):
    patched, oracle = tiny_peft_pair("llama", method, "CAUSAL_LM")
    fpp.patch_model(patched)
    patched.save_pretrained(tmp_path / "patched")
    oracle.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "patched" / "adapter_model.safetensors")
    b = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a patched model loads an adapter saved unpatched (inference_mode: the projected prefix is stored directly)
    base = tiny_model("llama", "CAUSAL_LM")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "plain").eval()
    fpp.patch_model(loaded)
    ids, mask = make_inputs(padding="left")
    with torch.no_grad():
        assert_rel_close(loaded(input_ids=ids, attention_mask=mask).logits,
                         oracle(input_ids=ids, attention_mask=mask).logits, 1e-5, what="from_pretrained")
        # ... and a second adapter loaded into an already patched model
        patched.load_adapter(tmp_path / "plain", adapter_name="again")
        patched.set_adapter("again")
        assert_rel_close(patched(input_ids=ids, attention_mask=mask).logits,
                         oracle(input_ids=ids, attention_mask=mask).logits, 1e-5, what="load_adapter")


def test_refuses_lora():
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", r=2))
    with pytest.raises(ValueError, match="LORA"):
        fpp.patch_model(model)


def test_refuses_plain_model_without_prompt():
    with pytest.raises(TypeError, match="PeftModel"):
        fpp.patch_model(tiny_model("llama"))


def test_refuses_unsupported_task():
    base = tiny_model("bert", "FEATURE_EXTRACTION")
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3))
    model.active_peft_config.task_type = "SEQ_2_SEQ_LM"  # the one PEFT task patch_model does not take
    with pytest.raises(ValueError, match="SEQ_2_SEQ_LM"):
        fpp.patch_model(model)


@pytest.mark.parametrize("kind", ["bloom", "falcon"])
def test_refuses_models_outside_the_interface(kind):
    import transformers

    if kind == "bloom":
        cfg = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=97)
        base = transformers.BloomForCausalLM(cfg)
    else:
        cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=97)
        base = transformers.FalconForCausalLM(cfg)
    model = peft.get_peft_model(base, peft_config("prefix", "CAUSAL_LM"))
    with pytest.raises((TypeError, ValueError), match=kind):
        fpp.patch_model(model)
    assert "forward" not in model.__dict__


def test_backend_is_stored_and_validated(monkeypatch):
    patched, _ = tiny_peft_pair("llama", "prefix", "CAUSAL_LM")
    with pytest.raises(ValueError, match="backend"):
        fpp.patch_model(patched, backend="fast")
    assert "forward" not in patched.__dict__
    fpp.patch_model(patched, backend="reference")
    spy = _OpSpy(monkeypatch)
    ids, mask = make_inputs(padding="left")
    patched(input_ids=ids, attention_mask=mask)
    assert {c["backend"] for c in spy.calls} == {"reference"}
    fpp.patch_model(patched, backend="torch")  # re-patching only switches the backend
    spy.calls.clear()
    patched(input_ids=ids, attention_mask=mask)
    assert {c["backend"] for c in spy.calls} == {"torch"}


def test_disable_adapter_context_on_a_patched_model():
    patched, oracle = tiny_peft_pair("llama", "prefix", "CAUSAL_LM")
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="left")
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        with patched.disable_adapter(), oracle.disable_adapter():
            assert_rel_close(patched(input_ids=ids, attention_mask=mask).logits,
                             oracle(input_ids=ids, attention_mask=mask).logits, 1e-5, what="disabled")
            assert torch.equal(patched.generate(input_ids=ids, attention_mask=mask, **gen),
                               oracle.generate(input_ids=ids, attention_mask=mask, **gen))
        assert_rel_close(patched(input_ids=ids, attention_mask=mask).logits,
                         oracle(input_ids=ids, attention_mask=mask).logits, 1e-5, what="re-enabled")
        # with the adapter back, generate() follows PEFT's full forward again (no-cache oracle: PEFT's own
        # generate() is not right on every transformers release)
        assert torch.equal(patched.generate(input_ids=ids, attention_mask=mask, **gen),
                           greedy_no_cache(oracle, ids, mask, 4, eos=3))


def test_switching_attention_away_is_refused():
    patched, _ = tiny_peft_pair("llama", "prefix", "CAUSAL_LM")
    fpp.patch_model(patched)
    patched.get_base_model().set_attn_implementation("sdpa")
    ids, mask = make_inputs(padding="left")
    with pytest.raises(RuntimeError, match="unpatch_model"):
        patched(input_ids=ids, attention_mask=mask)


def test_no_private_peft_or_transformers_imports():
    """Private helpers come and go between releases (peft 0.20 has no `_get_return_dict_transformers_v4`):
    fastprompt imports no underscore name from peft or transformers."""
    import ast
    import pathlib

    offenders = []
    for path in pathlib.Path(fastprompt.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("peft", "transformers"):
                offenders += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert not offenders, offenders
