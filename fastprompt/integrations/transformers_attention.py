"""fastprompt attention inside Hugging Face transformers models: registration, per-instance switch, prefix plumbing.

One attention integration for every model kind. A decoder-only or encoder-only model switched to fastprompt's
attention runs under the implementation name "fastprompt", an encoder-decoder model (T5 / BART) under
"fastprompt_seq2seq"; both names are registered to the same attention and mask functions, and one switch
(enable / disable, counted users) serves both. What differs between models is data recorded per attention module
when the model is enabled (its AttentionSlot): the layer, its role (self-attention; for encoder-decoder models the
encoder's self-attention, the decoder's self-attention or its cross-attention), the key its prefix is looked up by
(the layer index; `(role, layer)` on encoder-decoder models) and T5's relative-bias module. The facts of
encoder-decoder models (which module has which role, T5's prefix bias, BART's shifted positions, PEFT's
semantics there) are in seq2seq_attention, which this module consults.

Every attention call of an enabled model that reads a prefix, or asks for what only the op gives (fastprompt's
dropout stream, soft-capping, windows, padding as a key mask), goes through `fastprompt.ops.prefix_attention`; a layer
without a prefix that asks for plain attention, and an encoder-decoder model's layers without a prefix, run
transformers' own SDPA call (see the attention function). Learned prefixes
reach the attention function of decoder layer i as one
`LayerPrefix` (K/V stored once, shared / per-sample / pooled), never as cache entries, never concatenated with the
sequence K/V, never as a 4D mask: the registered mask function hands the attention a 2D key padding mask or None,
as flash-attention's does (viewed as `[B, 1, 1, Lk]` on models whose KV-shared layers slice the masks' query axis).

How a layer finds its prefix: `layer_prefixes(model, prefixes)` binds the mapping to the current call (a context
variable local to the calling thread / asyncio task, see call_context; never state on the shared model, which other
threads call at the same time), and a forward pre-hook on each of that instance's layers passes it as the
`fastprompt_prefixes` keyword, which transformers 5 forwards from the layer to its attention function
(encoder-decoder models: `decoder_prefixes(model, {(role, layer): LayerPrefix}, position_shift=P)`). The hook runs
outside the gradient-checkpointed layer forward, so the backward recompute sees the same prefix tensors; generate()
and torch.compile see them too. A caller may also pass `fastprompt_prefixes=` to the model's forward itself (the
PEFT path does). Where a family drops the keyword, the attention function reads the call's binding itself. Nothing
here touches a class or a module global other than the interface registrations, which are inert for models that
did not select "fastprompt" / "fastprompt_seq2seq".

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

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface  # (also exported at the top level by later 5.x)

from .. import ops  # ops.prefix_attention looked up per call (a test spy may stand in for it)
from ..ops import shared_prefix_decode
from ..prompts.layer_prefix import LayerPrefix
from .call_context import AttentionCall, bound_call, current_call
from .families import ROBERTA, WRAPPERS, FamilyFacts, family_facts
from .seq2seq_attention import (
    CROSS,
    SELF,
    SEQ2SEQ_ATTENTION_NAME,
    AttentionSite,
    attention_sites,
    is_encoder_decoder,
    prefix_bias_for_call,
    shifted_positions,
)

ATTENTION_NAME = "fastprompt"
PREFIXES_KWARG = "fastprompt_prefixes"
STATE_ATTR = "_fastprompt_attention_state"
SLOT_ATTR = "_fastprompt_attention_slot"
LAYER_STATE_ATTR = "_fastprompt_layer_state"

__all__ = [
    "ATTENTION_NAME",
    "LayerPrefix",
    "ModelLayout",
    "enable_fastprompt_attention",
    "disable_fastprompt_attention",
    "layer_prefixes",
    "model_layout",
    "is_fastprompt_enabled",
    "plain_sdpa_call",
    "set_backend",
    "fastprompt_attention_forward",
    "fastprompt_attention_mask",
    "enable_seq2seq_attention",
    "decoder_prefixes",
    "own_prompt_prefixes",
]


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
    # Per layer: (KV heads, head_dim) of its attention. Uniform models repeat (num_kv_heads, head_dim); where layers
    # differ (Gemma 4), num_kv_heads / head_dim above are the widest layer's, the footprint PEFT sizes its prefix for.
    layer_kv_shapes: tuple = ()
    # Per layer: the layer whose keys/values (and so whose prefix) its attention reads: itself, or for a KV-shared
    # layer the earlier layer that stores them.
    kv_sources: tuple = ()
    per_layer_inputs: bool = False      # per-layer input embeddings looked up from token ids (Gemma 4's PLE)

    @property
    def uniform_prefixes(self) -> bool:
        """Every layer takes its own prefix of one shape (no per-layer shapes, no KV sharing)."""
        return len(set(self.layer_kv_shapes)) <= 1 and all(src == i for i, src in enumerate(self.kv_sources))


# ----------------------------------------------------------------------------------------------------------------
# Model inspection


def hf_model(model):
    """The transformers PreTrainedModel inside `model` (a PeftModel, or the model itself)."""
    try:
        from peft import PeftModel  # optional dependency (the peft extra)
    except ImportError:  # peft is optional for the plumbing
        PeftModel = ()
    if PeftModel and isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _layer_kv_shapes(config, num_layers: int) -> Optional[list]:
    """(KV heads, head_dim) per layer where the config declares per-layer attention shapes (transformers'
    heterogeneous configs: `per_layer_config[i]`; reading `config.head_dim` there raises), else None."""
    if not getattr(config, "is_heterogeneous", False):
        return None
    shapes = []
    for layer in config.per_layer_config[:num_layers]:
        heads = layer.num_attention_heads
        shapes.append((int(getattr(layer, "num_key_value_heads", None) or heads),
                       int(getattr(layer, "head_dim", None) or layer.hidden_size // heads)))
    return shapes


def _kv_sources(config, facts: FamilyFacts, layer_types, num_layers: int) -> tuple:
    """Per layer, the layer whose K/V it attends: a KV-shared trailing layer reads the last earlier layer of its
    type (transformers' Gemma 4 rule: `kv_sharing_modes`, "store" layers feed the "reuse" ones)."""
    shared = int(getattr(config, facts.kv_shared_layers_field, 0) or 0) if facts.kv_shared_layers_field else 0
    first_shared = num_layers - shared
    sources = list(range(num_layers))
    for layer in range(max(first_shared, 0), num_layers):
        earlier = [i for i in range(first_shared) if layer_types[i] == layer_types[layer]]
        if not earlier:
            raise ValueError(f"fastprompt: layer {layer} shares the K/V of an earlier {layer_types[layer]!r} layer, "
                             "but no earlier layer has that type")
        sources[layer] = earlier[-1]
    return tuple(sources)


def find_layers(hf) -> tuple[str, torch.nn.ModuleList]:
    config = text_config(hf.config)
    num_layers = getattr(config, "num_hidden_layers", None)
    facts = family_facts(getattr(config, "model_type", ""))
    names = facts.layer_names if facts is not None else ("layers", "h", "layer", "blocks")
    root, scope = "", hf
    if getattr(hf.config, "model_type", "") in WRAPPERS:  # the text model's layers, not a vision tower's
        scope = hf.get_decoder()
        root = next(name for name, module in hf.named_modules() if module is scope)
    best = None
    for name, module in scope.named_modules():
        name = f"{root}.{name}" if root and name else (root or name)
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
    hf = hf_model(model)
    config = text_config(hf.config)
    model_type = getattr(config, "model_type", "")
    facts = family_facts(model_type) or _UNKNOWN_FAMILY
    num_heads = config.num_attention_heads
    hidden = config.hidden_size
    num_layers = config.num_hidden_layers
    shapes = _layer_kv_shapes(config, num_layers)
    if shapes is None:
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        shapes = [(int(num_kv_heads), int(head_dim))] * num_layers
    else:  # the widest layer's (the first of the largest head_dim), which PEFT sizes its prefix for
        num_kv_heads, head_dim = max(shapes, key=lambda shape: shape[1])
    path, _ = find_layers(hf)
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
    per_layer_inputs = bool(getattr(config, facts.per_layer_input_field, 0)) if facts.per_layer_input_field else False
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
        layer_kv_shapes=tuple(shapes),
        kv_sources=_kv_sources(config, facts, layer_types, num_layers),
        per_layer_inputs=per_layer_inputs,
    )


