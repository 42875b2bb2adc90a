"""PEFT's prompt-learning adapters read the way fastprompt's techniques need them, once per call: a prefix-tuning
adapter's K/V for every layer, and multitask prompt tuning's task ids. Shared by the PEFT front ends (peft.py for
decoder-only models, seq2seq.py for encoder-decoder ones) and prompt hoisting, below all of them."""
from __future__ import annotations

import warnings

import torch

from ..prompts.layer_prefix import LayerPrefix

__all__ = ["prefix_kv", "layer_prefixes_from_kv", "prefix_layer_kv", "check_mpt_task_ids"]


def prefix_kv(model) -> torch.Tensor:
    """The active prefix-tuning adapter's K/V for all layers, `[2L, Hkv, P, D]`, the encoder run once on P tokens.

    PEFT's saved layout `[P, 2·L·Hkv·D]` viewed as `(P, 2L, Hkv, D)`: index 2l is layer l's K, 2l+1 its V.
    """
    config = model.active_peft_config
    encoder = model.prompt_encoder[model.active_adapter]
    num_tokens = config.num_virtual_tokens
    if config.inference_mode:
        flat = encoder.embedding.weight
    else:
        tokens = model.prompt_tokens[model.active_adapter][:num_tokens].to(encoder.embedding.weight.device)
        flat = encoder(tokens)
    if model.base_model_torch_dtype is not None:
        flat = flat.to(model.base_model_torch_dtype)
    heads = config.num_attention_heads
    kv = flat.view(num_tokens, config.num_layers * 2, heads, config.token_dim // heads).permute(1, 2, 0, 3)
    return kv.contiguous()  # one [2L, Hkv, P, D] copy for the whole batch


def layer_prefixes_from_kv(kv: torch.Tensor, container=dict, layout=None) -> dict:
    """{layer: LayerPrefix} from PEFT's `[2L, Hkv, P, D]`: layer l's K/V are kv[2l], kv[2l+1].

    With a `layout` whose layers differ (Gemma 4), PEFT's rules: a layer takes the leading (KV heads, head_dim) of its
    own shape from the prefix (sized for the widest layer), a layer wider than the prefix gets none, and a KV-shared
    layer reads the prefix of the layer whose K/V it shares (PEFT puts the prefix in that layer's cache entry only).
    PEFT's warning about the layers without a prefix of their own is repeated, and its error when no layer has one.
    """
    if layout is None or layout.uniform_prefixes:
        return container((layer, LayerPrefix(kv[2 * layer], kv[2 * layer + 1])) for layer in range(kv.shape[0] // 2))
    own, injected, skipped = {}, [], []
    for layer, ((heads, dim), source) in enumerate(zip(layout.layer_kv_shapes, layout.kv_sources)):
        if source != layer or heads > kv.shape[1] or dim > kv.shape[3]:
            skipped.append(layer)
            continue
        own[layer] = LayerPrefix(kv[2 * layer, :heads, :, :dim], kv[2 * layer + 1, :heads, :, :dim])
        injected.append(layer)
    if not injected:
        raise ValueError(
            "Prefix tuning skipped every layer because no layer's KV shape matched the provisioned prefix "
            f"(num_attention_heads={kv.shape[1]}, head_dim={kv.shape[3]}). Override `token_dim` and "
            "`num_attention_heads` in `PrefixTuningConfig` to match a layer that should receive the prefix.")
    if skipped:
        warnings.warn(f"Prefix tuning injected into layers {injected}; skipped {skipped} due to KV shape mismatch or "
                      "shared-KV layers.")
    return container((layer, own[source]) for layer, source in enumerate(layout.kv_sources) if source in own)


def prefix_layer_kv(model, layout=None) -> dict:
    """Per-layer prefix K/V `[Hkv, P, D]` (views of `prefix_kv(model)`), keyed by layer index; `layout`: the base
    model's (transformers_attention.model_layout), for models whose layers differ in shape."""
    return layer_prefixes_from_kv(prefix_kv(model), layout=layout)


def check_mpt_task_ids(task_ids, batch_size: int, device=None) -> torch.Tensor:
    """MPT's task ids as a 1D LongTensor: one per row, or one for the whole batch (PEFT broadcasts it)."""
    if task_ids is None:
        raise ValueError("task_ids cannot be None")
    task_ids = torch.as_tensor(task_ids, device=device).reshape(-1)
    if task_ids.shape[0] not in (1, batch_size):
        raise ValueError(f"task_ids must hold one task id per row ({batch_size}) or one for the whole batch, "
                         f"got {task_ids.shape[0]}")
    return task_ids
