"""fastprompt's own prompts on T5 / BART, each against a hand-written oracle on the unpatched model.

Input-level prompts (PromptTuning, PTuning, PromptPool(placement="input"), MultiTaskPrompt) go before the encoder
input: the oracle computes each row's prompt by hand from the prompt's parameters (pool selection from the frozen
encoder's masked-mean encoding, task selectors / MPT products written out) and feeds the unpatched model the explicit
`[prompt; input]` encoder embeddings with P ones in front of the attention mask. Decoder inputs and labels are the
target's.

Prefix prompts (PrefixTuning, PTuningV2, PromptPool(placement="prefix")) go into the decoder's self-attention: the
oracle runs the unpatched model with an EncoderDecoderCache built by hand whose self-attention cache holds each row's
prefix K/V (B copies, concatenated by transformers) and whose cross-attention cache is empty, decoder_attention_mask
extended with P ones (PEFT's encoder-decoder prefix semantics written out; the test checks the cache was read).

generate() is judged by a no-cache greedy loop over those oracles (decoder_input_ids grown one token at a time).
"""
import copy
import pickle

import pytest
import torch
import transformers
from torch.nn import functional as F
from transformers import DynamicCache, EncoderDecoderCache

from gradient_checks import assert_grads_close
from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from seq2seq_helpers import requires_seq2seq_transformers, prompt_grads, rel, seq2seq_inputs, tiny_seq2seq, \
    tiny_seq2seq_config

pytestmark = requires_seq2seq_transformers

import fastprompt
from fastprompt.prompts import MultiTaskPrompt, PrefixTuning, PromptPool, PromptTuning, PTuning, PTuningV2

INPUT_KINDS = ["prompt_tuning", "ptuning_mlp", "ptuning_lstm", "pool_hard", "pool_soft", "multitask_selector",
               "multitask_mpt"]
PREFIX_KINDS = ["prefix", "ptuning_v2", "pool_prefix"]
TASK_IDS = torch.tensor([2, 0, 2])


def _make(kind, model):
    c = model.config
    makers = {
        "prompt_tuning": lambda: PromptTuning(c, num_virtual_tokens=3),
        "ptuning_mlp": lambda: PTuning(c, num_virtual_tokens=3, encoder="mlp", encoder_hidden_size=16),
        "ptuning_lstm": lambda: PTuning(c, num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8),
        "pool_hard": lambda: PromptPool(c, pool_size=5, length=2, top_k=2),
        "pool_soft": lambda: PromptPool(c, pool_size=5, length=2, top_k=None, temperature=0.5),
        "multitask_selector": lambda: MultiTaskPrompt(c, num_tasks=3, variant="selector", pool_size=4, length=3),
        "multitask_mpt": lambda: MultiTaskPrompt(c, num_tasks=3, variant="mpt", length=3, rank=2),
        "prefix": lambda: PrefixTuning(c, num_virtual_tokens=3, encoder_hidden_size=16),
        "ptuning_v2": lambda: PTuningV2(c, num_virtual_tokens=4),
        "pool_prefix": lambda: PromptPool(c, pool_size=5, length=2, top_k=2, placement="prefix"),
    }
    prompt = makers[kind]().eval()  # dropout off: both sides deterministic
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():  # large random values: a misplaced prompt moves the logits a lot
        for p in prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return prompt


def _setup(family, kind):
    base = tiny_seq2seq(family)
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    prompt = _make(kind, base)
    oracle_prompt = copy.deepcopy(prompt)
    fastprompt.patch_model(base, prompt)
    return base, ref, prompt, oracle_prompt


def _task_kwargs(kind):
    return {"task_ids": TASK_IDS} if kind.startswith("multitask") else {}


# ----------------------------------------------------------------------------------------------------------------
# the oracles


def _encoder_query(ref, ids, mask):
    """The frozen encoder's masked-mean encoding of the input, without prompts."""
    with torch.no_grad():
        hidden = ref.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1)


