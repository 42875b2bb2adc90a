"""fastprompt attention inside Hugging Face transformers models: registration, per-instance switch, prefix plumbing.

A model switched to the "fastprompt" attention implementation runs every self-attention call through
`fastprompt.ops.prefix_attention`. Learned prefixes reach the attention function of decoder layer i as one
`LayerPrefix` (K/V stored once, shared / per-sample / pooled), never as cache entries, never concatenated with the
sequence K/V, never as a 4D mask: the registered mask function hands the attention a 2D key padding mask or None,
as flash-attention's does.

How a layer finds its prefix: `layer_prefixes(model, prefixes)` stores the mapping on the model instance, and a
forward pre-hook on each of that instance's layers passes it as the `fastprompt_prefixes` keyword, which
transformers 5 forwards from the layer to its attention function. The hook runs outside the gradient-checkpointed
layer forward, so the backward recompute sees the same prefix tensors; generate() and torch.compile see them too.
A caller may also pass `fastprompt_prefixes=` to the model's forward itself (the PEFT path does). Where a family
drops the keyword, the attention function falls back to the instance state. Nothing here touches a class or a
module global other than the two interface registrations, which are inert for models that did not select
"fastprompt".

Semantics that differ from PEFT's prefix-as-cache on purpose: prefix keys are always visible, also past a sliding
window (PEFT's prefix slides out of the window once P + position exceeds it); everything else is identical.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ..ops import shared_prefix_decode
from .families import ROBERTA, FamilyFacts, family_facts

ATTENTION_NAME = "fastprompt"
PREFIXES_KWARG = "fastprompt_prefixes"
_STATE_ATTR = "_fastprompt_attention_state"
_SLOT_ATTR = "_fastprompt_attention_slot"
_LAYER_STATE_ATTR = "_fastprompt_layer_state"

__all__ = [
    "ATTENTION_NAME",
    "LayerPrefix",
    "ModelLayout",
    "enable_fastprompt_attention",
    "disable_fastprompt_attention",
    "layer_prefixes",
    "model_layout",
    "is_fastprompt_enabled",
    "set_backend",
    "fastprompt_attention_forward",
    "fastprompt_attention_mask",
]


@dataclass
class LayerPrefix:
    """One layer's learned prefix, stored once.

    key/value: `[Hkv, P, D]` shared by the batch | `[B, Hkv, P, D]` per sample | `[N, Hkv, P, D]` a pool read through
    `index` (`[B]` or `[B, S]`, -1 = empty slot). Prefix keys are never rotated and always visible.
    """

    key: Tensor
    value: Tensor
    index: Optional[Tensor] = None


@dataclass
class ModelLayout:
    """What prompt methods need to know about a transformers model to build per-layer prefixes."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    is_causal: bool                     # decoder (causal self-attention) vs encoder (bidirectional)
    layer_types: tuple                  # per layer: "full_attention" | "sliding_attention"
    sliding_window: Optional[int]       # window of the sliding layers (None: no sliding layer)
    softcap: Optional[float]            # attention logit soft-capping (Gemma 2)
    position_style: str                 # "offset" | "roberta" | "mask_cumsum" (see families.py)
    shifts_positions: bool              # with a P-token prefix (as a cache), real tokens get positions P.. (PEFT)
    rotary: bool                        # positions enter through RoPE on q/k (prefix keys never rotated)
    padding_idx: Optional[int] = None   # RoBERTa-style position ids start after padding_idx
    layers_path: str = ""               # dotted path of the ModuleList holding the layers
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Model inspection


