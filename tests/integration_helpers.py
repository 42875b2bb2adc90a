"""Shared helpers for the transformers/PEFT integration tests: tiny model per family, PEFT configs, inputs.

Every model is built from a config (no hub access) small enough for a shared 2-core CPU: hidden 32, 2 layers.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from gradient_checks import assert_grads_close

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

VOCAB = 97
PAD = 1

DECODER_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2"]
ENCODER_FAMILIES = ["bert", "roberta"]
FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend (17x slower measured). Import this
    fixture into a test module to make it autouse there; the previous thread count is restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(family: str):
    """A fresh tiny config of `family` (its own object: models never share a config)."""
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=2, eos_token_id=3)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       **common)
    elif family == "mistral":
        cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         sliding_window=64, **common)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       **common)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128, **common)
    elif family == "gemma":
        cfg = transformers.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                       max_position_embeddings=128, **common)
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                                        final_logit_softcapping=30.0, sliding_window=64,
                                        max_position_embeddings=128, **common)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif family == "bert":
        cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    elif family == "roberta":
        cfg = transformers.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    else:
        raise KeyError(family)
    cfg.num_labels = 3
    return cfg


_AUTO = {
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
    "FEATURE_EXTRACTION": AutoModel,
}


def override_tiny_config(monkeypatch, **attrs):
    """For one test: every config tiny_config builds (and so every tiny model and PEFT pair) gets `attrs` set
    (e.g. sliding_window=8)."""
    import sys

    build = tiny_config

    def with_attrs(family: str):
        cfg = build(family)
        for name, value in attrs.items():
            setattr(cfg, name, value)
        return cfg

    monkeypatch.setattr(sys.modules[__name__], "tiny_config", with_attrs)


def tiny_model(family: str, task: str = "CAUSAL_LM", seed: int = 0, attn: str | None = None):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    if attn is None:  # Gemma 2 has no sdpa path in transformers; eager is its reference
        attn = "eager" if family == "gemma2" else "sdpa"
    model = _AUTO[task].from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def peft_config(method: str, task: str, num_virtual_tokens: int = 4, **extra):
    import peft

    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens, **extra)
    if method == "prefix_proj":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens, prefix_projection=True,
                                       encoder_hidden_size=16, **extra)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens, **extra)
    if method == "ptuning_mlp":
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=num_virtual_tokens,
                                        encoder_hidden_size=16, encoder_reparameterization_type="MLP", **extra)
    if method == "ptuning_lstm":
        return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=num_virtual_tokens,
                                        encoder_hidden_size=16, encoder_reparameterization_type="LSTM", **extra)
    if method == "mpt":
        return peft.MultitaskPromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens, num_tasks=3,
                                                **extra)
    raise KeyError(method)


def randomize_prompt_parameters(model, seed: int = 1):
    """PEFT zero-inits some prompt parameters (MPT's task factors): make every one of them matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def tiny_peft_pair(family: str, method: str, task: str, num_virtual_tokens: int = 4, seed: int = 0, **extra):
    """Two identical PEFT models (same base weights, same prompt parameters); patch one, keep one as the oracle."""
    import peft

    base = tiny_model(family, task, seed=seed)
    base2 = copy.deepcopy(base)
    base2.config = copy.deepcopy(base.config)
    torch.manual_seed(seed + 1)
    m1 = peft.get_peft_model(base, peft_config(method, task, num_virtual_tokens, **extra))
    m2 = peft.get_peft_model(base2, peft_config(method, task, num_virtual_tokens, **extra))
    randomize_prompt_parameters(m1)
    m2.load_state_dict(m1.state_dict())
    return m1.eval(), m2.eval()


def make_inputs(batch: int = 3, seq: int = 7, padding: str = "left", seed: int = 0):
    """input_ids [B, S] and attention_mask with `padding` in {"none", "left", "right", "hole"}."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    last = batch - 1  # rows 0.. keep at least one real token whatever the batch size
    if padding == "left":
        mask[min(1, last), :2] = 0
        mask[last, :3] = 0
    elif padding == "right":
        mask[min(1, last), -2:] = 0
        mask[last, -3:] = 0
    elif padding == "hole":
        mask[0, 2] = 0
        mask[last, 1] = 0
        mask[last, 4 % seq] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_rel_close(actual, expected, rel, what=""):
    """Relative to the tensor's scale: |a - e| <= rel * (|e| + max|e|) elementwise. Outputs and losses; gradients are
    compared on the whole gradient's scale (gradient_checks.assert_grads_close)."""
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-12),
                               msg=lambda m: f"{what}: {m}")


def prompt_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def needs_peft():
    return pytest.importorskip("peft")


