"""generate() of patched PEFT SEQ_2_SEQ_LM models (prefix tuning, prompt tuning, P-tuning on T5 and BART): sampling,
static cache, beam search, and what runs how often.

Oracles never use PEFT's generate() (on transformers 5.24 it drifts from PEFT's own forward for seq2seq prefix
tuning): they are loops over the UNPATCHED PEFT model's full forward without a cache (the decoder input grows by one
token per step and everything is recomputed), written out here:
- greedy: argmax per step;
- sampling: top-k filtering, softmax, one `torch.multinomial` over the `[rows, vocab]` probabilities per step, drawn
  from the global generator seeded as generate() is seeded. generate()'s sampling loop draws exactly that (one
  multinomial per step, nothing else consumes the generator in eval mode), so the tokens must be equal; the per-step
  logits are checked too (rel 1e-5), so a token match is not luck of the draw;
- beam search: the textbook search (every step keep the `num_beams` best continuations of all live beams by summed
  log-probability; no EOS, so every beam runs to the end), and each returned beam's score equals its summed
  log-probability under the oracle's forward divided by its generated length (length_penalty 1).
Counters: forward hooks on the encoder stack and on the adapter's prompt module (PrefixEncoder, PromptEmbedding,
PromptEncoder) show that each runs once per generate() call, the encoder on the B input rows (not B·beams), the
prompt module on P virtual tokens (not B·P, not per beam). The decoder's self-attention cache holds the real tokens
only (no P prefix rows): its length is the generated length; its cross-attention cache holds the encoder's output
(S keys, P + S for the input-level methods whose prompt runs through the encoder).
"""
import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from seq2seq_helpers import peft_seq2seq_pair, rel, requires_seq2seq_transformers, seq2seq_inputs

pytestmark = requires_seq2seq_transformers

import fastprompt

peft = pytest.importorskip("peft")

NEW_TOKENS = 5
NUM_VIRTUAL = 3
METHODS = ["prefix", "prompt", "ptuning"]
FAMILIES = ["t5", "bart"]


def _config(method):
    common = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=NUM_VIRTUAL)
    if method == "prefix":
        return peft.PrefixTuningConfig(**common)
    if method == "prompt":
        return peft.PromptTuningConfig(**common)
    if method == "ptuning":
        return peft.PromptEncoderConfig(encoder_hidden_size=16, **common)
    raise KeyError(method)


def _pair(family, method):
    patched, oracle = peft_seq2seq_pair(family, _config(method))
    for model in (patched, oracle):
        model.get_base_model().generation_config.eos_token_id = None  # fixed length: no early stop to compare
    fastprompt.patch_model(patched)
    return patched, oracle


def _start(model, rows):
    start = model.get_base_model().config.decoder_start_token_id
    return torch.full((rows, 1), start, dtype=torch.long)


def _next_logits(oracle, ids, mask, decoder):
    return oracle(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, use_cache=False).logits[:, -1]


def _top_k(logits, k):
    kth = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


@torch.no_grad()
def _sampling_oracle(oracle, ids, mask, steps, top_k, seed):
    torch.manual_seed(seed)
    decoder, logits_per_step = _start(oracle, ids.shape[0]), []
    for _ in range(steps):
        logits = _next_logits(oracle, ids, mask, decoder)
        logits_per_step.append(logits)
        probs = torch.softmax(_top_k(logits, top_k), dim=-1)
        decoder = torch.cat([decoder, torch.multinomial(probs, num_samples=1)], dim=1)
    return decoder, logits_per_step


@torch.no_grad()
def _greedy_oracle(oracle, ids, mask, steps):
    decoder, logits_per_step = _start(oracle, ids.shape[0]), []
    for _ in range(steps):
        logits = _next_logits(oracle, ids, mask, decoder)
        logits_per_step.append(logits)
        decoder = torch.cat([decoder, logits.argmax(-1, keepdim=True)], dim=1)
    return decoder, logits_per_step


