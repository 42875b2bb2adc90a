"""Encoder-decoder models (T5 / Flan-T5 / mT5, BART) as data for the one attention integration
(transformers_attention): the role of each attention module (encoder self-attention, decoder self-attention, decoder
cross-attention), T5's relative position bias for prefix keys, the module holding BART's learned decoder positions,
and the checks of encoder-decoder prompt learning. No attention function or switch of its own: enabling an
encoder-decoder model slots each attention module with its role, and the one registered function reads it.

What PEFT 0.21.2 computes (read from peft_model.py, and checked by instrumenting the attention on transformers
5.23.0 and 5.24.0, which agree):
- Prompt tuning / P-tuning: the first P of the `num_transformer_submodules`·P prompt vectors go before the encoder
  input (attention_mask gets P ones); the decoder gets nothing. Multitask prompt tuning: the same before the encoder,
  and with num_transformer_submodules=2 the second P vectors before the decoder input (labels get P times -100,
  decoder_attention_mask P ones). fastprompt only replaces `get_prompt` there (peft.py `_input_get_prompt`: the
  encoder runs once on the virtual tokens, the prompt is expanded, not repeated B times); PEFT's forward does the rest.
- Prefix tuning: `get_prompt` builds an EncoderDecoderCache from the prefix and then RESETS its cross-attention
  cache to an empty DynamicCache (PEFT: "invalidate the cross attention cache"), so the prefix reaches the decoder's
  self-attention only; the encoder and the cross-attention see none. Which prefix rows layer l reads follows from
  PEFT duplicating the `[.., 2L, ..]` K/V rows and splitting them in chunks of 4: self-attention K/V of layer l are
  rows (4l mod 2L, 4l+1 mod 2L) of the adapter's `(P, 2L, H, D)` view. The decoder sees a P-long cache: BART's
  learned positions start at P, T5's relative position bias is computed with the prefix keys at positions 0..P-1
  and the queries at P + past + i.

The patched prefix path keeps those semantics without the cache: the prefix encoder runs once on P tokens, each
decoder layer's self-attention reads its `[H, P, D]` prefix in place through `prefix_attention` (no B-fold copies, no
concatenated K/V, no 4D mask), the KV cache holds real tokens only (generation: the encoder runs once, beams share
the one prefix). T5's position bias reaches the op as `attn_bias` (what T5 computed for the real keys, unchanged:
relative positions between real tokens do not move) plus `prefix_bias` for the prefix keys, computed here
(prefix_bias_for_call) from the first layer's relative attention bias exactly as T5's `compute_bias` does for a
P-longer cache. BART's decoder positions are shifted by P (a pre-hook on the module `shifted_positions` names).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

from .._versions import release
from .call_context import current_call

SEQ2SEQ_ATTENTION_NAME = "fastprompt_seq2seq"   # the attention implementation an encoder-decoder model is switched to
SEQ2SEQ_MODEL_TYPES = ("t5", "mt5", "bart")

# The roles of an attention module (AttentionSite.role); decoder-only and encoder-only models have SELF only.
ENCODER, SELF, CROSS = "encoder", "self", "cross"

__all__ = ["SEQ2SEQ_MODEL_TYPES", "SEQ2SEQ_ATTENTION_NAME", "ENCODER", "SELF", "CROSS", "AttentionSite",
           "is_encoder_decoder", "attention_sites", "shifted_positions", "decoder_dims", "check_seq2seq_transformers",
           "check_own_prompt_seq2seq", "t5_prefix_bias", "prefix_bias_for_call"]


# ----------------------------------------------------------------------------------------------------------------
# Model structure: the role of each attention module


@dataclass(frozen=True)
class AttentionSite:
    """One attention module of a model and what the attention function must know of it."""

    module: torch.nn.Module
    layer_idx: int
    role: str = SELF                    # ENCODER | SELF | CROSS
    bias_module: Any = None             # T5: the stack's first self-attention (owner of relative_attention_bias)


def is_encoder_decoder(hf) -> bool:
    return bool(getattr(hf.config, "is_encoder_decoder", False))


def _stacks(hf):
    """(encoder, decoder) stacks of a T5 / mT5 / BART model."""
    return hf.get_encoder(), hf.get_decoder()


def stack_layers(stack) -> torch.nn.ModuleList:
    for name in ("block", "layers"):
        layers = getattr(stack, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise TypeError(f"fastprompt: cannot find the layers of {type(stack).__name__}")


def _self_attention(layer):
    attn = layer.layer[0].SelfAttention if hasattr(layer, "layer") else getattr(layer, "self_attn", None)
    if attn is None:
        raise TypeError(f"fastprompt: cannot find the self-attention of {type(layer).__name__} (encoder-decoder "
                        f"layers laid out as T5's or BART's are: {', '.join(SEQ2SEQ_MODEL_TYPES)})")
    return attn


def _cross_attention(layer):
    if hasattr(layer, "layer"):
        return layer.layer[1].EncDecAttention if len(layer.layer) > 2 else None
    return getattr(layer, "encoder_attn", None)


def attention_sites(hf) -> tuple[list, list]:
    """(every attention module of the encoder and decoder with its role, every layer of both stacks)."""
    sites, layers = [], []
    encoder, decoder = _stacks(hf)
    for role, stack in ((ENCODER, encoder), (SELF, decoder)):
        stack_modules = stack_layers(stack)
        first = _self_attention(stack_modules[0])
        bias_module = first if getattr(first, "has_relative_attention_bias", False) else None
        for idx, layer in enumerate(stack_modules):
            sites.append(AttentionSite(_self_attention(layer), idx, role, bias_module))
            cross = _cross_attention(layer)
            if cross is not None:
                sites.append(AttentionSite(cross, idx, CROSS, None))
            layers.append(layer)
    return sites, layers


def shifted_positions(hf) -> Optional[torch.nn.Module]:
    """The module of learned decoder positions a prefix shifts (BART's `embed_positions`; T5 has none)."""
    return getattr(hf.get_decoder(), "embed_positions", None)


def decoder_dims(hf):
    config = hf.config
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
    heads = getattr(config, "num_heads", None) or getattr(config, "decoder_attention_heads", None)
    dim = getattr(config, "d_kv", None) or config.d_model // heads
    return layers, heads, dim


# ----------------------------------------------------------------------------------------------------------------
# Checks


# Encoder-decoder prompt learning is checked in CI on transformers 5.24 (the locked and newest lanes); older
# releases build their caches and pass T5's bias differently, and PEFT 0.20 cannot wrap T5/BART on 5.20 at all.
MIN_SEQ2SEQ_TRANSFORMERS = (5, 24)


def check_seq2seq_transformers() -> None:
    """Refuse encoder-decoder prompt learning on a transformers older than the one it is tested with."""
    if release(transformers.__version__)[:2] < MIN_SEQ2SEQ_TRANSFORMERS:
        need = ".".join(str(n) for n in MIN_SEQ2SEQ_TRANSFORMERS)
        raise ValueError(f"fastprompt: encoder-decoder prompt learning (SEQ_2_SEQ_LM: T5, BART, ...) needs "
                         f"transformers >= {need}, the versions it is tested with; installed {transformers.__version__}")


def check_own_prompt_seq2seq(model, prompt) -> None:
    """Where fastprompt's own prompts go on an encoder-decoder model (PEFT's semantics for the matching method):
    input placement before the encoder input (fastprompt.integrations.seq2seq_own_prompts); prefix placement in the
    decoder's self-attention, layer l of the prompt to decoder layer l (the prefix sits where PEFT's P-long cache
    would: BART decoder positions start at P, T5's prefix keys take the relative positions 0..P-1)."""
    check_seq2seq_transformers()
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SEQ2SEQ_MODEL_TYPES:
        raise ValueError(f"fastprompt: encoder-decoder model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(SEQ2SEQ_MODEL_TYPES)})")
    name = type(prompt).__name__
    if getattr(prompt.config, "query_layer", None) is not None:
        raise ValueError(f"fastprompt: {name} with query_layer={prompt.config.query_layer} on an encoder-decoder "
                         "model is not supported: the query is the encoder's last hidden state (query_layer=None)")
    if getattr(prompt, "heads", None) is not None:
        raise ValueError(f"fastprompt: {name} with heads= (task heads on the last hidden state) is not supported on "
                         "an encoder-decoder model; use its language-model head (labels=) instead")
    if prompt.placement == "input":
        if not _is_seq2seq_lm(model):
            raise ValueError(
                f"fastprompt: {name} with placement='input' on {type(model).__name__}: an input-level prompt goes "
                "before the encoder input of a sequence-to-sequence LM (T5ForConditionalGeneration, "
                f"BartForConditionalGeneration, ...), which {type(model).__name__} is not")
        return
    layers, heads, dim = decoder_dims(model)
    config = prompt.config
    if (config.num_layers, config.num_kv_heads, config.head_dim) != (layers, heads, dim):
        raise ValueError(
            f"fastprompt: {name} is shaped for {config.num_layers} layers x {config.num_kv_heads} "
            f"heads x {config.head_dim} dims; the decoder of {model_type!r} has {layers} x {heads} x {dim}")


def _is_seq2seq_lm(model) -> bool:
    return type(model).__name__ in set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values())


