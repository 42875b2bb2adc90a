"""fastprompt.patch_model on PEFT SEQ_2_SEQ_LM prompt learning (T5, T5 v1.1, mT5, BART) = unpatched PEFT.

Oracle: PEFT 0.21.2's own forward, unpatched. Its prefix-tuning semantics (prefix in the decoder's self-attention
only; the cross-attention cache PEFT builds is reset to empty) are the same on transformers 5.23 and 5.24 (checked by
instrumenting the attention on both; see fastprompt/integrations/seq2seq.py).
"""
import pytest
import torch

from gradient_checks import assert_grads_close
from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from seq2seq_helpers import (SEQ2SEQ_FAMILIES, _seq2seq_supported, peft_seq2seq_pair, prompt_grads, rel,
                             requires_seq2seq_transformers, seq2seq_inputs, tiny_seq2seq)

import fastprompt

peft = pytest.importorskip("peft")


def _config(method, **extra):
    common = dict(task_type="SEQ_2_SEQ_LM", **{"num_virtual_tokens": 3, **extra})
    if method == "prefix":
        return peft.PrefixTuningConfig(**common)
    if method == "prefix_proj":
        return peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=16, **common)
    if method == "prompt":
        return peft.PromptTuningConfig(**common)
    if method == "ptuning_mlp":
        return peft.PromptEncoderConfig(encoder_hidden_size=16, encoder_reparameterization_type="MLP", **common)
    if method == "ptuning_lstm":
        return peft.PromptEncoderConfig(encoder_hidden_size=16, encoder_reparameterization_type="LSTM", **common)
    if method == "mpt":
        return peft.MultitaskPromptTuningConfig(num_tasks=3, **common)
    raise KeyError(method)


def _step(model, family, method, **extra):
    ids, mask, labels, decoder_mask = seq2seq_inputs(family)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if method == "mpt":
        kwargs["task_ids"] = torch.tensor([2, 0, 1])  # PEFT's MPT with 2 submodules builds decoder inputs from labels
    else:
        kwargs["decoder_attention_mask"] = decoder_mask
    kwargs.update(extra)
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, prompt_grads(model)


def _assert_parity(patched, oracle, family, method, **extra):
    out_p, grads_p = _step(patched, family, method, **extra)
    out_o, grads_o = _step(oracle, family, method, **extra)
    assert rel(out_p.logits, out_o.logits) < 1e-5
    assert abs(out_p.loss.item() - out_o.loss.item()) <= 1e-5 * max(1.0, abs(out_o.loss.item()))
    assert grads_o and grads_p.keys() == grads_o.keys()
    assert_grads_close(grads_p, grads_o, 1e-4, norm=True)


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning_mlp", "ptuning_lstm", "mpt"])
@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
@requires_seq2seq_transformers
def test_seq2seq_parity(family, method):
    patched, oracle = peft_seq2seq_pair(family, _config(method))
    fastprompt.patch_model(patched)
    _assert_parity(patched, oracle, family, method)


@pytest.mark.parametrize("family", ["t5", "bart"])
@requires_seq2seq_transformers
def test_seq2seq_prefix_projection_and_one_submodule_prompt(family):
    patched, oracle = peft_seq2seq_pair(family, _config("prefix_proj"))
    fastprompt.patch_model(patched)
    _assert_parity(patched, oracle, family, "prefix_proj")
    patched, oracle = peft_seq2seq_pair(family, _config("prompt", num_transformer_submodules=1))
    fastprompt.patch_model(patched)
    _assert_parity(patched, oracle, family, "prompt")


@requires_seq2seq_transformers
def test_t5_prefix_relative_bias_long_distances():
    """More virtual tokens than the bias has exact buckets, explicit decoder_input_ids: the prefix keys land in the
    logarithmic buckets, and the patched model still equals PEFT."""
    patched, oracle = peft_seq2seq_pair("t5v11", _config("prefix", num_virtual_tokens=11))
    fastprompt.patch_model(patched)
    ids, mask, labels, decoder_mask = seq2seq_inputs("t5v11", tgt=9)
    decoder_ids = labels.clamp(min=0)
    _assert_parity(patched, oracle, "t5v11", "prefix", decoder_input_ids=decoder_ids, labels=labels,
                   decoder_attention_mask=decoder_mask)