def check_supports_attention_interface(hf) -> None:
    """Raise TypeError when the model's attention does not go through transformers' AttentionInterface."""
    config = text_config(hf.config)
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


def _check_refused_config(hf) -> None:
    """Raise ValueError for a configuration its family's entry says fastprompt's attention cannot reproduce."""
    config = text_config(hf.config)
    facts = family_facts(getattr(config, "model_type", ""))
    for name, value, why in (facts.refused_configs if facts is not None else ()):
        if getattr(config, name, None) == value:
            raise ValueError(f"fastprompt: cannot switch {type(hf).__name__} with {name}={value!r} to fastprompt's "
                             f"attention: {why}")


# ----------------------------------------------------------------------------------------------------------------
# Registration and the per-instance switch


class AttentionState:
    """Lives on an enabled model instance: its settings only (backend, enable count, what the first enable changed
    and the last disable restores), nothing of any one call."""

    def __init__(self, backend: str, kind: str = "decoder"):
        self.backend = backend
        self.kind = kind            # "decoder" (decoder-only / encoder-only models) | "seq2seq" (encoder-decoder)
        self.seq2seq = kind == "seq2seq"
        self.users = 1
        self.teardown = None        # _Teardown: set by the enable that switched the model

    # A pickled / torch.saved model is loaded where "fastprompt" may not be registered yet (a fresh process)
    def __setstate__(self, state):
        self.__dict__.update(state)
        _register_once()