@torch.no_grad()
def _beam_oracle(oracle, ids, mask, steps, num_beams):
    """Per input row: the `num_beams` best sequences by summed log-probability, best first, with those sums."""
    results = []
    for row in range(ids.shape[0]):
        beams, scores = _start(oracle, 1), torch.zeros(1, dtype=torch.float64)
        for _ in range(steps):
            n = beams.shape[0]
            logp = torch.log_softmax(_next_logits(oracle, ids[row:row + 1].expand(n, -1),
                                                  mask[row:row + 1].expand(n, -1), beams).double(), dim=-1)
            total = (scores[:, None] + logp).reshape(-1)
            scores, flat = total.topk(num_beams)
            vocab = logp.shape[-1]
            beams = torch.cat([beams[flat // vocab], (flat % vocab)[:, None]], dim=1)
        results.append((beams, scores))
    return results


@torch.no_grad()
def _log_probability(oracle, ids, mask, sequences):
    """Summed log-probability of each generated sequence (after its start token) under the oracle's forward."""
    logits = oracle(input_ids=ids, attention_mask=mask, decoder_input_ids=sequences[:, :-1], use_cache=False).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(-1, sequences[:, 1:, None]).squeeze(-1).sum(-1)


class _Counters:
    """Forward hooks on the encoder stack and the adapter's prompt module: calls and what each call saw / made."""

    def __init__(self, model):
        self.encoder_rows, self.prompt_shapes = [], []
        encoder = model.get_base_model().get_encoder()
        prompt_module = model.prompt_encoder[model.active_adapter]
        self.handles = [
            encoder.register_forward_hook(self._on_encoder, with_kwargs=True),
            prompt_module.register_forward_hook(lambda mod, args, out: self.prompt_shapes.append(tuple(out.shape))),
        ]

    def _on_encoder(self, module, args, kwargs, out):
        self.encoder_rows.append(tuple(out.last_hidden_state.shape[:2]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def _cache(out):
    return getattr(out, "past_key_values", None) or getattr(out, "cache", None)


def _encoder_length(method, src):
    # prefix tuning: the prefix is in the decoder's self-attention only (PEFT's semantics), the encoder sees the
    # source; prompt tuning / P-tuning: the prompt goes before the encoder input
    return src if method == "prefix" else NUM_VIRTUAL + src


def _assert_once_per_call(counters, model, method, batch, src):
    assert counters.encoder_rows == [(batch, _encoder_length(method, src))]  # once, on the B input rows
    assert len(counters.prompt_shapes) == 1  # the prompt / prefix module: once per call
    shape = counters.prompt_shapes[0]
    # one row of virtual tokens, not B nor B·beams: P for the prefix; P per transformer submodule for the input-level
    # methods (PEFT builds 2P on encoder-decoders and uses the first P; P-tuning's LSTM reads all 2P, so all are run)
    config = model.active_peft_config
    virtual = NUM_VIRTUAL if method == "prefix" else NUM_VIRTUAL * config.num_transformer_submodules
    assert shape[-2] == virtual and (len(shape) == 2 or shape[0] == 1), shape


def _assert_real_token_cache(cache, method, rows, generated, src):
    self_cache = cache.self_attention_cache
    assert self_cache.get_seq_length() == generated  # real decoder tokens only: no P prefix rows
    keys = self_cache.layers[0].keys
    assert keys.shape[0] == rows
    assert cache.cross_attention_cache.get_seq_length() == _encoder_length(method, src)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_equals_seeded_oracle_loop(family, method):
    patched, oracle = _pair(family, method)
    ids, mask, _, _ = seq2seq_inputs(family)
    batch, src = ids.shape
    returns, top_k, seed = 2, 7, 1234
    # num_return_sequences rows per input, side by side (generate's expansion): the oracle samples them the same way
    expected, expected_logits = _sampling_oracle(oracle, ids.repeat_interleave(returns, 0),
                                                 mask.repeat_interleave(returns, 0), NEW_TOKENS, top_k, seed)
    torch.manual_seed(seed)
    with _Counters(patched) as counters, torch.no_grad():
        out = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True,
                               top_k=top_k, top_p=1.0, temperature=1.0, num_return_sequences=returns,
                               output_logits=True, return_dict_in_generate=True)
    for step, (got, want) in enumerate(zip(out.logits, expected_logits)):
        assert rel(got, want) < 1e-5, step
    assert torch.equal(out.sequences, expected)
    assert not torch.equal(out.sequences[:, 1:], _greedy_oracle(oracle, ids.repeat_interleave(returns, 0),
                                                                mask.repeat_interleave(returns, 0),
                                                                NEW_TOKENS)[0][:, 1:])  # it did sample
    _assert_once_per_call(counters, patched, method, batch, src)
    _assert_real_token_cache(_cache(out), method, batch * returns, NEW_TOKENS, src)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_greedy_equals_no_cache_loop(family, method):
    from transformers import StaticCache

    patched, oracle = _pair(family, method)
    ids, mask, _, _ = seq2seq_inputs(family)
    batch, src = ids.shape
    expected, expected_logits = _greedy_oracle(oracle, ids, mask, NEW_TOKENS)
    with _Counters(patched) as counters, torch.no_grad():
        out = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    cache = _cache(out)
    assert isinstance(cache.self_attention_cache, StaticCache)
    for step, (got, want) in enumerate(zip(out.logits, expected_logits)):
        assert rel(got, want) < 1e-5, step
    assert torch.equal(out.sequences, expected)
    _assert_once_per_call(counters, patched, method, batch, src)
    # sized by generate() for the decoder tokens that enter it (the start token and all new ones but the last), with
    # no room for P prefix rows: the prefix never enters the cache
    assert cache.self_attention_cache.layers[0].get_max_length() == NEW_TOKENS
    _assert_real_token_cache(cache, method, batch, NEW_TOKENS, src)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_equals_oracle_search_and_scores_are_log_probabilities(family, method, cache_implementation):
    patched, oracle = _pair(family, method)
    ids, mask, _, _ = seq2seq_inputs(family)
    batch, src = ids.shape
    beams = 3
    with _Counters(patched) as counters, torch.no_grad():
        out = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               num_beams=beams, num_return_sequences=beams, length_penalty=1.0, output_scores=True,
                               cache_implementation=cache_implementation, return_dict_in_generate=True)
    sequences = out.sequences.view(batch, beams, -1)
    scores = out.sequences_scores.view(batch, beams).double()
    for row, (want_beams, want_scores) in enumerate(_beam_oracle(oracle, ids, mask, NEW_TOKENS, beams)):
        assert torch.equal(sequences[row], want_beams), row
        torch.testing.assert_close(scores[row] * NEW_TOKENS, want_scores, rtol=1e-5, atol=1e-5)
    # each returned beam's score is its summed log-probability under the oracle / its generated length
    logp = _log_probability(oracle, ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0),
                            out.sequences)
    torch.testing.assert_close(out.sequences_scores.double() * NEW_TOKENS, logp, rtol=1e-5, atol=1e-5)
    _assert_once_per_call(counters, patched, method, batch, src)
    # the cache holds B·beams rows of real decoder tokens; the last step's token is not in it yet
    _assert_real_token_cache(_cache(out), method, batch * beams, NEW_TOKENS, src)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_input_prompt_generate_equals_peft_generate(method):
    """Where PEFT's generate() is right (input-level prompts: the prompt before the encoder input), the patched
    generate() gives the same tokens: greedy and beam."""
    patched, oracle = _pair("t5", method)
    ids, mask, _, _ = seq2seq_inputs("t5")
    with torch.no_grad():
        for kwargs in (dict(num_beams=1), dict(num_beams=3)):
            a = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 **kwargs)
            b = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                **kwargs)
            assert torch.equal(a, b)