@requires_seq2seq_transformers
def test_seq2seq_prefix_read_in_place(monkeypatch):
    """The op gets one shared [H, P, D] prefix per decoder self-attention (no B copies, no concatenation) and T5's
    bias as attn_bias + prefix_bias. The prefix-less calls (T5's encoder self-attention, the cross-attention) run
    the same SDPA call as transformers' own path, not the op."""
    import fastprompt.ops as ops

    patched, _ = peft_seq2seq_pair("t5", _config("prefix"))
    fastprompt.patch_model(patched)
    calls = []
    real = ops.prefix_attention

    def spy(q, k, v, prefix_k=None, prefix_v=None, **kw):
        calls.append((q.shape, None if prefix_k is None else tuple(prefix_k.shape), kw.get("attn_bias") is not None,
                      kw.get("prefix_bias") is not None, kw.get("causal")))
        return real(q, k, v, prefix_k, prefix_v, **kw)

    monkeypatch.setattr(ops, "prefix_attention", spy)
    ids, mask, labels, decoder_mask = seq2seq_inputs("t5")
    with torch.no_grad():
        patched(input_ids=ids, attention_mask=mask, labels=labels)
    prefixed = [c for c in calls if c[1] is not None]
    assert len(calls) == 2 and len(prefixed) == 2  # decoder self 2 (prefixed); the cross-attention runs SDPA
    assert all(c[1] == (4, 3, 8) and c[2] and c[3] and c[4] for c in prefixed)


@requires_seq2seq_transformers
def test_seq2seq_unpatch_restores_and_adapter_saves_unchanged(tmp_path):
    patched, oracle = peft_seq2seq_pair("bart", _config("prefix"))
    before = {k: v.clone() for k, v in patched.state_dict().items()}
    fastprompt.patch_model(patched)
    assert patched.get_base_model().config._attn_implementation == "fastprompt_seq2seq"
    patched.save_pretrained(tmp_path / "a")
    oracle.save_pretrained(tmp_path / "b")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fastprompt.unpatch_model(patched)
    assert patched.get_base_model().config._attn_implementation == "eager"
    assert "forward" not in patched.__dict__
    assert all(torch.equal(before[k], v) for k, v in patched.state_dict().items())
    _assert_parity(patched, oracle, "bart", "prefix")


@requires_seq2seq_transformers
def test_seq2seq_refusals():
    import transformers

    base = transformers.AutoModelForSeq2SeqLM.from_config(transformers.PegasusConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16))
    model = peft.get_peft_model(base, _config("prompt"))
    with pytest.raises((ValueError, TypeError), match="pegasus"):
        fastprompt.patch_model(model)
    patched, _ = peft_seq2seq_pair("t5", _config("prefix", num_transformer_submodules=1))
    with pytest.raises(ValueError, match="num_transformer_submodules=2"):
        fastprompt.patch_model(patched)


@pytest.mark.parametrize("family", ["t5", "bart"])
@requires_seq2seq_transformers
def test_seq2seq_prefix_gradient_checkpointing(family):
    """PEFT refuses prefix tuning under gradient checkpointing; the patched model trains with it (non-reentrant)
    and gets the gradients of the unpatched PEFT model without checkpointing; reentrant is refused clearly."""
    patched, oracle = peft_seq2seq_pair(family, _config("prefix"))
    fastprompt.patch_model(patched)
    patched.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()
    _assert_parity(patched, oracle, family, "prefix")
    patched.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="non-reentrant"):
        _step(patched, family, "prefix")



@pytest.mark.skipif(_seq2seq_supported(), reason="this transformers is supported: nothing is refused")
def test_seq2seq_refused_on_older_transformers():
    from fastprompt.prompts import PrefixTuning

    model = tiny_seq2seq("t5", 0)
    with pytest.raises(ValueError, match="encoder-decoder prompt learning .* needs transformers >="):
        fastprompt.patch_model(model, PrefixTuning(model.config, num_virtual_tokens=3))
