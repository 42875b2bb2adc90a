"""timm's VisionTransformer as a model that fastprompt's own prompts attach to: the adapter entry.

timm has no attention interface to register a function with, so prefixes reach its attention by patching the
`Attention` modules of ONE model instance: each block's `attn` gets an instance attribute `forward` (a
PatchedMethod, recorded in a ReplacedMethods on the module's slot; disable restores exactly what was there) that
computes timm's Attention with `fastprompt.ops.prefix_attention` in place of SDPA / the eager softmax. The class and
every other instance are untouched. A layer finds its prefix through the same per-call binding as transformers
models (transformers_attention.layer_prefixes / current_call: a context variable of the calling thread / task, never
state on the shared modules); the enabled model carries the same AttentionState (backend, users), so
`set_backend`, `is_fastprompt_enabled` and `layer_prefixes` work on it unchanged.

What the patched attention reproduces of timm's `Attention.forward` (timm 1.0.x): the fused qkv projection, q/k
norms (qk_norm=True: applied to the sequence's q and k; the prefix keys are learned in the normalized space, as the
reference code concatenates them after the module's own k), the module's scale, attention dropout (fused into the
op in training), the optional output norm (scale_norm) and sigmoid gate (gated), proj and proj_drop. The prefix keys
and values go before the sequence keys, never masked, no position. Refused, naming what: any other attention class
in a block (DiffAttention, the rotary Attention of EVA-style models, a parallel block's fused attention), an
`attn_mask` or `is_causal` call, gradient checkpointing of the blocks with trainable prefixes (its recompute runs
outside the call's binding).

Everything else vision.py needs to know about a timm model lives here too: the pixel argument (`x`), where
input-level prompts go (a forward pre-hook on `norm_pre`: after the position embedding, the position dropout and
patch dropout, after the `num_prefix_tokens` leading tokens: [CLS], register tokens, DeiT's distillation token), and
the pool query (`forward_head(forward_features(x), pre_logits=True)` of the frozen model, as l2p-pytorch,
dualprompt-pytorch and CODA-Prompt take it).

timm is never imported here: a model is a timm VisionTransformer only if timm's module is already loaded.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .. import ops  # ops.prefix_attention looked up per call
from ..prompts.base import TIMM_VIT_MODEL_TYPE
from .patched_method import PatchedMethod, ReplacedMethods
from .call_context import current_call
from .transformers_attention import (STATE_ATTR, AttentionState, EnableToken, check_backend, finish_enable,
                                     plain_sdpa_call, resolve_prefixes)

__all__ = ["TIMM_VIT_MODEL_TYPE", "PIXEL_ARGUMENT", "is_timm_vit", "check_timm_model", "check_timm_call",
           "leading_tokens", "insertion_module", "frozen_query", "enable_timm_attention", "disable_timm_attention",
           "timm_attention_forward"]

VIT_MODULE = "timm.models.vision_transformer"
PIXEL_ARGUMENT = "x"  # VisionTransformer.forward(x, attn_mask=None, is_causal=False)
SLOT_ATTR = "_fastprompt_timm_attention_slot"
KIND = "timm"
# What the patched forward reads of a timm Attention module (timm 1.0.x); a module missing one is refused.
REQUIRED_ATTENTION_ATTRS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "proj",
                            "proj_drop")


def _vit_module():
    return sys.modules.get(VIT_MODULE)


def is_timm_vit(model) -> bool:
    """A timm VisionTransformer (or a subclass: DeiT's VisionTransformerDistilled)."""
    vit = _vit_module()
    cls = getattr(vit, "VisionTransformer", None) if vit is not None else None
    return cls is not None and isinstance(model, cls)


def _attention_class():
    """The attention class timm's Block builds by default (timm.layers.Attention; older timm defined it in
    vision_transformer itself, which re-exports it either way)."""
    return getattr(_vit_module(), "Attention", None)


def check_timm_model(model) -> None:
    """Raise TypeError for a timm VisionTransformer whose blocks' attention the patch cannot reproduce."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.Module) or len(blocks) == 0:
        raise TypeError(f"fastprompt: found no `blocks` in {type(model).__name__}")
    supported = _attention_class()
    for idx, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if attn is None or type(attn) is not supported:
            found = "no `attn` module" if attn is None else f"{type(attn).__module__}.{type(attn).__name__}"
            raise TypeError(
                f"fastprompt: block {idx} of {type(model).__name__} ({type(block).__name__}) has {found}; fastprompt "
                f"patches timm's standard Attention ({supported.__module__}.{supported.__name__}) only, the default "
                "of VisionTransformer(attn_layer=..., block_fn=...)")
        missing = [name for name in REQUIRED_ATTENTION_ATTRS if not hasattr(attn, name)]
        if missing:
            raise TypeError(f"fastprompt: timm's Attention in block {idx} has no {missing}: this timm version's "
                            "attention is not the one fastprompt reproduces (see README, timm)")


def check_timm_call(model, kw, prefix_placement: bool) -> None:
    """What a call of a patched timm model cannot take, refused by name."""
    if kw.get("attn_mask") is not None:
        raise ValueError(f"fastprompt: {type(model).__name__}(attn_mask=...) is not supported with a fastprompt "
                         "prompt (the prompt's keys would need a place in the mask); pass attn_mask=None")
    if kw.get("is_causal"):
        raise ValueError(f"fastprompt: {type(model).__name__}(is_causal=True) is not supported with a fastprompt "
                         "prompt; Vision Transformers attend bidirectionally")
    if prefix_placement and getattr(model, "grad_checkpointing", False) and model.training \
            and torch.is_grad_enabled():
        raise ValueError(f"fastprompt: {type(model).__name__}.set_grad_checkpointing(True) with a prefix prompt: "
                         "the checkpointed blocks recompute outside the call that holds the prefixes; call "
                         "set_grad_checkpointing(False)")


def leading_tokens(model) -> int:
    """The tokens before the patches that input-level prompts go after: [CLS], register tokens, DeiT's
    distillation token (timm's num_prefix_tokens)."""
    return int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))