def bind_call(model_or_state, call: AttentionCall):
    """Context manager: inside the block, this thread's / task's calls of the model read `call`."""
    state = model_or_state if isinstance(model_or_state, AttentionState) else getattr(
        hf_model(model_or_state), STATE_ATTR, None)
    if state is None:
        raise ValueError("fastprompt: binding a call needs a model with fastprompt attention enabled")
    return bound_call(state, call)


def resolve_prefixes(prefixes, batch: int):
    """Prefixes whose pool rows follow generate()'s batch expansion (beams, returned sequences) resolve to the
    mapping for this batch size; any other mapping is returned as it is."""
    for_batch = getattr(prefixes, "for_batch", None)
    return for_batch(batch) if for_batch is not None else prefixes


@dataclass
class AttentionSlot:
    """What the attention function knows of one attention module of an enabled model (set by the enable, read per
    call): the data that tells a decoder's self-attention from an encoder's or a cross-attention."""
    layer_idx: int
    state: AttentionState
    role: str = SELF                    # seq2seq_attention.ENCODER | SELF | CROSS
    prefix_key: Any = None              # what the layer's prefix is looked up by: layer_idx, or (role, layer_idx)
    bias_module: Any = None             # T5: the stack's first self-attention (owner of relative_attention_bias)

    def __post_init__(self):
        if self.prefix_key is None:
            self.prefix_key = self.layer_idx


@dataclass
class _Teardown:
    """What switching one model to fastprompt attention changed: restored by the disable that ends the last user."""
    previous_implementation: Any
    hooks: list
    slotted: list


@dataclass
class EnableToken:
    """One enable's handle: every enable (the first or a nested one) counts one user of the model's attention state,
    and the disable of whichever token ends the last user restores the model, in any order. Idempotent."""
    hf_model: Any
    state: Any
    restored: bool = False


def join_enabled(hf) -> Optional[EnableToken]:
    """Enabling a model already switched to fastprompt attention adds one user and returns its token (whichever
    kind of model, whichever entry point enabled it); not enabled, None (the caller switches it)."""
    existing = hf.__dict__.get(STATE_ATTR)
    if existing is None:
        return None
    existing.users += 1
    return EnableToken(hf, existing)


def finish_enable(hf, state: AttentionState, previous, hooks: list, slotted: list) -> EnableToken:
    """Record what switching `hf` changed on its new attention state and hand out the first user's token."""
    state.teardown = _Teardown(previous, hooks, slotted)
    object.__setattr__(hf, STATE_ATTR, state)
    return EnableToken(hf, state)


_registered = False


def _register_once() -> None:
    global _registered
    if _registered:
        return
    for name in (ATTENTION_NAME, SEQ2SEQ_ATTENTION_NAME):  # one function under both names (see the docstring)
        AttentionInterface.register(name, fastprompt_attention_forward)
        AttentionMaskInterface.register(name, fastprompt_attention_mask)
    _registered = True