def _hand_prompts(kind, p, query, batch, task_ids):
    """[B, P, d] prompt rows and the aux loss, written out from the prompt's parameters."""
    if kind == "prompt_tuning":
        return p.embedding.expand(batch, -1, -1), None
    if kind == "ptuning_mlp":
        return p.mlp(p.embedding).expand(batch, -1, -1), None
    if kind == "ptuning_lstm":
        return p.mlp(p.lstm(p.embedding[None])[0][0]).expand(batch, -1, -1), None
    if kind in ("pool_hard", "pool_soft"):
        sim = F.normalize(query, dim=-1) @ F.normalize(p.keys, dim=-1).t()
        if kind == "pool_soft":
            return torch.einsum("bn,nld->bld", torch.softmax(sim / p.config.temperature, -1), p.pool), None
        chosen, index = sim.topk(p.config.top_k, dim=-1)
        return p.pool[index].reshape(batch, -1, p.pool.shape[-1]), -p.config.pull_constraint_coeff * chosen.mean()
    if kind == "multitask_selector":
        logits = torch.einsum("bnd,bd->bn", p.selector_weight[task_ids], query) + p.selector_bias[task_ids]
        return torch.einsum("bn,nld->bld", torch.softmax(logits, -1), p.pool), None
    if kind == "multitask_mpt":
        return p.shared_prompt[None] * (p.task_cols[task_ids] @ p.task_rows[task_ids]), None
    raise KeyError(kind)


def _prefix_cache(prefixes, batch):
    """{layer: LayerPrefix} -> EncoderDecoderCache with per-row prefix rows in the self-attention part."""
    from fastprompt.reference import expand_prefix

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    for layer in sorted(prefixes):
        lp = prefixes[layer]
        k, visible = expand_prefix(lp.key, lp.index, batch)
        v, _ = expand_prefix(lp.value, lp.index, batch)
        assert bool(visible.all())  # the oracle does not model empty pool slots
        cache.self_attention_cache.update(k, v, layer)
    return cache


def _oracle(ref, kind, p, ids, mask, *, labels=None, decoder_input_ids=None, decoder_mask=None, task_ids=TASK_IDS):
    batch = ids.shape[0]
    query = _encoder_query(ref, ids, mask)
    target = dict(labels=labels, decoder_input_ids=decoder_input_ids)
    target_len = (labels if labels is not None else decoder_input_ids).shape[1]
    if decoder_mask is None:
        decoder_mask = torch.ones(batch, target_len, dtype=torch.long)
    if kind in PREFIX_KINDS:
        cache = _prefix_cache(p.layer_prefixes(batch, query=query if kind == "pool_prefix" else None), batch)
        plen = cache.get_seq_length()
        out = ref(input_ids=ids, attention_mask=mask, decoder_attention_mask=torch.cat(
            [torch.ones(batch, plen, dtype=torch.long), decoder_mask], 1), cache=cache, use_cache=True, **target)
        assert cache.get_seq_length() == plen + target_len  # the prefix cache was read and extended
        aux = p.aux_loss if kind == "pool_prefix" else None
    else:
        prompts, aux = _hand_prompts(kind, p, query, batch, task_ids)
        embeds = torch.cat([prompts, ref.get_input_embeddings()(ids)], 1)
        enc_mask = torch.cat([torch.ones(batch, prompts.shape[1], dtype=torch.long), mask], 1)
        out = ref(inputs_embeds=embeds, attention_mask=enc_mask, decoder_attention_mask=decoder_mask,
                  use_cache=False, **target)
    if aux is not None and out.loss is not None:
        out.loss = out.loss + aux  # the pool's key-pull term, as the integration adds it
    return out


def _greedy_loop(ref, kind, p, ids, mask, steps):
    """(tokens, each step's next-token logits)."""
    start = ref.config.decoder_start_token_id
    decoder = torch.full((ids.shape[0], 1), start, dtype=torch.long)
    step_logits = []
    with torch.no_grad():
        for _ in range(steps):  # full forward, no cache of real tokens
            logits = _oracle(ref, kind, p, ids, mask, decoder_input_ids=decoder).logits[:, -1]
            step_logits.append(logits)
            decoder = torch.cat([decoder, logits.argmax(-1, keepdim=True)], dim=1)
    return decoder, step_logits


