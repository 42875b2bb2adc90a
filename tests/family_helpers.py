"""Tiny models of the families in fastprompt/integrations/families.py, and PEFT's prefix semantics written out.

Every model is built from a config (no hub access), hidden 32, 2 layers (Gemma 4: 4, two of them KV-shared). Oracles
never run fastprompt code:
- prefix tuning where the base model takes a cache: PEFT's own semantics, `base_model(input_ids, attention_mask=
  [ones(P); mask], cache=peft_model.get_prompt(B), ...)` (PEFT 0.21.2 refuses to call it itself on transformers
  5.24, which renamed `past_key_values` to `cache`; older transformers take it as `past_key_values`).
- prefix tuning on a family whose forward takes no cache (DistilBERT, ModernBERT), or with a sliding window shorter
  than the prefix plus the sequence: transformers' own SDPA attention on `[prefix; sequence]` K/V with the model's
  own 4D mask widened by P always-visible prefix columns (`concat_prefix_oracle`).
"""
from __future__ import annotations

import copy
import inspect
import os
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

from gradient_checks import assert_grads_close  # noqa: E402
from integration_helpers import PAD, VOCAB, make_inputs, peft_config, randomize_prompt_parameters  # noqa: E402,F401

COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=2, eos_token_id=3)
NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# the families, decoders then encoders
NEW_DECODERS = ["opt", "gpt_neox", "gptj", "phi3", "mixtral", "gemma3_text", "qwen2_moe", "olmo2", "granite", "phi"]
NEW_ENCODERS = ["distilbert", "xlm-roberta", "electra", "modernbert"]
NEW_FAMILIES = NEW_DECODERS + NEW_ENCODERS
ENCODERS = ["bert", "roberta"] + NEW_ENCODERS
# families whose forward takes no cache: PEFT's prefix cannot shift their positions
CACHELESS = {"distilbert", "modernbert"}
# attention outside transformers' AttentionInterface: prefix tuning refused, input-level methods accepted
REFUSED_FAMILIES = ["deberta-v2", "falcon", "bloom", "albert"]
# Gemma 4 (transformers >= 5.24's gemma4 module): the text model without per-layer inputs (every PEFT method), and the
# multimodal wrapper AutoModelForCausalLM builds for Gemma 4 checkpoints, with per-layer inputs (prefix tuning only)
GEMMA4 = ["gemma4_text", "gemma4"]
# Validated from transformers 5.25 on (the release whose PEFT tests build Gemma 4); on 5.23 these tests fail inside
# transformers' own Gemma 4 code (per_layer_inputs is None under logits_to_keep), so Gemma 4 is claimed from 5.25.
requires_gemma4 = pytest.mark.skipif(
    not hasattr(transformers, "Gemma4TextConfig") or tuple(int(n) for n in transformers.__version__.split(".")[:2]) < (5, 25),
    reason=f"Gemma 4 is supported from transformers 5.25; installed {transformers.__version__}")


def _gemma4_text_config(window, per_layer_inputs: int):
    """Four layers, local/global, with Gemma 4's per-layer shapes (global layers: head_dim 16, local: 8) and the last
    two layers sharing the K/V of the first two."""
    return transformers.Gemma4TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, global_head_dim=16, sliding_window=window or 64, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=per_layer_inputs,
        vocab_size_per_layer_input=VOCAB, final_logit_softcapping=30.0, max_position_embeddings=128, **COMMON)


