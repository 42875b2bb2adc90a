"""Helpers for the prompt-method tests: tiny models (hidden 32, 2 layers) and a plain eager attention that reads
explicitly concatenated prefixes, used as the reference for prefix placement (no DynamicCache, no fastprompt op).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

VOCAB = 61
PAD = 0
EOS = 2
REF_ATTENTION = "fastprompt_test_concat_reference"

# layer index -> (key [B, Hkv, P, D], value [B, Hkv, P, D]); set by the tests, read by the reference attention.
REFERENCE_PREFIXES: dict = {}


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        **common)
    if family == "mistral":
        return transformers.MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          sliding_window=4, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=64, **common)
    if family == "gemma2":
        return transformers.Gemma2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                                         final_logit_softcapping=30.0, sliding_window=4,
                                         max_position_embeddings=64, **common)
    if family == "roberta":
        return transformers.RobertaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0, num_labels=3, **common)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "bert":
        return transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0, num_labels=3, **common)
    raise KeyError(family)


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    if family in ("bert", "roberta"):
        model = transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attn)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if family == "gemma2"
                                                              else attn)
    return model.eval()


def reference_copy(model):
    """An unpatched twin of `model` whose attention concatenates REFERENCE_PREFIXES explicitly."""
    _register_reference()
    twin = copy.deepcopy(model)
    twin.config = copy.deepcopy(model.config)
    twin.set_attn_implementation(REF_ATTENTION)
    return twin


def make_inputs(batch=4, seq=6, padding="left", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "left":
        mask[1, :2] = 0
        if batch > 2:
            mask[2, :1] = 0
    elif padding == "right":
        mask[1, -2:] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(module, "layer_idx", None)
    batch, hq, lq, d = query.shape
    lk = key.shape[2]
    extra = 0
    if layer in REFERENCE_PREFIXES:
        pk, pv = REFERENCE_PREFIXES[layer]
        key = torch.cat([pk.to(key.dtype), key], dim=2)
        value = torch.cat([pv.to(value.dtype), value], dim=2)
        extra = pk.shape[2]
    group = hq // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else d**-0.5
    scores = query @ key.transpose(-1, -2) * scale
    softcap = kwargs.get("softcap")
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        mask = attention_mask[..., -lk:]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=scores.dtype).masked_fill(~mask, torch.finfo(scores.dtype).min)
        zeros = torch.zeros(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)
        scores = scores + torch.cat([zeros, mask], dim=-1)  # prefix keys always visible
    probs = torch.softmax(scores, dim=-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


_registered = False


def _register_reference():
    global _registered
    if not _registered:
        AttentionInterface.register(REF_ATTENTION, _reference_attention)
        AttentionMaskInterface.register(REF_ATTENTION, eager_mask)
        _registered = True


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models on a shared CPU: intra-op threads only contend. Imported by the test modules (autouse there)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def positions_from_mask(mask):
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def prompt_grads(prompt):
    return {n: p.grad.detach().clone() for n, p in prompt.named_parameters() if p.grad is not None}


def zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None