# ----------------------------------------------------------------------------------------------------------------
# T5's relative position bias for prefix keys


def t5_prefix_bias(bias_module, num_prefix: int, query_length: int, past: int) -> Tensor:
    """T5's relative position bias `[1, H, Lq, P]` for P prefix keys at positions 0..P-1 seen by queries at
    positions P + past + i (PEFT's prefix-as-cache), as T5Attention.compute_bias computes it for that cache."""
    device = bias_module.relative_attention_bias.weight.device
    context = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + (past + num_prefix)
    memory = torch.arange(num_prefix, dtype=torch.long, device=device)[None, :]
    buckets = bias_module._relative_position_bucket(
        memory - context, bidirectional=not bias_module.is_decoder,
        num_buckets=bias_module.relative_attention_num_buckets,
        max_distance=bias_module.relative_attention_max_distance)
    return bias_module.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


# T5's prefix bias tables, per bias module (weakly held: they go with the model): {(P, dtype): (a copy of the bias
# weight the table was built from, [1, H, N, P] table for query positions 0..N-1)}. Entries are replaced, never
# mutated (concurrent calls read them).
_PREFIX_BIAS_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _built_from(source: Tensor, weight: Tensor) -> bool:
    """Whether a table built from `source` (a copy of the weight then) is still right for `weight`: compared by
    value. The weight object, its `_version` and `data_ptr` stay the same when it is updated through `.data` (EMA,
    weight averaging, some loaders), so only its values tell. [buckets, H] values, compared once per call: about
    1-2 us on a CPU for T5-small's 32 x 8, against 0.6-1.5 ms for rebuilding the table (P = 20) and hundreds of ms
    for the forward itself (measured on a shared 2-core CPU)."""
    return (source.shape == weight.shape and source.dtype == weight.dtype and source.device == weight.device
            and torch.equal(source, weight))