@pytest.mark.parametrize("submodules", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_multitask_prompt_generate_equals_no_cache_loop(family, submodules):
    """Multitask prompt tuning: generate() puts the task's prompt before the encoder input (PEFT's generate does the
    same; its decoder-side prompt, with 2 submodules, is a training-time input only). Oracle: the no-cache greedy loop
    over the unpatched BASE model on [prompt; embedded input], the prompt from the unpatched PEFT model's get_prompt
    (PEFT's MPT forward cannot serve: given decoder_input_ids it does not pass them on)."""
    config = peft.MultitaskPromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=NUM_VIRTUAL, num_tasks=3,
                                              num_transformer_submodules=submodules)
    patched, oracle = peft_seq2seq_pair(family, config)
    for model in (patched, oracle):
        model.get_base_model().generation_config.eos_token_id = None
    fastprompt.patch_model(patched)
    ids, mask, _, _ = seq2seq_inputs(family)
    batch, src = ids.shape
    task_ids = torch.tensor([2, 0, 1])
    base = oracle.get_base_model()
    with torch.no_grad():
        prompt = oracle.get_prompt(batch_size=batch, task_ids=task_ids)[:, :NUM_VIRTUAL]
        embeds = torch.cat([prompt, oracle.word_embeddings(ids)], dim=1)
        full_mask = torch.cat([mask.new_ones(batch, NUM_VIRTUAL), mask], dim=1)
        expected = _start(oracle, batch)
        for _ in range(NEW_TOKENS):
            logits = base(inputs_embeds=embeds, attention_mask=full_mask, decoder_input_ids=expected,
                          use_cache=False).logits[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    encoder_rows = []
    handle = patched.get_base_model().get_encoder().register_forward_hook(
        lambda mod, args, out: encoder_rows.append(tuple(out.last_hidden_state.shape[:2])))
    try:
        with torch.no_grad():
            out = patched.generate(input_ids=ids, attention_mask=mask, task_ids=task_ids, max_new_tokens=NEW_TOKENS,
                                   do_sample=False, return_dict_in_generate=True)
    finally:
        handle.remove()
    assert torch.equal(out.sequences, expected)
    assert encoder_rows == [(batch, NUM_VIRTUAL + src)]
    _assert_real_token_cache(_cache(out), "mpt", batch, NEW_TOKENS, src)