def attention_name(hf) -> str:
    """The attention implementation fastprompt switches `hf` to: "fastprompt_seq2seq" for an encoder-decoder model
    (the name it always had there), else "fastprompt"."""
    return SEQ2SEQ_ATTENTION_NAME if is_encoder_decoder(hf) else ATTENTION_NAME


def check_attention_still_switched(model) -> None:
    """Refuse a call of a patched model whose attention implementation was switched away from fastprompt's since:
    the prefix reaches the attention through fastprompt's only."""
    hf = hf_model(model)
    attn = hf.config._attn_implementation
    if attn != attention_name(hf):
        raise RuntimeError(
            f"fastprompt: the patched model's attention implementation was changed to {attn!r}; the prefix only "
            "reaches the attention through fastprompt's. Call unpatch_model(model) before switching it.")


class BridgedPrefixes(dict):
    """Layer prefixes that are detached leaves whose gradient a caller carries back itself (fastprompt's PEFT path
    does so under reentrant gradient checkpointing); the reentrant-checkpointing guard lets them through."""


def take_bridged_grad(leaf: torch.Tensor) -> torch.Tensor:
    """The gradient the layers' reentrant-checkpointed recompute accumulated into a detached leaf during THIS
    backward pass, taken out of the leaf (its .grad cleared): nothing a backward pass leaves behind is read by the
    next one (zero_grad() never reaches the leaf, which is no parameter)."""
    grad = leaf.grad
    leaf.grad = None
    return grad if grad is not None else torch.zeros_like(leaf)


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
    state = layer.__dict__.get(LAYER_STATE_ATTR)
    if state is None:
        return None
    given = kwargs.get(PREFIXES_KWARG)
    call = current_call(state)
    bound = call.prefixes if call is not None else None
    if given is None and bound is not None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        given = resolve_prefixes(bound, hidden.shape[0]) if hidden is not None else bound
        check_prefix_checkpointing(layer, given)
        kwargs[PREFIXES_KWARG] = given
        return args, kwargs
    check_prefix_checkpointing(layer, given)
    return None


def _accepts_var_kwargs(fn) -> bool:
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def check_backend(backend: str) -> None:
    if backend not in ops.BACKENDS:
        raise ValueError(f"fastprompt: backend must be one of {ops.BACKENDS}, got {backend!r}")


def is_fastprompt_enabled(model) -> bool:
    return getattr(hf_model(model), STATE_ATTR, None) is not None


def _shift_positions_hook(module, args, kwargs):
    # Learned decoder positions (BART): with PEFT's P-long cache real tokens start at P; the call says how far
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


def _layer_sites(hf) -> tuple[list, list]:
    """The attention modules of a decoder-only or encoder-only model (role SELF), and its layers."""
    _, layers = find_layers(hf)
    sites = []
    for idx, layer in enumerate(layers):
        for sub in layer.modules():
            name = type(sub).__name__.lower()
            if "cross" in name:  # cross-attention reads encoder states: prefixes are for self-attention only
                continue
            if "attention" in name or hasattr(sub, "is_causal"):
                sites.append(AttentionSite(sub, idx))
    return sites, list(layers)


