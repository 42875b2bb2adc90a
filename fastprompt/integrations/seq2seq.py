"""PEFT prefix tuning on SEQ_2_SEQ_LM (T5 / mT5 / BART), patched: the front end peft.patch_peft_model uses for
encoder-decoder prefix tuning, and its checks. PEFT's semantics and how the attention keeps them are written down in
seq2seq_attention (the encoder-decoder facts the one attention integration, transformers_attention, consults); the
public names of both are re-exported here under the module path they always had."""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from .peft_config import enum_value as _value
from .peft_prompts import prefix_kv
from .seq2seq_attention import (  # noqa: F401 (re-exported: the attention's names under their old path)
    MIN_SEQ2SEQ_TRANSFORMERS,
    SEQ2SEQ_ATTENTION_NAME,
    SEQ2SEQ_MODEL_TYPES,
    check_own_prompt_seq2seq,
    check_seq2seq_transformers,
    decoder_dims,
    t5_prefix_bias,
)
from .transformers_attention import (  # noqa: F401 (re-exported likewise)
    PREFIXES_KWARG as SEQ2SEQ_PREFIXES_KWARG,  # one prefixes keyword for every model kind
    LayerPrefix,
    check_attention_still_switched,
    check_supports_attention_interface,
    decoder_prefixes,
    enable_seq2seq_attention,
    own_prompt_prefixes,
    seq2seq_attention_forward,
)

__all__ = ["SEQ2SEQ_MODEL_TYPES", "check_seq2seq_patchable", "enable_seq2seq_attention", "seq2seq_prefixes",
           "decoder_prefixes", "peft_seq2seq_layer_prefixes", "t5_prefix_bias", "seq2seq_prefix_replacements"]


# ----------------------------------------------------------------------------------------------------------------
# PEFT prefix tuning on SEQ_2_SEQ_LM


def check_seq2seq_patchable(model, config):
    """The checks of peft.patch_peft_model for SEQ_2_SEQ_LM adapters; returns the adapter config."""
    check_seq2seq_transformers()
    hf = model.get_base_model()
    model_type = getattr(hf.config, "model_type", type(hf).__name__)
    if model_type not in SEQ2SEQ_MODEL_TYPES:
        check_supports_attention_interface(hf)
        raise ValueError(
            f"fastprompt: model_type {model_type!r} ({type(hf).__name__}) is not supported for SEQ_2_SEQ_LM by "
            f"patch_model: its prompt-learning semantics were not validated (supported: "
            f"{', '.join(SEQ2SEQ_MODEL_TYPES)})")
    # T5 / mT5 / BART call ALL_ATTENTION_FUNCTIONS.get_interface in their attention (transformers 5) without
    # declaring _supports_attention_backend; the switch itself is verified when it is enabled.
    if _value(config.peft_type) == "PREFIX_TUNING":
        if config.num_transformer_submodules != 2:
            raise ValueError(
                "fastprompt: SEQ_2_SEQ_LM prefix tuning needs num_transformer_submodules=2 (PEFT's default for "
                f"encoder-decoder models), got {config.num_transformer_submodules}")
        layers, heads, dim = decoder_dims(hf)
        if (config.num_layers, config.num_attention_heads, config.token_dim // config.num_attention_heads) != (
                layers, heads, dim):
            raise ValueError(
                f"fastprompt: the prefix is shaped for {config.num_layers} layers x {config.num_attention_heads} "
                f"heads x {config.token_dim // config.num_attention_heads} dims but the decoder of {model_type!r} has "
                f"{layers} x {heads} x {dim}")
    return config


def peft_seq2seq_layer_prefixes(kv: Tensor) -> dict:
    """Decoder self-attention prefixes from the adapter's `[2L, H, P, D]` K/V, in PEFT's layer order (see the
    module docstring: layer l reads rows 4l mod 2L and 4l+1 mod 2L)."""
    rows = kv.shape[0]
    return {("self", layer): LayerPrefix(kv[(4 * layer) % rows], kv[(4 * layer + 1) % rows])
            for layer in range(rows // 2)}


def seq2seq_prefixes(model) -> dict:
    return peft_seq2seq_layer_prefixes(prefix_kv(model))


def seq2seq_prefix_replacements(model, record, backend: str) -> dict:
    """Called by peft.patch_peft_model: enable the attention, return the PeftModel methods to replace."""
    record.attention_token = enable_seq2seq_attention(model.get_base_model(), backend=backend)
    return {"forward": _seq2seq_prefix_forward, "generate": _seq2seq_prefix_generate,
            "prepare_inputs_for_generation": _seq2seq_prefix_prepare_inputs_for_generation}


def _is_active_prefix(model) -> bool:
    return _value(model.active_peft_config.peft_type) == "PREFIX_TUNING"


def _seq2seq_prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                            decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None,
                            output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                            **kwargs):
    call = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=return_dict)
    if not _is_active_prefix(self):  # the active adapter changed since patching
        return type(self).forward(self, task_ids=task_ids, **call, **kwargs)
    check_attention_still_switched(self.get_base_model())
    config = self.active_peft_config
    self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
    call.update(kwargs)
    _give_empty_cache(self.get_base_model(), call)
    # decoder_attention_mask stays real-token only: the prefix is always visible inside the op
    with decoder_prefixes(self, seq2seq_prefixes(self), position_shift=config.num_virtual_tokens):
        return self.base_model(**call)


def _give_empty_cache(hf, call: dict) -> None:
    """Where the decoder will make its own cache (use_cache on, none passed), pass it an empty lazily-filled one.
    PEFT passes its prefix cache here; without one, T5 / BART build `DynamicCache(config=...)`, which costs about
    0.4 ms per forward on transformers 5.24 (it derives the layer types from the config), a measurable share of a
    small training step. Every layer of T5 / mT5 / BART is full attention, so the two caches are the same."""
    if call.get("cache") is not None or call.get("past_key_values") is not None:
        return
    use_cache = call.get("use_cache")
    if not (use_cache if use_cache is not None else getattr(hf.config, "use_cache", False)):
        return
    call["cache"] = EncoderDecoderCache(DynamicCache(), DynamicCache())


def _seq2seq_prefix_generate(self, *args, **kwargs):
    adapter_disabled = getattr(self.prepare_inputs_for_generation, "__func__", None) is not \
        _seq2seq_prefix_prepare_inputs_for_generation
    if not _is_active_prefix(self) or adapter_disabled:
        return type(self).generate(self, *args, **kwargs)
    check_attention_still_switched(self.get_base_model())
    with torch.no_grad():
        prefixes = seq2seq_prefixes(self)  # once per call, shared by every row and beam
    with decoder_prefixes(self, prefixes, position_shift=self.active_peft_config.num_virtual_tokens):
        return type(self).generate(self, *args, **kwargs)


def _seq2seq_prefix_prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
    if not _is_active_prefix(self):
        return type(self).prepare_inputs_for_generation(self, *args, task_ids=task_ids, **kwargs)
    # the cache holds real tokens only; the prefix is read by the attention (no get_prompt cache at prefill)
    return self.base_model_prepare_inputs_for_generation(*args, **kwargs)