# ----------------------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_oracle_embeddings_are_the_models_own(family):
    # the input-level oracle feeds get_input_embeddings()(ids): the model's own encoder input for those ids
    ref = tiny_seq2seq(family)
    ids, mask, labels, decoder_mask = seq2seq_inputs(family)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask)
        b = ref(inputs_embeds=ref.get_input_embeddings()(ids), attention_mask=mask, labels=labels,
                decoder_attention_mask=decoder_mask)
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("kind", INPUT_KINDS + PREFIX_KINDS)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_own_prompt_matches_oracle(family, kind):
    base, ref, prompt, oracle_prompt = _setup(family, kind)
    ids, mask, labels, decoder_mask = seq2seq_inputs(family)
    out = base(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask,
               **_task_kwargs(kind))
    expected = _oracle(ref, kind, oracle_prompt, ids, mask, labels=labels, decoder_mask=decoder_mask)
    assert out.logits.shape == labels.shape + (base.config.vocab_size,)  # decoder outputs: real targets only
    assert rel(out.logits, expected.logits) < 1e-5
    assert abs(out.loss.item() - expected.loss.item()) < 1e-5
    out.loss.backward()
    expected.loss.backward()
    grads, ref_grads = prompt_grads(prompt), prompt_grads(oracle_prompt)
    trainable = {n for n, q in prompt.named_parameters() if q.requires_grad}
    assert grads.keys() == ref_grads.keys() == trainable  # every prompt parameter is reached
    assert_grads_close(grads, ref_grads, 1e-4, norm=True)
    assert all(p.grad is None for p in base.parameters() if p is not None and not p.requires_grad)


@pytest.mark.parametrize("kind", INPUT_KINDS + PREFIX_KINDS)
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_own_prompt_generate_equals_no_cache_greedy_loop(family, kind):
    base, ref, prompt, oracle_prompt = _setup(family, kind)
    base.generation_config.eos_token_id = None  # every row runs all steps
    ids, mask, _, _ = seq2seq_inputs(family)
    expected, expected_logits = _greedy_loop(ref, kind, oracle_prompt, ids, mask, steps=4)
    with torch.no_grad():
        out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, **_task_kwargs(kind))
    assert torch.equal(out.sequences, expected)
    # the logits too: a tiny random model may pick the same tokens with or without its prompt
    for got, want in zip(out.logits, expected_logits, strict=True):
        assert rel(got, want) < 1e-5
    if kind in INPUT_KINDS:  # the same tokens with the encoder input given positionally
        with torch.no_grad():
            again = base.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                  **_task_kwargs(kind))
        assert torch.equal(again, expected)