def tasks_of(family: str):
    return ["CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION"] if family in DECODER_FAMILIES else ["SEQ_CLS",
                                                                                              "FEATURE_EXTRACTION"]


FAMILY_TASKS = [(f, t) for f in FAMILIES for t in tasks_of(f)]


def labels_for(task: str, ids, mask):
    if task == "CAUSAL_LM":
        return ids if mask is None else ids.masked_fill(mask == 0, -100)
    if task == "SEQ_CLS":
        return torch.arange(ids.shape[0], device=ids.device) % 3
    return None


def run_step(model, task, ids, mask, **kwargs):
    """Forward (+ labels where the task has them) and backward; returns (main output, loss)."""
    labels = labels_for(task, ids, mask)
    if labels is not None:
        kwargs["labels"] = labels
    out = model(input_ids=ids, attention_mask=mask, **kwargs)
    if task == "FEATURE_EXTRACTION":
        hidden = out.last_hidden_state
        weights = torch.linspace(0.5, 1.5, hidden.numel(), device=hidden.device).view_as(hidden)
        loss = (hidden.square() * weights).mean()  # positive terms: no cancellation to amplify rounding
        main = hidden
    else:
        loss, main = out.loss, out.logits
    loss.backward()
    return main.detach(), loss.detach()


def assert_step_parity(patched, oracle, task, ids, mask, what="", **kwargs):
    patched.zero_grad(set_to_none=True)
    oracle.zero_grad(set_to_none=True)
    main_p, loss_p = run_step(patched, task, ids, mask, **kwargs)
    main_o, loss_o = run_step(oracle, task, ids, mask, **kwargs)
    assert_rel_close(main_p, main_o, 1e-5, what=f"{what} outputs")
    assert_rel_close(loss_p, loss_o, 1e-5, what=f"{what} loss")
    grads_p, grads_o = prompt_grads(patched), prompt_grads(oracle)
    assert grads_p.keys() == grads_o.keys() and grads_p, f"{what}: trainable parameters differ"
    assert_grads_close(grads_p, grads_o, 1e-4, what=what)


# ----------------------------------------------------------------------------------------------------------------
# Oracles for generation that rest on nothing but a model's full forward (no cache, no generate(), no PEFT/transformers
# generation machinery): they cannot rot when that machinery changes.


def generate_positions(mask):
    """The position ids transformers' generate() builds from a 2D mask: cumsum(mask) - 1, pads at 0."""
    mask = mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _full_forward_logits(forward, tokens, mask, positions, extra):
    kwargs = dict(input_ids=tokens, attention_mask=mask, use_cache=False, **extra)
    if positions:
        kwargs["position_ids"] = generate_positions(mask)
    return forward(**kwargs).logits


def greedy_no_cache(forward, ids, mask, steps, *, pad=PAD, eos=None, positions=True, **extra):
    """Greedy decoding as a step-by-step argmax over `forward`'s logits for the WHOLE sequence so far (no cache).

    `forward` is the unpatched model's forward (a PeftModel's, or a plain model's); each step it sees the full
    tokens and mask, and (`positions=True`) generate()'s padding-aware position ids. Rows that emitted `eos` get
    `pad` afterwards and decoding stops once every row is finished, as generate() does. `extra` goes to every call
    (e.g. task_ids). Returns [B, S + new] token ids."""
    tokens, m = ids.clone(), mask.clone()
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    with torch.no_grad():
        for _ in range(steps):
            logits = _full_forward_logits(forward, tokens, m, positions, extra)
            nxt = logits[:, -1].argmax(-1)
            if eos is not None:
                nxt = nxt.masked_fill(finished, pad)
                finished = finished | (nxt == eos)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            m = torch.cat([m, torch.ones_like(nxt[:, None])], 1)
            if eos is not None and bool(finished.all()):
                break
    return tokens


def sequence_logprob_no_cache(forward, ids, mask, sequences, *, eos=None, positions=True, **extra):
    """Sum of the log-probabilities of each row's generated tokens (after `ids`) under `forward`'s full-sequence
    logits (no cache), up to and including its first `eos`. `sequences` [R, S + new] with R a multiple of B (beam
    search's num_return_sequences): row r continues prompt r // (R // B). Returns [R] float64."""
    reps = sequences.shape[0] // ids.shape[0]
    mask = mask.repeat_interleave(reps, dim=0)
    extra = {k: v.repeat_interleave(reps, dim=0) if torch.is_tensor(v) and v.dim() and v.shape[0] == ids.shape[0]
             else v for k, v in extra.items()}  # per-row arguments (task_ids) follow their rows
    start = ids.shape[1]
    new = sequences[:, start:]
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        logits = _full_forward_logits(forward, sequences, full_mask, positions, extra)
    # counted from the end: an input-level PEFT model's logits also cover its P virtual tokens in front
    logprobs = torch.log_softmax(logits[:, -new.shape[1] - 1:-1].double(), dim=-1)
    picked = logprobs.gather(-1, new[..., None])[..., 0]
    if eos is not None:  # tokens after the first eos are padding, not scored by beam search
        is_eos = (new == eos).long()
        after_eos = (is_eos.cumsum(-1) - is_eos) > 0
        picked = picked.masked_fill(after_eos, 0.0)
    return picked.sum(-1)


