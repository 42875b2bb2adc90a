"""Encoder-decoder attention (T5 / Flan-T5 / mT5, BART): the "fastprompt_seq2seq" attention and its checks, the
model adapter both front ends use (PEFT's methods on SEQ_2_SEQ_LM: fastprompt.integrations.seq2seq; fastprompt's own
prompts: prompt_attach / seq2seq_own_prompts).

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
relative positions between real tokens do not move) plus `prefix_bias` for the prefix keys, computed here from the
first layer's relative attention bias exactly as T5's `compute_bias` does for a P-longer cache. BART's decoder
positions are shifted by P (a pre-hook on its positional embedding).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

from .._versions import release
from .. import ops  # ops.prefix_attention looked up per call (a test spy may stand in for it)
from .peft_config import enum_value as _value
from .transformers_attention import (
    check_backend,
    normalize_prefixes,
    AttentionCall,
    LAYER_STATE_ATTR,
    SLOT_ATTR,
    STATE_ATTR,
    AttentionSlot,
    AttentionState,
    EnableToken,
    finish_enable,
    join_enabled,
    hf_model,
    check_prefix_checkpointing,
    bind_call,
    check_supports_attention_interface,
    current_call,
    fastprompt_attention_mask,
)

SEQ2SEQ_ATTENTION_NAME = "fastprompt_seq2seq"
SEQ2SEQ_PREFIXES_KWARG = "fastprompt_seq2seq_prefixes"
SEQ2SEQ_MODEL_TYPES = ("t5", "mt5", "bart")

__all__ = ["SEQ2SEQ_MODEL_TYPES", "SEQ2SEQ_ATTENTION_NAME", "check_seq2seq_patchable", "check_seq2seq_transformers",
           "check_own_prompt_seq2seq", "enable_seq2seq_attention", "decoder_prefixes", "own_prompt_prefixes",
           "t5_prefix_bias", "seq2seq_attention_forward"]



# ----------------------------------------------------------------------------------------------------------------
# Model structure


def _stacks(hf):
    """(encoder, decoder) stacks of a T5 / mT5 / BART model."""
    return hf.get_encoder(), hf.get_decoder()


def _layers(stack) -> torch.nn.ModuleList:
    for name in ("block", "layers"):
        layers = getattr(stack, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise TypeError(f"fastprompt: cannot find the layers of {type(stack).__name__}")


def _self_attention(layer):
    return layer.layer[0].SelfAttention if hasattr(layer, "layer") else layer.self_attn


def _cross_attention(layer):
    if hasattr(layer, "layer"):
        return layer.layer[1].EncDecAttention if len(layer.layer) > 2 else None
    return getattr(layer, "encoder_attn", None)


def _decoder_dims(hf):
    config = hf.config
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
    heads = getattr(config, "num_heads", None) or getattr(config, "decoder_attention_heads", None)
    dim = getattr(config, "d_kv", None) or config.d_model // heads
    return layers, heads, dim


# Encoder-decoder prompt learning is checked in CI on transformers 5.24 (the locked and newest lanes); older
# releases build their caches and pass T5's bias differently, and PEFT 0.20 cannot wrap T5/BART on 5.20 at all.
MIN_SEQ2SEQ_TRANSFORMERS = (5, 24)


def check_seq2seq_transformers() -> None:
    """Refuse encoder-decoder prompt learning on a transformers older than the one it is tested with."""
    if release(transformers.__version__)[:2] < MIN_SEQ2SEQ_TRANSFORMERS:
        need = ".".join(str(n) for n in MIN_SEQ2SEQ_TRANSFORMERS)
        raise ValueError(f"fastprompt: encoder-decoder prompt learning (SEQ_2_SEQ_LM: T5, BART, ...) needs "
                         f"transformers >= {need}, the versions it is tested with; installed {transformers.__version__}")


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
    # declaring _supports_attention_backend; the switch itself is verified in enable_seq2seq_attention.
    if _value(config.peft_type) == "PREFIX_TUNING":
        if config.num_transformer_submodules != 2:
            raise ValueError(
                "fastprompt: SEQ_2_SEQ_LM prefix tuning needs num_transformer_submodules=2 (PEFT's default for "
                f"encoder-decoder models), got {config.num_transformer_submodules}")
        layers, heads, dim = _decoder_dims(hf)
        if (config.num_layers, config.num_attention_heads, config.token_dim // config.num_attention_heads) != (
                layers, heads, dim):
            raise ValueError(
                f"fastprompt: the prefix is shaped for {config.num_layers} layers x {config.num_attention_heads} "
                f"heads x {config.token_dim // config.num_attention_heads} dims but the decoder of {model_type!r} has "
                f"{layers} x {heads} x {dim}")
    return config


# ----------------------------------------------------------------------------------------------------------------
# Attention plumbing: the "fastprompt_seq2seq" implementation


@dataclass
class _Seq2SeqSlot(AttentionSlot):
    role: str = "self"                  # "encoder" | "self" (decoder self-attention) | "cross"
    bias_module: Any = None             # T5: the stack's first self-attention (owner of relative_attention_bias)


_registered = False


def _register_once() -> None:
    global _registered
    if _registered:
        return
    AttentionInterface.register(SEQ2SEQ_ATTENTION_NAME, seq2seq_attention_forward)
    AttentionMaskInterface.register(SEQ2SEQ_ATTENTION_NAME, fastprompt_attention_mask)
    _registered = True


def _inject_prefixes_hook(layer, args, kwargs):
    # As in transformers_attention: the prefixes travel as a layer keyword, so a checkpointed layer's recompute
    # (after the patched forward returned) reads the same tensors.
    state = layer.__dict__.get(LAYER_STATE_ATTR)
    call = current_call(state) if state is not None else None
    if call is None or call.prefixes is None or SEQ2SEQ_PREFIXES_KWARG in kwargs:
        return None
    check_prefix_checkpointing(layer, call.prefixes)
    kwargs[SEQ2SEQ_PREFIXES_KWARG] = call.prefixes
    return args, kwargs


def _shift_positions_hook(module, args, kwargs):
    # BART's learned decoder positions: PEFT's P-long cache makes real tokens start at P
    state = module.__dict__.get(LAYER_STATE_ATTR)
    call = current_call(state) if state is not None else None
    shift = call.position_shift if call is not None and call.prefixes is not None else 0
    if not shift:
        return None
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + shift
    elif len(args) >= 2:
        args = (args[0], args[1] + shift, *args[2:])
    else:
        kwargs["cache_length"] = kwargs.get("cache_length", 0) + shift
    return args, kwargs


def enable_seq2seq_attention(model, *, backend: str = "auto") -> EnableToken:
    """Switch THIS encoder-decoder model to the "fastprompt_seq2seq" attention; returns the restore token
    (transformers_attention.disable_fastprompt_attention undoes it)."""
    check_backend(backend)
    hf = hf_model(model)
    joined = join_enabled(hf, "seq2seq")  # enabling twice adds a user, as on decoder-only models
    if joined is not None:
        return joined
    _register_once()
    previous = hf.config._attn_implementation
    state = AttentionState(backend, "seq2seq")
    slotted, hooks = [], []
    encoder, decoder = _stacks(hf)
    for role_stack, stack in (("encoder", encoder), ("decoder", decoder)):
        layers = _layers(stack)
        first = _self_attention(layers[0])
        bias_module = first if getattr(first, "has_relative_attention_bias", False) else None
        for idx, layer in enumerate(layers):
            attn = _self_attention(layer)
            attn.__dict__[SLOT_ATTR] = _Seq2SeqSlot(idx, state, "encoder" if role_stack == "encoder" else "self",
                                                      bias_module)
            slotted.append(attn)
            cross = _cross_attention(layer)
            if cross is not None:
                cross.__dict__[SLOT_ATTR] = _Seq2SeqSlot(idx, state, "cross", None)
                slotted.append(cross)
            object.__setattr__(layer, LAYER_STATE_ATTR, state)
            slotted.append(layer)
            hooks.append(layer.register_forward_pre_hook(_inject_prefixes_hook, with_kwargs=True))
    positions = getattr(decoder, "embed_positions", None)
    if positions is not None:
        object.__setattr__(positions, LAYER_STATE_ATTR, state)
        slotted.append(positions)
        hooks.append(positions.register_forward_pre_hook(_shift_positions_hook, with_kwargs=True))
    hf.set_attn_implementation(SEQ2SEQ_ATTENTION_NAME)
    if hf.config._attn_implementation != SEQ2SEQ_ATTENTION_NAME:
        for hook in hooks:
            hook.remove()
        for sub in slotted:
            for attr in (SLOT_ATTR, LAYER_STATE_ATTR):
                sub.__dict__.pop(attr, None)
        raise TypeError(f"fastprompt: {type(hf).__name__} refused the attention implementation switch")
    return finish_enable(hf, state, previous, hooks, slotted)


class decoder_prefixes:
    """Inside the block, decoder layer l's self-attention reads `prefixes[("self", l)]` (and cross-attention
    `prefixes[("cross", l)]`, encoder layer l `prefixes[("encoder", l)]` where given). `position_shift`: how far the
    prefix moves learned decoder positions (PEFT: P). Bound to the calling thread / asyncio task (call_context):
    concurrent calls of the same model each read their own."""

    def __init__(self, model, prefixes: dict, position_shift: int = 0):
        self.state = getattr(hf_model(model), STATE_ATTR, None)
        if self.state is None or not getattr(self.state, "seq2seq", False):
            raise ValueError("fastprompt: decoder_prefixes needs enable_seq2seq_attention(model) first")
        self.prefixes, self.shift = prefixes, position_shift
        self._binding = None

    def __enter__(self):
        self._binding = bind_call(self.state, AttentionCall(prefixes=self.prefixes, position_shift=self.shift))
        self._binding.__enter__()
        return self.prefixes

    def __exit__(self, *exc):
        binding, self._binding = self._binding, None
        return binding.__exit__(*exc)


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


def _prefix_bias(slot, num_prefix: int, query_length: int, past: int, dtype) -> Tensor:
    """t5_prefix_bias for this call, sliced from a table of every query position seen so far: computed once, not
    once per layer, decoding step and training step (the table grows by doubling). The table is checked against the
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