def _beam_oracle(ref, kind, p, ids, mask, steps, num_beams):
    """Per input row: the `num_beams` best sequences by summed log-probability, best first, with those sums."""
    results = []
    with torch.no_grad():
        for row in range(ids.shape[0]):
            beams = torch.full((1, 1), ref.config.decoder_start_token_id, dtype=torch.long)
            scores = torch.zeros(1, dtype=torch.float64)
            for _ in range(steps):
                n = beams.shape[0]
                logits = _oracle(ref, kind, p, ids[row:row + 1].expand(n, -1), mask[row:row + 1].expand(n, -1),
                                 decoder_input_ids=beams, task_ids=TASK_IDS[row:row + 1].expand(n)).logits[:, -1]
                logp = torch.log_softmax(logits.double(), dim=-1)
                scores, flat = (scores[:, None] + logp).reshape(-1).topk(num_beams)
                beams = torch.cat([beams[flat // logp.shape[-1]], (flat % logp.shape[-1])[:, None]], dim=1)
            results.append((beams, scores))
    return results


@pytest.mark.parametrize("kind", ["prompt_tuning", "pool_hard", "multitask_selector", "prefix", "pool_prefix"])
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_own_prompt_beam_search_equals_oracle_search(family, kind):
    # per-row prompts (pool selection, task ids) follow their row into its beams; the encoder runs once on B rows
    base, ref, prompt, oracle_prompt = _setup(family, kind)
    base.generation_config.eos_token_id = None
    ids, mask, _, _ = seq2seq_inputs(family)
    batch, beams, steps = ids.shape[0], 3, 3
    with torch.no_grad():
        out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                            num_beams=beams, num_return_sequences=beams, length_penalty=1.0, output_scores=True,
                            return_dict_in_generate=True, **_task_kwargs(kind))
    sequences = out.sequences.view(batch, beams, -1)
    scores = out.sequences_scores.view(batch, beams).double()
    for row, (want_beams, want_scores) in enumerate(_beam_oracle(ref, kind, oracle_prompt, ids, mask, steps, beams)):
        assert torch.equal(sequences[row], want_beams), row
        torch.testing.assert_close(scores[row] * steps, want_scores, rtol=1e-5, atol=1e-5)


def test_input_prompt_forward_with_given_encoder_outputs_passes_through():
    # generate's decode steps hand the forward the encoder output, which already holds the prompt
    base, ref, prompt, oracle_prompt = _setup("t5", "prompt_tuning")
    ids, mask, labels, decoder_mask = seq2seq_inputs("t5")
    expected = _oracle(ref, "prompt_tuning", oracle_prompt, ids, mask, labels=labels, decoder_mask=decoder_mask)
    embeds = torch.cat([prompt.embedding.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], 1)
    enc_mask = torch.cat([torch.ones(ids.shape[0], 3, dtype=torch.long), mask], 1)
    encoder_outputs = base.get_encoder()(inputs_embeds=embeds, attention_mask=enc_mask)
    out = base(encoder_outputs=encoder_outputs, attention_mask=enc_mask, labels=labels,
               decoder_attention_mask=decoder_mask)
    assert rel(out.logits, expected.logits) < 1e-6


def test_input_prompt_unpatch_restores_generate_and_pickles():
    base, ref, prompt, _ = _setup("bart", "pool_hard")
    assert "generate" in base.__dict__
    clone = pickle.loads(pickle.dumps(base))
    ids, mask, _, _ = seq2seq_inputs("bart")
    with torch.no_grad():
        a = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        b = clone.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, b)
    fastprompt.unpatch_model(base)
    assert "generate" not in base.__dict__ and "forward" not in base.__dict__
    with torch.no_grad():
        c = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        d = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(c, d)


def test_own_prompt_bad_configurations_on_encoder_decoder():
    base = tiny_seq2seq("t5")
    c = base.config
    with pytest.raises(ValueError, match="query_layer"):
        fastprompt.patch_model(base, PromptPool(c, pool_size=4, length=2, top_k=1, query_layer=1))
    heads = fastprompt.TaskHeads(c.d_model, {"a": fastprompt.SequenceClassificationHead(num_labels=2)})
    with pytest.raises(ValueError, match="heads="):
        fastprompt.patch_model(base, MultiTaskPrompt(c, heads=heads, length=2))
    with pytest.raises(ValueError, match="placement='input'.*T5Model"):
        fastprompt.patch_model(transformers.T5Model(tiny_seq2seq_config("t5")), PromptTuning(c, num_virtual_tokens=2))
    wrong = PrefixTuning(PrefixTuning.config_class(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=4,
                                                   head_dim=8, num_virtual_tokens=2))  # a 3-layer decoder's
    with pytest.raises(ValueError, match="layers"):
        fastprompt.patch_model(base, wrong)
    assert "forward" not in base.__dict__ and "generate" not in base.__dict__  # refused: nothing attached

    fastprompt.patch_model(base, MultiTaskPrompt(c, num_tasks=2, variant="mpt", length=2))
    ids, mask, _, _ = seq2seq_inputs("t5")
    with pytest.raises(ValueError, match="task_ids"):
        base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="task id 5"):
        base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, task_ids=torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="encoder_outputs"):
        base.generate(encoder_outputs=base.get_encoder()(input_ids=ids), max_new_tokens=2, task_ids=TASK_IDS % 2)
    with pytest.raises(ValueError, match="task_ids"):
        base(input_ids=ids, attention_mask=mask, labels=ids)
    fastprompt.unpatch_model(base)

    fastprompt.patch_model(base, PromptTuning(c, num_virtual_tokens=2))
    with pytest.raises(ValueError, match="task_ids"):
        base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, task_ids=torch.tensor([0, 0, 0]))
    fastprompt.unpatch_model(base)
    assert base.config._attn_implementation == "eager"