def insertion_module(model) -> torch.nn.Module:
    """The module whose INPUT is the sequence after the position embedding (and position / patch dropout): the
    pre-norm (an Identity unless pre_norm=True, CLIP-style: then the prompts pass it, as on Hugging Face CLIP)."""
    module = getattr(model, "norm_pre", None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fastprompt: {type(model).__name__} has no `norm_pre` module, where input-level prompts "
                        "would be inserted after the position embedding")
    return module


def frozen_query(model, pixels: Tensor, mode: str) -> Tensor:
    """[B, embed_dim]: the model's pre-logits (`forward_head(..., pre_logits=True)`: the final norm at [CLS] for
    global_pool='token', the pooled fc_norm output otherwise) or the token mean of `forward_features`, from a pass
    without prompts, no_grad. The caller binds no prompt and no prefix around it."""
    with torch.no_grad():
        features = model.forward_features(pixels)
        if mode == "mean":
            return features.mean(dim=1)
        return model.forward_head(features, pre_logits=True)


# ----------------------------------------------------------------------------------------------------------------
# the per-instance attention patch


@dataclass
class TimmAttentionSlot:
    """On one patched Attention module: its block index, the model's AttentionState, what the patch replaced."""

    layer_idx: int
    state: AttentionState
    methods: ReplacedMethods = field(default_factory=ReplacedMethods)


def enable_timm_attention(model, *, backend: str = "auto") -> EnableToken:
    """Patch the Attention modules of THIS timm VisionTransformer to fastprompt's prefix attention; returns the
    token that `disable_timm_attention` restores with (counted users, as enable_fastprompt_attention)."""
    check_backend(backend)
    existing = model.__dict__.get(STATE_ATTR)
    if existing is not None:  # enabled already: one more user
        existing.users += 1
        return EnableToken(model, existing)
    check_timm_model(model)
    state = AttentionState(backend, kind=KIND)
    patched = []
    for idx, block in enumerate(model.blocks):
        attn = block.attn
        slot = TimmAttentionSlot(idx, state)
        slot.methods.replace(attn, "forward", PatchedMethod(timm_attention_forward, attn))
        object.__setattr__(attn, SLOT_ATTR, slot)
        patched.append(attn)
    return finish_enable(model, state, None, [], patched)


def disable_timm_attention(model, token: Optional[EnableToken]) -> None:
    """Undo one enable: the last user's disable restores every patched module's own `forward` and removes the
    slots and the model's state. Idempotent; any order."""
    if token is None or token.restored:
        return
    token.restored = True
    state = model.__dict__.get(STATE_ATTR)
    if state is None or state is not token.state:
        return
    state.users -= 1
    if state.users > 0:
        return
    for attn in state.teardown.slotted:
        slot = attn.__dict__.pop(SLOT_ATTR, None)
        if slot is not None:
            slot.methods.restore()
    object.__delattr__(model, STATE_ATTR)


def timm_attention_forward(module, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """timm's Attention.forward with the layer's prefix read in place by fastprompt's op."""
    slot = module.__dict__[SLOT_ATTR]
    B, N, _ = x.shape
    call = current_call(slot.state)
    prefixes = resolve_prefixes(call.prefixes, B) if call is not None and call.prefixes is not None else None
    prefix = prefixes.get(slot.layer_idx) if prefixes else None
    if attn_mask is not None or is_causal:
        if prefix is not None:
            raise ValueError("fastprompt: timm attention with a prefix takes no attn_mask / is_causal (pass neither)")
        # no prompt in this call (the model used on its own, e.g. forward_features(x, attn_mask=...)): timm's own
        return type(module).forward(module, x, attn_mask=attn_mask, is_causal=is_causal)

    gate = getattr(module, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)

    pk = pv = pidx = None
    if prefix is not None:
        pk, pv, pidx = prefix.key, prefix.value, prefix.index
        if pk.dtype != q.dtype or pk.device != q.device:
            pk, pv = pk.to(device=q.device, dtype=q.dtype), pv.to(device=q.device, dtype=q.dtype)
            pidx = pidx.to(q.device) if pidx is not None else None
    dropout_p = float(module.attn_drop.p) if module.training else 0.0
    if pk is None and slot.state.backend == "auto" and plain_sdpa_call(q, k, None, None, dropout_p, None, None, False):
        # a block without a prompt and without dropout: the SDPA call timm's fused path makes (the transformers
        # integration's rule for its prompt-free layers)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=float(module.scale))
    else:
        out = ops.prefix_attention(q, k, v, pk, pv, prefix_index=pidx, key_padding_mask=None, causal=False,
                                   scale=float(module.scale), dropout_p=dropout_p, backend=slot.state.backend)
    out = out.transpose(1, 2).reshape(B, N, module.num_heads * module.head_dim)
    norm = getattr(module, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return module.proj_drop(module.proj(out))