def family_config(family: str, window: int | None = None):
    """A fresh tiny config of `family`; `window` sets the local layers' sliding window where the family has one."""
    if family == "opt":
        cfg = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                     word_embed_proj_dim=32, max_position_embeddings=128, dropout=0.0,
                                     attention_dropout=0.0, **COMMON)
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5},
                                         attention_dropout=0.0, hidden_dropout=0.0, **COMMON)
    elif family == "gptj":
        cfg = transformers.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **COMMON)
    elif family == "phi3":
        cfg = transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      sliding_window=window, **COMMON)
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2, max_position_embeddings=128, sliding_window=window,
                                         **COMMON)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                          num_experts_per_tok=2, max_position_embeddings=128, **COMMON)
    elif family == "olmo2":
        cfg = transformers.Olmo2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       **COMMON)
    elif family == "granite":
        cfg = transformers.GraniteConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.5,
                                         logits_scaling=2.0, **COMMON)
    elif family == "phi":
        cfg = transformers.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=128, partial_rotary_factor=0.5, qk_layernorm=True,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **COMMON)
    elif family == "albert":
        cfg = transformers.AlbertConfig(embedding_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=128, **NO_DROPOUT_BERT,
                                        **COMMON)
    elif family == "gemma3_text":
        cfg = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            query_pre_attn_scalar=16, sliding_window=window or 64,
                                            layer_types=["sliding_attention", "full_attention"],
                                            max_position_embeddings=128, **COMMON)
    elif family == "gemma4_text":
        cfg = _gemma4_text_config(window, per_layer_inputs=0)
    elif family == "gemma4":
        names = ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id", "audio_token_id",
                 "boa_token_id", "eoa_token_index")
        special = {name: VOCAB + i for i, name in enumerate(names)}  # past the ids make_inputs draws: text only
        text = _gemma4_text_config(window, per_layer_inputs=8).to_dict()
        text.update(vocab_size=VOCAB + len(names), vocab_size_per_layer_input=VOCAB + len(names))
        cfg = transformers.Gemma4Config(text_config=text, vision_config=None, audio_config=None, **special)
    elif family == "distilbert":
        cfg = transformers.DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=128,
                                            dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
                                            qa_dropout=0.0, **COMMON)
    elif family == "xlm-roberta":
        cfg = transformers.XLMRobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=128, **NO_DROPOUT_BERT,
                                            **COMMON)
    elif family == "electra":
        cfg = transformers.ElectraConfig(embedding_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128, **NO_DROPOUT_BERT,
                                         **COMMON)
    elif family == "modernbert":
        cfg = transformers.ModernBertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=128,
                                            local_attention=2 * (window or 2),
                                            layer_types=["full_attention", "sliding_attention"],
                                            cls_token_id=2, sep_token_id=3, **COMMON)
    elif family == "bert":
        cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=128, **NO_DROPOUT_BERT, **COMMON)
    elif family == "roberta":
        cfg = transformers.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128, **NO_DROPOUT_BERT,
                                         **COMMON)
    elif family == "deberta-v2":
        cfg = transformers.DebertaV2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=128, **NO_DROPOUT_BERT,
                                           **COMMON)
    elif family == "falcon":
        cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        hidden_dropout=0.0, attention_dropout=0.0, **COMMON)
    elif family == "bloom":
        cfg = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
                                       **COMMON)
    else:
        raise KeyError(family)
    cfg.num_labels = 3
    return cfg


_AUTO = {
    "CAUSAL_LM": transformers.AutoModelForCausalLM,
    "SEQ_CLS": transformers.AutoModelForSequenceClassification,
    "TOKEN_CLS": transformers.AutoModelForTokenClassification,
    "QUESTION_ANS": transformers.AutoModelForQuestionAnswering,
    "FEATURE_EXTRACTION": transformers.AutoModel,
}