def _hf_model(model):
    """The transformers PreTrainedModel inside `model` (a PeftModel, or the model itself)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional for the plumbing
        PeftModel = ()
    if PeftModel and isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _find_layers(hf) -> tuple[str, torch.nn.ModuleList]:
    config = _text_config(hf.config)
    num_layers = getattr(config, "num_hidden_layers", None)
    facts = family_facts(getattr(config, "model_type", ""))
    names = facts.layer_names if facts is not None else ("layers", "h", "layer", "blocks")
    best = None
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and num_layers:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in names:
                return name, module
            best = best or (name, module)
    if best is None:
        raise ValueError(
            f"fastprompt: cannot find the {num_layers} transformer layers of {type(hf).__name__} "
            f"(model_type={getattr(config, 'model_type', '?')!r})"
        )
    return best


# An architecture missing from the family table is laid out as a rotary causal decoder numbering positions from the
# cache length; patch_model refuses such models for PEFT (their semantics are unchecked).
_UNKNOWN_FAMILY = FamilyFacts(encoder=False)


def model_layout(model) -> ModelLayout:
    """Shapes and family facts of a transformers model (or the base model of a PeftModel)."""
    hf = _hf_model(model)
    config = _text_config(hf.config)
    model_type = getattr(config, "model_type", "")
    facts = family_facts(model_type) or _UNKNOWN_FAMILY
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    num_layers = config.num_hidden_layers
    path, _ = _find_layers(hf)
    encoder = facts.encoder and not getattr(config, "is_decoder", False)
    is_causal = (not encoder) and getattr(config, "is_causal", True) and not getattr(
        config, "use_bidirectional_attention", False)
    sliding = getattr(config, "sliding_window", None)
    layer_types = getattr(config, facts.layer_types_field, None) if facts.layer_types_field else None
    if layer_types is None:
        uses_sliding = sliding is not None and facts.all_layers_sliding
        layer_types = ["sliding_attention" if uses_sliding else "full_attention"] * num_layers
    if "sliding_attention" not in layer_types:
        sliding = None
    softcap = getattr(config, facts.softcap_field, None) if facts.softcap_field else None
    roberta_like = facts.position_style == ROBERTA
    return ModelLayout(
        model_type=model_type,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        is_causal=is_causal,
        layer_types=tuple(layer_types),
        sliding_window=sliding,
        softcap=softcap,
        position_style=facts.position_style,
        shifts_positions=facts.shifts_positions,
        rotary=facts.rotary,
        padding_idx=getattr(config, "pad_token_id", None) if roberta_like else None,
        layers_path=path,
        extra={"embedding_scale": facts.embedding_scale, "quirks": facts.quirks},
    )


def check_supports_attention_interface(hf) -> None:
    """Raise TypeError when the model's attention does not go through transformers' AttentionInterface."""
    config = _text_config(hf.config)
    model_type = getattr(config, "model_type", type(hf).__name__)
    cls = type(hf)
    # private class facts of transformers 5; where a release lacks one, the switch itself is checked afterwards
    # (enable_fastprompt_attention verifies that the model took the "fastprompt" implementation)
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    if getattr(cls, "_supports_attention_backend", None) is False or (callable(can_set) and not can_set()):
        raise TypeError(
            f"fastprompt: cannot patch {cls.__name__} (model_type={model_type!r}): its attention does not go through "
            "transformers' AttentionInterface, so a registered attention function would never be called"
        )


# ----------------------------------------------------------------------------------------------------------------
# Registration and the per-instance switch


class _AttentionState:
    """Lives on an enabled model instance. `prefixes` is set only inside `layer_prefixes`."""

    def __init__(self, backend: str):
        self.backend = backend
        self.prefixes: Optional[Mapping[int, LayerPrefix]] = None
        self.users = 1

    # A pickled / torch.saved model is loaded where "fastprompt" may not be registered yet (a fresh process);
    # the prefixes of an open `layer_prefixes` block are not part of the saved state.
    def __getstate__(self):
        return {**self.__dict__, "prefixes": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        _register_once()


@dataclass
class _AttentionSlot:
    layer_idx: int
    state: _AttentionState


@dataclass
class _EnableToken:
    hf_model: Any
    previous_implementation: Any
    hooks: list
    slotted: list
    nested: bool = False
    restored: bool = False


_registered = False


def _register_once() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # exported at the top level from some 5.x release on; masking_utils has it in all
        from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, fastprompt_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, fastprompt_attention_mask)
    _registered = True


class BridgedPrefixes(dict):
    """Layer prefixes that are detached leaves whose gradient a caller carries back itself (fastprompt's PEFT path
    does so under reentrant gradient checkpointing); the reentrant-checkpointing guard lets them through."""


def uses_reentrant_checkpointing(layer) -> bool:
    return _uses_reentrant_checkpointing(layer)


def _uses_reentrant_checkpointing(layer) -> bool:
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()):
        return False
    fn = getattr(layer, "_gradient_checkpointing_func", None)
    keywords = getattr(fn, "keywords", None) or {}
    return keywords.get("use_reentrant", True) is not False  # torch's historical default is reentrant


def check_prefix_checkpointing(layer, prefixes) -> None:
    """Refuse trainable prefixes in a layer under reentrant gradient checkpointing: it differentiates the layer's
    positional tensor inputs only, so prefixes passed by keyword would be back-propagated once per layer through
    one shared graph. (Bridged prefixes carry their gradient back themselves.)"""
    if prefixes and not isinstance(prefixes, BridgedPrefixes) and _uses_reentrant_checkpointing(layer) and any(
            lp.key.requires_grad or lp.value.requires_grad for lp in prefixes.values()):
        raise ValueError(
            "fastprompt: trainable prefixes need non-reentrant gradient checkpointing; call "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})")


def _inject_prefixes_hook(layer, args, kwargs):
    # Runs in the layer's __call__, outside the gradient-checkpointed forward: the keyword is captured with the
    # layer's other arguments, so the backward recompute sees the same prefix tensors after the block exits.
    # The state is read from the layer itself (not a closure) so that a deep copy of the model uses its own.
    state = layer.__dict__.get(_LAYER_STATE_ATTR)
    if state is None:
        return None
    given = kwargs.get(PREFIXES_KWARG)
    check_prefix_checkpointing(layer, given if given is not None else state.prefixes)
    if given is None and state.prefixes is not None:
        kwargs[PREFIXES_KWARG] = state.prefixes
        return args, kwargs
    return None


def _accepts_var_kwargs(fn) -> bool:
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def _check_backend(backend: str) -> None:
    from fastprompt.ops.prefix_attention import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"fastprompt: backend must be one of {BACKENDS}, got {backend!r}")


def is_fastprompt_enabled(model) -> bool:
    return getattr(_hf_model(model), _STATE_ATTR, None) is not None


def enable_fastprompt_attention(model, *, backend: str = "auto") -> _EnableToken:
    """Register (once) and switch THIS model instance to the "fastprompt" attention; returns a restore token.

    Enabling an already-enabled model is a no-op whose token restores nothing (the first token owns the state).
    """
    _check_backend(backend)
    hf = _hf_model(model)
    existing = getattr(hf, _STATE_ATTR, None)
    if existing is not None:
        existing.users += 1
        return _EnableToken(hf, None, [], [], nested=True)
    check_supports_attention_interface(hf)
    _register_once()
    path, layers = _find_layers(hf)
    previous = hf.config._attn_implementation
    state = _AttentionState(backend)
    slotted = []
    for idx, layer in enumerate(layers):
        for sub in layer.modules():
            name = type(sub).__name__.lower()
            if "cross" in name:  # cross-attention reads encoder states: prefixes are for self-attention only
                continue
            if "attention" in name or hasattr(sub, "is_causal"):
                setattr(sub, _SLOT_ATTR, _AttentionSlot(idx, state))
                slotted.append(sub)
    if not slotted:
        raise TypeError(f"fastprompt: found no attention module in the layers of {type(hf).__name__}")
    hf.set_attn_implementation(ATTENTION_NAME)
    if hf.config._attn_implementation != ATTENTION_NAME:
        for sub in slotted:
            delattr(sub, _SLOT_ATTR)
        raise TypeError(
            f"fastprompt: {type(hf).__name__} refused the attention implementation switch "
            f"(still {hf.config._attn_implementation!r})"
        )
    hooks = []
    for layer in layers:
        if _accepts_var_kwargs(layer.forward):  # else the attention reads the instance state (no checkpointing)
            object.__setattr__(layer, _LAYER_STATE_ATTR, state)
            hooks.append(layer.register_forward_pre_hook(_inject_prefixes_hook, with_kwargs=True))
            slotted.append(layer)
    object.__setattr__(hf, _STATE_ATTR, state)
    return _EnableToken(hf, previous, hooks, slotted)


def disable_fastprompt_attention(model, token: _EnableToken) -> None:
    """Undo `enable_fastprompt_attention`: previous attention implementation, no hook, no per-module state."""
    if token is None or token.restored:
        return
    token.restored = True
    hf = token.hf_model
    state = getattr(hf, _STATE_ATTR, None)
    if token.nested:
        if state is not None:
            state.users -= 1
        return
    for hook in token.hooks:
        hook.remove()
    for sub in token.slotted:
        for attr in (_SLOT_ATTR, _LAYER_STATE_ATTR):
            if attr in sub.__dict__:
                object.__delattr__(sub, attr)
    if _STATE_ATTR in hf.__dict__:
        object.__delattr__(hf, _STATE_ATTR)
    hf.set_attn_implementation(token.previous_implementation)


def set_backend(model, backend: str) -> None:
    """Force the prefix_attention backend ("auto" | "torch" | "triton" | "cuda" | "reference") of an enabled model."""
    _check_backend(backend)
    state = getattr(_hf_model(model), _STATE_ATTR, None)
    if state is None:
        raise ValueError("fastprompt: set_backend needs a model with fastprompt attention enabled")
    state.backend = backend


def _normalize_prefixes(prefixes) -> dict:
    if prefixes is None:
        return {}
    if isinstance(prefixes, Mapping):
        items = prefixes.items()
    else:  # a sequence, one entry per layer (None = no prefix)
        items = enumerate(prefixes)
    out = {}
    for idx, lp in items:
        if lp is None:
            continue
        if isinstance(lp, (tuple, list)):
            lp = LayerPrefix(*lp)
        if not isinstance(lp, LayerPrefix):
            raise TypeError(f"fastprompt: prefixes[{idx}] must be a LayerPrefix, got {type(lp).__name__}")
        out[int(idx)] = lp
    return out


@contextmanager
def layer_prefixes(model, prefixes: Mapping[int, LayerPrefix]):
    """Inside the block, the attention of layer i reads `prefixes[i]`; absent layers get no prefix."""
    hf = _hf_model(model)
    state = getattr(hf, _STATE_ATTR, None)
    if state is None:
        raise ValueError("fastprompt: layer_prefixes needs enable_fastprompt_attention(model) first")
    previous = state.prefixes
    state.prefixes = _normalize_prefixes(prefixes)
    try:
        yield state.prefixes
    finally:
        state.prefixes = previous


# ----------------------------------------------------------------------------------------------------------------
# The registered functions


def fastprompt_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                              attention_mask=None, **kwargs):
    """A 2D key padding mask `[B, Lk_valid]` (True = real key) or None, never a 4D mask.

    Causality, sliding windows and soft-capping are applied by the attention from the layer's own attributes.
    A mask shorter than the keys means the trailing keys are empty static-cache slots (flash-attention's contract).
    """
    if mask_function is not None:
        name = getattr(mask_function, "__qualname__", "")
        # and_masks is how sliding windows arrive (the attention applies the window itself); packed sequences,
        # chunked attention and or-overlays (image tokens, blocks) cannot be expressed as a key padding mask
        if "packed_sequence" in name or "chunked" in name or "or_masks" in name:
            raise ValueError(
                "fastprompt attention takes 2D padding masks only; this model/input asks for a composite mask "
                f"({name}) (packed sequences, chunked or multimodal attention), which it does not support"
            )
    if attention_mask is None:
        valid = q_offset + q_length
        if isinstance(valid, Tensor):
            valid = int(valid)
        if isinstance(kv_length, int) and kv_length > valid:  # a static cache not yet full
            return torch.ones(batch_size, valid, dtype=torch.bool, device=kwargs.get("device"))
        return None
    attention_mask = attention_mask.to(torch.bool)[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def fastprompt_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                                 scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """AttentionInterface function: q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lk, D]` → (`[B, Lq, Hq, D]`, None)."""
    slot = getattr(module, _SLOT_ATTR, None)
    prefixes = kwargs.get(PREFIXES_KWARG)
    if prefixes is None and slot is not None:
        prefixes = slot.state.prefixes
    layer_idx = slot.layer_idx if slot is not None else getattr(module, "layer_idx", None)
    prefix = prefixes.get(layer_idx) if prefixes else None
    backend = slot.state.backend if slot is not None else "auto"
    capture = getattr(slot.state, "capture", None) if slot is not None else None
    if capture is not None:  # prompt hoisting: keep this layer's K/V as the attention sees them (after RoPE)
        capture[layer_idx] = (key, value)

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                "fastprompt attention expects a 2D key padding mask (or None); got a "
                f"{attention_mask.dim()}D mask. Pass a 2D attention_mask to the model."
            )
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(torch.bool)
        if attention_mask.shape[1] < key.shape[2]:  # static cache: drop the empty trailing slots
            key = key[:, :, : attention_mask.shape[1]]
            value = value[:, :, : attention_mask.shape[1]]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    pk = pv = pidx = None
    if prefix is not None:
        pk, pv, pidx = prefix.key, prefix.value, prefix.index
        if pk.dtype != query.dtype:
            pk, pv = pk.to(query.dtype), pv.to(query.dtype)
        if pk.device != query.device:
            pk, pv = pk.to(query.device), pv.to(query.device)
            pidx = pidx.to(query.device) if pidx is not None else None

    # transformers passes the module's attention dropout in training and 0 in eval; the op fuses it
    dropout_p = float(dropout) if dropout and module.training else 0.0

    if pk is not None and pidx is None and query.shape[2] == 1 and backend in ("auto", "torch"):
        # a generate() step over a shared prefix on the CPU: the lean path (None where it does not apply)
        out = shared_prefix_decode(query, key, value, pk, pv, attention_mask, float(scaling), softcap, window,
                                   dropout_p)
        if out is not None:
            return out.transpose(1, 2), None

    from fastprompt.ops import prefix_attention

    out = prefix_attention(query, key, value, pk, pv, prefix_index=pidx, key_padding_mask=attention_mask,
                           causal=bool(is_causal), scale=float(scaling), softcap=softcap, window=window,
                           dropout_p=dropout_p, backend=backend)
    return out.transpose(1, 2), None
