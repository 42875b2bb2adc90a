"""fastprompt's own prefix prompts (PrefixTuning, PTuningV2, PromptPool) on T5 / BART, vs a hand-built oracle.

Oracle (independent of fastprompt's attention): the unpatched base model run with an EncoderDecoderCache built by
hand whose self-attention cache holds each row's prefix K/V (B copies, concatenated by transformers) and whose
cross-attention cache is empty, decoder_attention_mask extended with P ones: PEFT's encoder-decoder prefix
semantics written out. The test checks the cache was really used (its length grows from P to P + T).
"""
import copy

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from seq2seq_helpers import requires_seq2seq_transformers, prompt_grads, rel, seq2seq_inputs, tiny_seq2seq

pytestmark = requires_seq2seq_transformers

import fastprompt
from fastprompt.prompts import PrefixTuning, PromptPool, PromptTuning, PTuningV2


def _oracle_cache(prefixes, batch):
    """prefixes: {layer: LayerPrefix} -> EncoderDecoderCache with per-row prefix rows in the self-attention part."""
    from fastprompt.reference import expand_prefix

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    for layer in sorted(prefixes):
        lp = prefixes[layer]
        k, visible = expand_prefix(lp.key, lp.index, batch)
        v, _ = expand_prefix(lp.value, lp.index, batch)
        assert bool(visible.all())  # the oracle does not model empty pool slots
        cache.self_attention_cache.update(k, v, layer)
    return cache


def _oracle_step(base, prompt, ids, mask, labels, decoder_mask, query=None):
    prefixes = prompt.layer_prefixes(ids.shape[0], query=query)
    cache = _oracle_cache(prefixes, ids.shape[0])
    plen = cache.get_seq_length()
    dmask = torch.cat([torch.ones(ids.shape[0], plen, dtype=torch.long), decoder_mask], dim=1)
    out = base(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask, cache=cache,
               use_cache=True)
    assert cache.get_seq_length() == plen + labels.shape[1]  # the prefix cache was read and extended
    if getattr(prompt, "aux_loss", None) is not None and getattr(prompt.config, "add_aux_loss", False):
        out.loss = out.loss + prompt.aux_loss  # the pool's key-pull term, as the integration adds it
    return out


def _make(kind, model):
    if kind == "prefix":
        return PrefixTuning(model.config, num_virtual_tokens=3, encoder_hidden_size=16)
    if kind == "ptuning_v2":
        return PTuningV2(model.config, num_virtual_tokens=4)
    if kind == "pool":
        return PromptPool(model.config, pool_size=5, length=2, top_k=2, placement="prefix")
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["prefix", "ptuning_v2", "pool"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_own_prefix_prompts_match_cache_oracle(family, kind):
    base = tiny_seq2seq(family)
    oracle_base = copy.deepcopy(base)
    for p in oracle_base.parameters():
        p.requires_grad_(False)
    prompt = _make(kind, base).eval()  # P-tuning v2's prefix dropout off: both sides deterministic
    oracle_prompt = copy.deepcopy(prompt)
    fastprompt.patch_model(base, prompt)
    ids, mask, labels, decoder_mask = seq2seq_inputs(family)
    query = torch.randn(ids.shape[0], base.config.d_model, generator=torch.Generator().manual_seed(3)) \
        if kind == "pool" else None
    extra = {"prompt_query": query} if query is not None else {}
    out = base(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask, **extra)
    ref = _oracle_step(oracle_base, oracle_prompt, ids, mask, labels, decoder_mask, query=query)
    assert rel(out.logits, ref.logits) < 1e-5
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    out.loss.backward()
    ref.loss.backward()
    grads, ref_grads = prompt_grads(prompt), prompt_grads(oracle_prompt)
    assert grads and grads.keys() == ref_grads.keys()
    for name in grads:
        assert rel(grads[name], ref_grads[name]) < 1e-4, name


def test_own_prefix_generate_equals_no_cache_loop():
    base = tiny_seq2seq("t5")
    base.generation_config.eos_token_id = None
    prompt = _make("prefix", base)
    fastprompt.patch_model(base, prompt)
    ids, mask, _, _ = seq2seq_inputs("t5")
    decoder = torch.zeros(ids.shape[0], 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(4):  # the oracle loop: full forward, no cache
            logits = base(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, use_cache=False).logits
            decoder = torch.cat([decoder, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, decoder)


def test_own_prompt_refusals_on_encoder_decoder():
    base = tiny_seq2seq("bart")
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        fastprompt.patch_model(base, PromptTuning(base.config, num_virtual_tokens=3))
    fastprompt.patch_model(base, _make("prefix", base))
    fastprompt.unpatch_model(base)
    assert base.config._attn_implementation == "eager"