def family_model(family: str, task: str, seed: int = 0, window: int | None = None, attn: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = family_config(family, window)
    if task == "QUESTION_ANS":
        cfg.num_labels = 2  # start / end
    model_class = _AUTO[task]._model_mapping[type(cfg)]
    if attn != "eager" and not getattr(model_class, "_supports_attention_backend", False):
        # GPT-J before transformers 5.24: its own attention code, which patch_model refuses (check_patchable)
        pytest.skip(f"{model_class.__name__} does not route attention through AttentionInterface in this "
                    "transformers version")
    return model_class._from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def family_peft_pair(family: str, method: str, task: str, num_virtual_tokens: int = 4, seed: int = 0,
                     window: int | None = None, attn: str = "sdpa"):
    """Two identical PEFT models (same base weights, same prompt parameters): one to patch, one as the oracle."""
    import peft

    base = family_model(family, task, seed=seed, window=window, attn=attn)
    base2 = copy.deepcopy(base)  # its modules share the copy's config (an oracle switches its attention)
    # PEFT cannot read DistilBERT's config names (dim, n_heads): its users pass the sizes, so do we
    extra = dict(token_dim=32, num_attention_heads=4, num_layers=2) if family == "distilbert" else {}
    m1 = peft.get_peft_model(base, peft_config(method, task, num_virtual_tokens, **extra))
    m2 = peft.get_peft_model(base2, peft_config(method, task, num_virtual_tokens, **extra))
    randomize_prompt_parameters(m1)
    m2.load_state_dict(m1.state_dict())
    return m1.eval(), m2.eval()


# ----------------------------------------------------------------------------------------------------------------
# Oracles


def cache_argument(peft_model) -> str:
    """The backbone's name for its cache argument: `cache` (transformers >= 5.24) or `past_key_values`."""
    backbone = peft_model.get_base_model()
    backbone = getattr(backbone, "base_model", backbone)
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def peft_prefix_as_cache(oracle, input_ids, attention_mask, **kwargs):
    """PEFT's prefix-tuning forward written out: the prefix is a P-long cache, the mask gets P ones, user position
    ids are shifted by P."""
    batch = input_ids.shape[0]
    P = oracle.active_peft_config.num_virtual_tokens
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    full = torch.cat([torch.ones(batch, P, dtype=attention_mask.dtype), attention_mask], dim=1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + P
    kwargs[cache_argument(oracle)] = oracle.get_prompt(batch)
    return oracle.base_model(input_ids=input_ids, attention_mask=full, **kwargs)


_ORACLE_ATTENTION = "fp_test_concat_prefix"
_registered = False


def _concat_prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA on [prefix; sequence] K/V; the model's own 4D mask (padding, window) gets P visible prefix columns."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = getattr(module, "_test_prefix", None)
    if prefix is not None:
        pk, pv = prefix
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if attention_mask is not None:
            head = torch.ones(*attention_mask.shape[:-1], pk.shape[2], dtype=attention_mask.dtype,
                              device=attention_mask.device)
            if attention_mask.dtype != torch.bool:
                head = torch.zeros_like(head)  # additive float mask: 0 = visible
            attention_mask = torch.cat([head, attention_mask], dim=-1)
        kwargs["is_causal"] = False  # a causal model's 4D mask already says who sees what
        if attention_mask is None and getattr(module, "is_causal", False):
            lq, lk = query.shape[2], key.shape[2]
            attention_mask = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register():
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(_ORACLE_ATTENTION, _concat_prefix_attention)
        AttentionMaskInterface.register(_ORACLE_ATTENTION, sdpa_mask)
        _registered = True


def _attention_modules(hf):
    from fastprompt.integrations.transformers_attention import find_layers  # locates layers only; no math

    layers = find_layers(hf)[1]
    out = []
    for layer in layers:
        mods = [m for m in layer.modules() if hasattr(m, "is_causal") and "cross" not in type(m).__name__.lower()]
        assert mods, f"no attention module in {type(layer).__name__}"
        out.append(mods[0])
    return out


@contextmanager
def concat_prefix_attention(oracle, prefixes):
    """Inside the block the oracle (a PeftModel's base model, or a plain model) attends to `prefixes[l] = (K, V)`
    `[B, Hkv, P, D]` at layer l (None: no prefix)."""
    _register()
    hf = oracle.get_base_model() if hasattr(oracle, "peft_config") else oracle
    previous = hf.config._attn_implementation
    modules = _attention_modules(hf)
    hf.set_attn_implementation(_ORACLE_ATTENTION)
    for module, kv in zip(modules, prefixes):
        module._test_prefix = kv
    assert len(prefixes) == len(modules)
    try:
        yield
    finally:
        for module in modules:
            del module._test_prefix
        hf.set_attn_implementation(previous)


def peft_prefix_kv(oracle, batch):
    """PEFT's own prefix as a list of per-layer (K, V) `[B, Hkv, P, D]`: get_prompt's computation without the cache
    (a sliding-window cache layer would keep only the prefix's last entries)."""
    config = oracle.active_peft_config
    encoder = oracle.prompt_encoder[oracle.active_adapter]
    P, heads = config.num_virtual_tokens, config.num_attention_heads
    tokens = oracle.prompt_tokens[oracle.active_adapter][:P].unsqueeze(0).expand(batch, -1)
    flat = encoder(tokens).view(batch, P, config.num_layers * 2, heads, config.token_dim // heads)
    kv = flat.permute(2, 0, 3, 1, 4)  # [2L, B, Hkv, P, D]: index 2l = K of layer l, 2l+1 = V
    layers = [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(config.num_layers)]
    text = oracle.get_base_model().config.get_text_config()
    if not getattr(text, "is_heterogeneous", False):
        return layers
    # Gemma 4, PEFT's get_prompt: each layer's leading heads / dims (none where the layer is wider); a KV-shared
    # ("reuse") layer attends with the K/V, prefix included, of the last "store" layer of its type
    own = []
    for layer, (key, value) in enumerate(layers):
        shape = text.per_layer_config[layer]
        heads, dim = shape.num_key_value_heads, shape.head_dim
        fits = heads <= key.shape[1] and dim <= key.shape[3]
        own.append((key[:, :heads, :, :dim], value[:, :heads, :, :dim]) if fits else None)
    modes, types = text.kv_sharing_modes, text.layer_types
    store = {types[i]: i for i in range(len(modes)) if modes[i] == "store"}
    return [own[store[types[i]]] if modes[i] == "reuse" else own[i] for i in range(len(modes))]


def prefix_oracle_forward(oracle, family, input_ids, attention_mask, concat=False, **kwargs):
    """The unpatched PEFT model's prefix-tuning semantics on this family (see the module docstring)."""
    if not concat and family not in CACHELESS:
        return peft_prefix_as_cache(oracle, input_ids, attention_mask, **kwargs)
    batch = input_ids.shape[0]
    P = oracle.active_peft_config.num_virtual_tokens
    if family not in CACHELESS and kwargs.get("position_ids") is None:
        kwargs["position_ids"] = torch.arange(P, P + input_ids.shape[1])[None].expand(batch, -1)
    with concat_prefix_attention(oracle, peft_prefix_kv(oracle, batch)):
        return oracle.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Steps and comparisons


def task_targets(task: str, ids, mask, num_prompt_tokens: int = 0):
    """Labels of `task` for real tokens; `num_prompt_tokens` > 0 pads per-token labels as PEFT's input-level
    forward needs them ([B, P+S], -100 on the virtual tokens) and moves span positions past the prompt."""
    batch, seq = ids.shape
    gen = torch.Generator().manual_seed(5)
    if task == "CAUSAL_LM":
        labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
        return {"labels": labels}
    if task == "SEQ_CLS":
        return {"labels": torch.arange(batch) % 3}
    if task == "TOKEN_CLS":
        labels = torch.randint(0, 3, (batch, seq), generator=gen)
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
        if num_prompt_tokens:
            labels = torch.cat([torch.full((batch, num_prompt_tokens), -100), labels], dim=1)
        return {"labels": labels}
    if task == "QUESTION_ANS":
        start = torch.tensor([1, 3, 5, 2, 4][:batch]) % seq
        end = (start + 1).clamp(max=seq - 1)
        return {"start_positions": start + num_prompt_tokens, "end_positions": end + num_prompt_tokens}
    return {}


def main_output(task, out):
    if task == "FEATURE_EXTRACTION":
        return out.last_hidden_state
    if task == "QUESTION_ANS":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


def step(call, task, ids, mask, targets, **kwargs):
    """One forward + backward through `call`; returns (main output, loss)."""
    out = call(input_ids=ids, attention_mask=mask, **targets, **kwargs)
    main = main_output(task, out)
    if task == "FEATURE_EXTRACTION":
        weights = torch.linspace(0.5, 1.5, main.numel()).view_as(main)
        loss = (main.square() * weights).mean()
    else:
        loss = out.loss
    loss.backward()
    return main.detach(), loss.detach()


def assert_rel_close(actual, expected, rel, what=""):
    """|a - e| <= rel * (|e| + max|e|) elementwise (outputs and losses; gradients: gradient_checks)."""
    scale = max(expected.detach().abs().max().item(), 1e-12)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def prompt_grads(model):
    """Trainable parameters' gradients by name (a fastprompt prompt's names with or without its submodule prefix)."""
    return {n.removeprefix("fastprompt_prompt."): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def assert_pair_parity(patched_call, oracle_call, patched, oracle, task, ids, mask, targets, what, **kwargs):
    """Outputs and loss to 1e-5, prompt-parameter gradients to 1e-4 on the whole gradient's scale (gradient_checks).
    `patched` and `oracle` own the trainable parameters (they may be one prompt module shared by both calls)."""
    patched.zero_grad(set_to_none=True)
    oracle.zero_grad(set_to_none=True)
    main_p, loss_p = step(patched_call, task, ids, mask, dict(targets), **kwargs)
    grads_p = prompt_grads(patched)
    patched.zero_grad(set_to_none=True)
    oracle.zero_grad(set_to_none=True)
    main_o, loss_o = step(oracle_call, task, ids, mask, dict(targets), **kwargs)
    grads_o = prompt_grads(oracle)
    assert main_p.shape == main_o.shape, f"{what}: output shape {tuple(main_p.shape)} vs {tuple(main_o.shape)}"
    assert_rel_close(main_p, main_o, 1e-5, what=f"{what} outputs")
    assert_rel_close(loss_p, loss_o, 1e-5, what=f"{what} loss")
    assert grads_p.keys() == grads_o.keys() and grads_p, f"{what}: trainable parameters differ"
    assert_grads_close(grads_p, grads_o, 1e-4, what=what)