def _seq2seq_spelling(name, ref, ids, mask, static):
    """(args, kwargs, changes to the model's default generation config, decoder tokens generated). The decoder
    sequence is the start token and the new ones; max_length counts both (transformers' rule)."""
    from transformers import GenerationConfig

    cache = {"cache_implementation": "static"} if static else {}
    if name == "positional":
        return (ids,), dict(attention_mask=mask, max_new_tokens=4, **cache), {}, 4
    if name == "input_ids":
        return (), dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, **cache), {}, 4
    if name == "inputs":
        return (), dict(inputs=ids, attention_mask=mask, max_new_tokens=4, **cache), {}, 4
    if name == "inputs_embeds":
        embeds = ref.get_input_embeddings()(ids).detach()
        return (), dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, **cache), {}, 4
    if name == "config_max_length":
        return (), dict(inputs=ids, attention_mask=mask,
                        generation_config=GenerationConfig(max_length=3, **cache)), {}, 2
    if name == "config_both":  # max_new_tokens takes precedence over max_length
        return (), dict(input_ids=ids, attention_mask=mask,
                        generation_config=GenerationConfig(max_length=2, max_new_tokens=4, **cache)), {}, 4
    if name == "config_positional":
        return (ids, GenerationConfig(max_new_tokens=3, **cache)), dict(attention_mask=mask), {}, 3
    if name == "model_default":  # the model's default max_new_tokens wins over a max_length keyword
        return (), dict(inputs=ids, attention_mask=mask, max_length=2), dict(max_new_tokens=4, **cache), 4
    raise KeyError(name)


@pytest.mark.parametrize("spelling", ["positional", "input_ids", "inputs", "inputs_embeds", "config_max_length",
                                      "config_both", "config_positional", "model_default"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["prompt_tuning", "multitask_mpt", "pool_hard"])
def test_own_prompt_generate_every_spelling_equals_no_cache_greedy_loop(kind, cache, spelling):
    base, ref, prompt, oracle_prompt = _setup("t5", kind)
    base.generation_config.eos_token_id = None  # every row runs all steps
    ids, mask, _, _ = seq2seq_inputs("t5")
    args, kwargs, defaults, new = _seq2seq_spelling(spelling, ref, ids, mask, cache == "static")
    for key, value in defaults.items():
        setattr(base.generation_config, key, value)
    with torch.no_grad():
        out = base.generate(*args, **kwargs, **_task_kwargs(kind))
    expected, _ = _greedy_loop(ref, kind, oracle_prompt, ids, mask, steps=new)
    assert torch.equal(out, expected), f"{spelling}: {out} != oracle {expected}"


def test_own_prompt_generate_refuses_inputs_twice_as_transformers_does():
    base, ref, prompt, _ = _setup("t5", "prompt_tuning")
    ids, mask, _, _ = seq2seq_inputs("t5")
    with pytest.raises(ValueError) as unpatched:
        ref.generate(ids, input_ids=ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError) as got:
        base.generate(ids, input_ids=ids, attention_mask=mask, max_new_tokens=2)
    assert str(got.value) == str(unpatched.value)
    embeds = ref.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="inputs_embeds"):
        base.generate(ids, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=2)