def enable_fastprompt_attention(model, *, backend: str = "auto") -> EnableToken:
    """Register (once) and switch THIS model instance to fastprompt's attention; returns a restore token.

    Any model kind: decoder-only and encoder-only models take "fastprompt", encoder-decoder models (T5 / BART)
    "fastprompt_seq2seq" with each attention module's role recorded on it. Enabling an already-enabled model adds
    one user: the model is restored when every token has been disabled, in any order (disabling a token twice is a
    no-op).
    """
    check_backend(backend)
    hf = hf_model(model)
    joined = join_enabled(hf)
    if joined is not None:
        return joined
    encoder_decoder = is_encoder_decoder(hf)
    if not encoder_decoder:  # T5 / mT5 / BART call the interface without declaring _supports_attention_backend:
        check_supports_attention_interface(hf)  # for them the switch itself is the check (below)
    _check_refused_config(hf)
    _register_once()
    sites, layers = attention_sites(hf) if encoder_decoder else _layer_sites(hf)
    if not sites:
        raise TypeError(f"fastprompt: found no attention module in the layers of {type(hf).__name__}")
    name = attention_name(hf)
    previous = hf.config._attn_implementation
    state = AttentionState(backend, "seq2seq" if encoder_decoder else "decoder")
    slotted = []
    for site in sites:
        key = (site.role, site.layer_idx) if encoder_decoder else site.layer_idx
        object.__setattr__(site.module, SLOT_ATTR, AttentionSlot(site.layer_idx, state, site.role, key,
                                                                 site.bias_module))
        slotted.append(site.module)
    hf.set_attn_implementation(name)
    if hf.config._attn_implementation != name:
        for sub in slotted:
            object.__delattr__(sub, SLOT_ATTR)
        raise TypeError(
            f"fastprompt: {type(hf).__name__} refused the attention implementation switch "
            f"(still {hf.config._attn_implementation!r})"
        )
    hooks = []
    for layer in layers:
        if _accepts_var_kwargs(layer.forward):  # else the attention reads the call's binding (no checkpointing)
            object.__setattr__(layer, LAYER_STATE_ATTR, state)
            hooks.append(layer.register_forward_pre_hook(_inject_prefixes_hook, with_kwargs=True))
            slotted.append(layer)
    positions = shifted_positions(hf) if encoder_decoder else None
    if positions is not None:
        object.__setattr__(positions, LAYER_STATE_ATTR, state)
        hooks.append(positions.register_forward_pre_hook(_shift_positions_hook, with_kwargs=True))
        slotted.append(positions)
    return finish_enable(hf, state, previous, hooks, slotted)


def enable_seq2seq_attention(model, *, backend: str = "auto") -> EnableToken:
    """enable_fastprompt_attention for an encoder-decoder model (T5 / mT5 / BART), the entry its front ends call;
    refuses any other model. The same switch: disable_fastprompt_attention undoes it, enabling twice nests."""
    hf = hf_model(model)
    if not is_encoder_decoder(hf):
        raise ValueError(f"fastprompt: enable_seq2seq_attention needs an encoder-decoder model (T5, BART, ...); "
                         f"{type(hf).__name__} is not one (use enable_fastprompt_attention)")
    return enable_fastprompt_attention(model, backend=backend)


def disable_fastprompt_attention(model, token: EnableToken) -> None:
    """Undo one `enable_fastprompt_attention` / `enable_seq2seq_attention`: the last user's disable restores the
    previous attention implementation, no hook, no per-module state. Idempotent; any order."""
    if token is None or token.restored:
        return
    token.restored = True
    hf = token.hf_model
    state = hf.__dict__.get(STATE_ATTR)
    if state is None or state is not token.state:  # the model was restored (and maybe enabled anew) since
        return
    state.users -= 1
    if state.users > 0:
        return
    teardown = state.teardown
    for hook in teardown.hooks:
        hook.remove()
    for sub in teardown.slotted:
        for attr in (SLOT_ATTR, LAYER_STATE_ATTR):
            if attr in sub.__dict__:
                object.__delattr__(sub, attr)
    object.__delattr__(hf, STATE_ATTR)
    hf.set_attn_implementation(teardown.previous_implementation)


def set_backend(model, backend: str) -> None:
    """Force the prefix_attention backend ("auto" | "torch" | "triton" | "cuda" | "reference") of an enabled model."""
    check_backend(backend)
    state = getattr(hf_model(model), STATE_ATTR, None)
    if state is None:
        raise ValueError("fastprompt: set_backend needs a model with fastprompt attention enabled")
    state.backend = backend


def normalize_prefixes(prefixes) -> dict:
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
    """Inside the block, the attention of layer i reads `prefixes[i]`; absent layers get no prefix. The binding is
    the calling thread's / asyncio task's own: concurrent calls of the same model each read their own prefixes."""
    hf = hf_model(model)
    state = getattr(hf, STATE_ATTR, None)
    if state is None:
        raise ValueError("fastprompt: layer_prefixes needs enable_fastprompt_attention(model) first")
    normalized = prefixes if hasattr(prefixes, "for_batch") else normalize_prefixes(prefixes)
    with bound_call(state, AttentionCall(prefixes=normalized)):
        yield normalized