def seq2seq_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                              scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """AttentionInterface function of encoder-decoder models: q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lk, D]`."""
    slot = module.__dict__.get(SLOT_ATTR)
    prefixes = kwargs.get(SEQ2SEQ_PREFIXES_KWARG)
    if prefixes is None and slot is not None:  # a layer that drops the keyword: the call's own binding
        call = current_call(slot.state)
        prefixes = call.prefixes if call is not None else None
    role = slot.role if isinstance(slot, _Seq2SeqSlot) else None
    prefix = prefixes.get((role, slot.layer_idx)) if (prefixes and role is not None) else None
    backend = slot.state.backend if slot is not None else "auto"

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"fastprompt attention expects a 2D key padding mask (or None); got a "
                             f"{attention_mask.dim()}D mask")
        attention_mask = attention_mask.to(torch.bool)
        if attention_mask.shape[1] < key.shape[2]:  # static cache: drop the empty trailing slots
            key, value = key[:, :, : attention_mask.shape[1]], value[:, :, : attention_mask.shape[1]]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if role == "cross":
        is_causal = False
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    # T5: position_bias is what T5 computed for the keys it sees (real tokens only here). Its cross-attention has no
    # relative bias (the bias is zeros): dropped, so the fast paths run.
    attn_bias = prefix_bias = None
    position_bias = kwargs.get("position_bias")
    if position_bias is not None and role != "cross":
        attn_bias = position_bias[..., : key.shape[2]]
        if attn_bias.requires_grad and attn_bias.grad_fn is None:
            attn_bias = attn_bias.detach()  # T5's zeros marked requires_grad for checkpointing: nothing to learn
    pk = pv = pidx = None
    if prefix is not None:
        pk, pv, pidx = prefix.key, prefix.value, prefix.index
        if pk.dtype != query.dtype or pk.device != query.device:
            pk, pv = pk.to(device=query.device, dtype=query.dtype), pv.to(device=query.device, dtype=query.dtype)
            pidx = pidx.to(query.device) if pidx is not None else None
        if attn_bias is not None and slot.bias_module is not None:
            # a pool's S selected entries lie end to end: S*P prefix positions, as a cache of them would hold
            slots = pidx.reshape(pidx.shape[0], -1).shape[1] if pidx is not None else 1
            prefix_bias = _prefix_bias(slot, pk.shape[-2] * slots, query.shape[2], key.shape[2] - query.shape[2],
                                       query.dtype)

    dropout_p = float(dropout) if dropout and module.training else 0.0
    if pk is None and query.shape[1] == key.shape[1]:
        # No prefix (the encoders, the cross-attention, a decoder without one): the very SDPA call transformers'
        # own "sdpa" path makes, T5's bias as a float mask. The fused op has nothing to read in place here, and
        # SDPA skips its per-call machinery (measured: the op costs more than SDPA for the same prefix-less call).
        mask = _sdpa_with_bias_mask(query, key, attention_mask, attn_bias, bool(is_causal))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                               dropout_p=dropout_p, scale=float(scaling))
        return out.transpose(1, 2), None
    if dropout_p > 0.0:
        out = _attention_with_dropout(query, key, value, pk, pv, pidx, attention_mask, bool(is_causal),
                                      float(scaling), attn_bias, prefix_bias, dropout_p, backend)
        return out.transpose(1, 2), None
    out = ops.prefix_attention(query, key, value, pk, pv, prefix_index=pidx, key_padding_mask=attention_mask,
                           causal=bool(is_causal), scale=float(scaling), backend=backend,
                           attn_bias=attn_bias, prefix_bias=prefix_bias)
    return out.transpose(1, 2), None