def assert_greedy_matches(got, expected, what=""):
    assert torch.equal(got, expected), f"{what}: generate() tokens\n{got}\n!= no-cache greedy oracle\n{expected}"


def assert_beam_scores_match(output, forward, ids, mask, *, eos=None, positions=True, rel=1e-4, **extra):
    """Beam search with length_penalty=0: each returned sequence's score is its summed log-probability. Check it
    against the same sum under the full no-cache forward (so every step's logits were the model's own)."""
    want = sequence_logprob_no_cache(forward, ids, mask, output.sequences, eos=eos, positions=positions, **extra)
    got = output.sequences_scores.double()
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()),
                               msg=lambda m: f"beam scores vs no-cache log-probabilities: {m}")


def peft_generate_is_right() -> bool:
    """PEFT's prompt-learning generate() follows the cache under the name the installed transformers uses.

    PEFT <= 0.21.2 looks for `past_key_values` in the generation kwargs; transformers >= 5.24 calls it `cache`, so
    PEFT re-inserts the prompt at every step (input-level methods) or drops its prefix cache (prefix tuning)."""
    import inspect

    import peft
    from transformers.generation.utils import GenerationMixin

    renamed = "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    if not renamed:
        return True
    source = inspect.getsource(peft.PeftModelForCausalLM.prepare_inputs_for_generation)
    return '"cache"' in source or "'cache'" in source


def peft_versions() -> str:
    import peft

    return f"peft {peft.__version__} on transformers {transformers.__version__}"


def peft_refuses_encoder_prefix_tuning() -> bool:
    """PEFT's sequence-classification / encoder prefix tuning needs a `past_key_values` parameter; transformers
    >= 5.24 names it `cache`, so PEFT raises "Model does not support past key values ..."."""
    import inspect

    import peft

    source = inspect.getsource(peft.PeftModelForSequenceClassification._prefix_tuning_forward)
    if '"cache"' in source or "'cache'" in source:
        return False
    return "past_key_values" not in inspect.signature(transformers.BertModel.forward).parameters


# ----------------------------------------------------------------------------------------------------------------
# PEFT's prefix tuning written out by hand: the oracle where PEFT refuses to run it (sequence classification and
# encoders on transformers >= 5.24, where PEFT looks for a `past_key_values` parameter that is now `cache`).


class HandWrittenPeftPrefix:
    """PEFT's prefix-tuning semantics for an (unpatched) PeftModel, without PEFT's forward:
    `base_model(input_ids, attention_mask=[ones(P); mask], cache=model.get_prompt(B), labels=...)`, user
    position_ids shifted by P, token_type_ids kept for sequence classification only (PEFT's rules). The cache goes
    under the name the installed transformers takes. Parameters and gradients are the PeftModel's."""

    def __init__(self, peft_model):
        self.model = peft_model

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)

    def named_parameters(self):
        return self.model.named_parameters()

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, position_ids=None,
                 token_type_ids=None, **kwargs):
        from fastprompt.integrations.cache_compat import cache_kwarg

        model = self.model
        config = model.active_peft_config
        task = getattr(config.task_type, "value", config.task_type)
        num = config.num_virtual_tokens
        source = input_ids if input_ids is not None else inputs_embeds
        batch = source.shape[0]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, num), attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + num
        base = model.get_base_model()
        call = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids, **kwargs)
        if task == "SEQ_CLS" and token_type_ids is not None:
            call["token_type_ids"] = token_type_ids
        if task != "FEATURE_EXTRACTION":
            call["labels"] = labels
        call[cache_kwarg(base.forward)] = model.get_prompt(batch)
        return base(**call)


def peft_or_hand_written_prefix(oracle, ids, mask):
    """The unpatched PeftModel where PEFT runs prefix tuning on this model, else its semantics written out."""
    try:
        with torch.no_grad():
            oracle(input_ids=ids[:1], attention_mask=None if mask is None else mask[:1])
    except ValueError as err:
        if "past key values" not in str(err):
            raise
        return HandWrittenPeftPrefix(oracle)
    return oracle