def prefix_bias_for_call(slot, num_prefix: int, query_length: int, past: int, dtype) -> Tensor:
    """t5_prefix_bias for this call of the layer `slot` (a transformers_attention.AttentionSlot), sliced from a
    table of every query position seen so far: computed once, not once per layer, decoding step and training step
    (the table grows by doubling). The table is checked against the
    bias weight's values once per call (the call's memo holds it for the other layers) and rebuilt when they
    changed, however they were changed. Computed afresh while the bias weights are being trained."""
    bias_module = slot.bias_module
    weight = bias_module.relative_attention_bias.weight
    if weight.requires_grad and torch.is_grad_enabled():
        return t5_prefix_bias(bias_module, num_prefix, query_length, past).to(dtype)
    needed = past + query_length
    call = current_call(slot.state)
    memo = call.derived if call is not None else {}
    memo_key = ("t5_prefix_bias", id(bias_module), num_prefix, dtype)
    table = memo.get(memo_key)
    if table is None or table.shape[2] < needed:
        tables = _PREFIX_BIAS_TABLES.setdefault(bias_module, {})
        entry = tables.get((num_prefix, dtype))
        current = weight.detach()
        if entry is None or entry[1].shape[2] < needed or not _built_from(entry[0], current):
            rows = needed if entry is None else max(needed, 2 * entry[1].shape[2])
            # Built as a normal tensor even under torch.inference_mode(): the table outlives the call, and a later
            # forward with grad saves it for the prefixes' backward, which an inference tensor cannot be.
            with torch.inference_mode(False), torch.no_grad():
                # contiguous: the CPU flash kernel wants a unit-stride last dim (T5's permuted bias, copied per call)
                built = t5_prefix_bias(bias_module, num_prefix, rows, 0).to(dtype).contiguous()
                entry = tables[(num_prefix, dtype)] = (current.clone(), built)
        table = memo[memo_key] = entry[1]
    return table[:, :, past:needed]