def _sdpa_with_bias_mask(q, k, kpm, bias, causal):
    """The float mask of SDPA over the sequence keys with an additive bias `[1|B, H, Lq, Lk]` or None: padding and
    bottom-right causality folded in with the dtype's minimum, as transformers' masks do, by one broadcast add
    (several times faster than a broadcast masked_fill into the `[B, H, Lq, Lk]` result); None when nothing is
    hidden and there is no bias."""
    lq, lk = q.shape[2], k.shape[2]
    hidden = None
    if kpm is not None:
        hidden = ~kpm[:, None, None, :]
    if causal and lq > 1:  # a single (decode) query sees every key
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(lk - lq + 1)
        hidden = future if hidden is None else hidden | future
    hidden = None if hidden is None else torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(
        hidden, torch.finfo(q.dtype).min)
    if bias is None:
        return hidden
    bias = bias.to(q.dtype)
    return bias if hidden is None else bias + hidden


def _attention_with_dropout(q, k, v, pk, pv, pidx, kpm, causal, scale, attn_bias, prefix_bias, p, backend="auto"):
    """Training with attention dropout: the fused op draws the dropout itself (with T5's biases too: the Triton
    kernels or ops/prefix_attention_torch/dropout.py), so no concatenated K/V, joined bias or score matrix is built."""
    return ops.prefix_attention(q, k, v, pk, pv, prefix_index=pidx, key_padding_mask=kpm, causal=causal, scale=scale,
                            attn_bias=attn_bias, prefix_bias=prefix_bias, dropout_p=p, backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# fastprompt's own prompts (prompt_attach) on encoder-decoder models


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
    layers, heads, dim = _decoder_dims(model)
    config = prompt.config
    if (config.num_layers, config.num_kv_heads, config.head_dim) != (layers, heads, dim):
        raise ValueError(
            f"fastprompt: {name} is shaped for {config.num_layers} layers x {config.num_kv_heads} "
            f"heads x {config.head_dim} dims; the decoder of {model_type!r} has {layers} x {heads} x {dim}")


def _is_seq2seq_lm(model) -> bool:
    return type(model).__name__ in set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values())


class own_prompt_prefixes(decoder_prefixes):
    """`{layer: LayerPrefix}` from a fastprompt prompt module, placed in the decoder's self-attention."""

    def __init__(self, model, prefixes):
        placed = {("self", layer): lp for layer, lp in normalize_prefixes(prefixes).items()}
        shift = max((lp.key.shape[-2] * (lp.index.reshape(lp.index.shape[0], -1).shape[1]
                                         if lp.index is not None else 1) for lp in placed.values()), default=0)
        super().__init__(model, placed, position_shift=shift)