class decoder_prefixes:
    """layer_prefixes of an encoder-decoder model: inside the block, decoder layer l's self-attention reads
    `prefixes[("self", l)]` (and cross-attention `prefixes[("cross", l)]`, encoder layer l `prefixes[("encoder", l)]`
    where given). `position_shift`: how far the prefix moves learned decoder positions (PEFT: P). Bound to the
    calling thread / asyncio task (call_context): concurrent calls of the same model each read their own."""

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


class own_prompt_prefixes(decoder_prefixes):
    """`{layer: LayerPrefix}` from a fastprompt prompt module, placed in an encoder-decoder model's decoder
    self-attention (where PEFT's prefix tuning puts it, see seq2seq_attention)."""

    def __init__(self, model, prefixes):
        placed = {(SELF, layer): lp for layer, lp in normalize_prefixes(prefixes).items()}
        shift = max((lp.key.shape[-2] * (lp.index.reshape(lp.index.shape[0], -1).shape[1]
                                         if lp.index is not None else 1) for lp in placed.values()), default=0)
        super().__init__(model, placed, position_shift=shift)


# ----------------------------------------------------------------------------------------------------------------
# The registered functions


def fastprompt_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                              attention_mask=None, **kwargs):
    """A 2D key padding mask `[B, Lk_valid]` (True = real key) or None, never a 4D mask (Gemma 4 with KV-shared
    layers: the same key mask viewed as `[B, 1, 1, Lk_valid]`, see `_sliceable`).

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
            return _sliceable(torch.ones(batch_size, valid, dtype=torch.bool, device=kwargs.get("device")),
                              kwargs.get("config"))
        return None
    attention_mask = attention_mask.to(torch.bool)[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return _sliceable(attention_mask, kwargs.get("config"))


def _sliceable(key_mask: Tensor, config) -> Tensor:
    """The key padding mask as `[B, 1, 1, Lk]` for a model with KV-shared layers: Gemma 4 slices its masks' query
    dimension (`mask[:, :, -n:, :]`) before those layers, which a 2D mask cannot take; the attention reads it back
    as `[B, Lk]`."""
    return key_mask[:, None, None, :] if _has_kv_shared_layers(config) else key_mask


def _has_kv_shared_layers(config) -> bool:
    facts = family_facts(getattr(config, "model_type", "")) if config is not None else None
    field = facts.kv_shared_layers_field if facts is not None else None
    return bool(field) and int(getattr(config, field, 0) or 0) > 0


def fastprompt_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                                 scaling: Optional[float] = None, dropout: float = 0.0, **kwargs):
    """AttentionInterface function ("fastprompt" and "fastprompt_seq2seq"): q `[B, Hq, Lq, D]`, k/v `[B, Hkv, Lk, D]`
    → (`[B, Lq, Hq, D]`, None). What differs between modules (role, prefix key, T5's bias module) is read from the
    module's AttentionSlot."""
    slot = getattr(module, SLOT_ATTR, None)
    call = current_call(slot.state) if slot is not None else None
    prefixes = kwargs.get(PREFIXES_KWARG)
    if prefixes is None and call is not None:  # a family that drops the layer keyword
        prefixes = call.prefixes
    prefixes = resolve_prefixes(prefixes, query.shape[0]) if prefixes is not None else None
    role = slot.role if slot is not None else SELF
    prefix_key = slot.prefix_key if slot is not None else getattr(module, "layer_idx", None)
    prefix = prefixes.get(prefix_key) if prefixes else None
    backend = slot.state.backend if slot is not None else "auto"
    capture = call.capture if call is not None else None
    if capture is not None:  # prompt hoisting: keep this layer's K/V as the attention sees them (after RoPE)
        capture[prefix_key] = (key, value)

    if attention_mask is not None:
        if (attention_mask.dim() == 4 and attention_mask.dtype == torch.bool and attention_mask.shape[1:3] == (1, 1)
                and _has_kv_shared_layers(getattr(module, "config", None))):
            attention_mask = attention_mask[:, 0, 0]  # the key mask of fastprompt_attention_mask (_sliceable)
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
    if role == CROSS:  # the encoder's states: every key visible
        is_causal = False
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    # T5: position_bias is what T5 computed for the keys it sees (real tokens only here). Its cross-attention has no
    # relative bias (the bias is zeros): dropped, so the fast paths run.
    attn_bias = prefix_bias = None
    position_bias = kwargs.get("position_bias")
    if position_bias is not None and role != CROSS:
        attn_bias = position_bias[..., : key.shape[2]]
        if attn_bias.requires_grad and attn_bias.grad_fn is None:
            attn_bias = attn_bias.detach()  # T5's zeros marked requires_grad for checkpointing: nothing to learn

    pk = pv = pidx = None
    if prefix is not None:
        pk, pv, pidx = prefix.key, prefix.value, prefix.index
        if pk.dtype != query.dtype or pk.device != query.device:  # the prefix follows the layer's queries
            pk, pv = pk.to(device=query.device, dtype=query.dtype), pv.to(device=query.device, dtype=query.dtype)
            pidx = pidx.to(query.device) if pidx is not None else None
        if attn_bias is not None and slot is not None and slot.bias_module is not None:
            # a pool's S selected entries lie end to end: S*P prefix positions, as a cache of them would hold
            slots = pidx.reshape(pidx.shape[0], -1).shape[1] if pidx is not None else 1
            prefix_bias = prefix_bias_for_call(slot, pk.shape[-2] * slots, query.shape[2],
                                               key.shape[2] - query.shape[2], query.dtype)

    # transformers passes the module's attention dropout in training and 0 in eval; the op fuses it
    dropout_p = float(dropout) if dropout and module.training else 0.0

    if pk is None and slot is not None and slot.state.seq2seq and query.shape[1] == key.shape[1]:
        # An encoder-decoder model's layer without a prefix (the encoders, the cross-attention, a decoder without
        # one): the very SDPA call transformers' own "sdpa" path makes, T5's bias as a float mask. The fused op has
        # nothing to read in place here, and SDPA skips its per-call machinery (measured: the op costs more than
        # SDPA for the same prefix-less call). Decoder-only models keep the op (its window, soft-capping and
        # dropout stream).
        mask = _sdpa_with_bias_mask(query, key, attention_mask, attn_bias, bool(is_causal))
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                               dropout_p=dropout_p, scale=float(scaling))
        return out.transpose(1, 2), None

    if pk is None and backend == "auto" and plain_sdpa_call(query, key, attention_mask, attn_bias, dropout_p,
                                                            softcap, window, bool(is_causal)):
        # A layer without a prefix and with nothing but plain attention to do (no padding, bias, dropout,
        # soft-capping or window; equal heads; every query sees a key): the SDPA call transformers' own "sdpa" path
        # makes, so the patched model's prompt-free layers are the unpatched model's. The op has nothing to read in
        # place here, and SDPA runs its best kernel for the dtype (on an H100 in float32 the op's Triton kernel,
        # IEEE-fp32 dots, took 1.24x the time of a frozen ViT-B/16 pass with eager attention: benchmarks/RESULTS.md).
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=bool(is_causal) and query.shape[2] > 1, scale=float(scaling))
        return out.transpose(1, 2), None

    if (pk is not None and pidx is None and attn_bias is None and query.shape[2] == 1
            and backend in ("auto", "torch")):
        # a generate() step over a shared prefix on the CPU: the lean path (None where it does not apply)
        out = shared_prefix_decode(query, key, value, pk, pv, attention_mask, float(scaling), softcap, window,
                                   dropout_p)
        if out is not None:
            return out.transpose(1, 2), None

    out = ops.prefix_attention(query, key, value, pk, pv, prefix_index=pidx, key_padding_mask=attention_mask,
                               causal=bool(is_causal), scale=float(scaling), softcap=softcap, window=window,
                               dropout_p=dropout_p, backend=backend, attn_bias=attn_bias, prefix_bias=prefix_bias)
    return out.transpose(1, 2), None


seq2seq_attention_forward = fastprompt_attention_forward  # its name when encoder-decoder models had their own copy


def plain_sdpa_call(q, k, kpm, bias, dropout_p, softcap, window, causal) -> bool:
    """Whether SDPA computes this prefix-less call as the op would: no key padding mask, bias, dropout, soft-capping
    or window, as many key as query heads, and causal only where SDPA's top-left causality is the op's bottom-right
    one (Lq = Lk) or does not apply (a single query, which sees every key)."""
    lq, lk = q.shape[2], k.shape[2]
    return (kpm is None and bias is None and dropout_p == 0 and not softcap and window is None
            and q.shape[1] == k.shape[1] and lk > 0 and (not causal or lq == lk or lq == 1))


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
