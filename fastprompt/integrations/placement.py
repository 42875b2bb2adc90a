"""Input placement of a prompt: `[prompt; tokens]` as the model's input embeddings, and what moves with it (the
attention mask, labels, token types and positions; at decoding steps only the mask and positions move past the
prompt already in the cache). The technique fastprompt's own prompts use on decoder-only and encoder-decoder models
(prompt_attach, seq2seq_own_prompts)."""
from __future__ import annotations

import torch

from ..prompts.base import PromptModule

__all__ = ["batch_size", "model_device", "place_input_prompts"]


def batch_size(kw) -> int:
    for name in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        t = kw.get(name)
        if t is not None:
            return t.shape[0]
    raise ValueError("the patched model needs input_ids or inputs_embeds")


def model_device(model):
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    p = next(model.parameters(), None)
    return None if p is None else p.device


def place_input_prompts(model, prompt: PromptModule, kw, batch, prefill, query, task_ids,
                         encoder_side: bool = False) -> int:
    """encoder_side: an encoder-decoder model's encoder input; labels and the decoder are the target's, untouched."""
    num = prompt.num_input_tokens()
    mask = kw.get("attention_mask")
    if not prefill:
        # The prompt already sits in the cache: the real-token mask / positions just move past it.
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("input-level prompts need a 2D attention_mask")
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, num), mask], dim=1)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = kw["position_ids"] + num
        return num

    embeds = kw.get("inputs_embeds")
    if embeds is None:
        embeds = model.get_input_embeddings()(kw["input_ids"])
    prompts = prompt.input_prompts(batch, query=query, task_ids=task_ids).to(embeds.dtype)
    if prompts.dim() == 2:
        prompts = prompts.unsqueeze(0).expand(batch, -1, -1)  # shared prompt: a view, not B copies
    if prompts.shape[-1] != embeds.shape[-1]:  # e.g. a prompt built for another model's embedding width
        raise ValueError(f"{type(prompt).__name__} makes prompts {prompts.shape[-1]} wide, but this model's input "
                         f"embeddings are {embeds.shape[-1]} wide (embedding_size); build the prompt from this model")
    num = prompts.shape[1]
    length = embeds.shape[1]
    kw["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
    kw.pop("input_ids", None)
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError("input-level prompts need a 2D attention_mask [B, L]")
        kw["attention_mask"] = torch.cat([mask.new_ones(batch, num), mask], dim=1)
    if encoder_side:
        return num
    labels = kw.get("labels")
    if labels is not None and labels.dim() >= 2 and labels.shape[1] == length:
        kw["labels"] = torch.cat([labels.new_full((batch, num, *labels.shape[2:]), -100), labels], dim=1)
    token_types = kw.get("token_type_ids")
    if token_types is not None:
        kw["token_type_ids"] = torch.cat([token_types.new_zeros(batch, num), token_types], dim=1)
    positions = kw.get("position_ids")
    if positions is not None:
        if positions.dim() != 2:
            raise ValueError("input-level prompts take 2D position_ids [B, L] only")
        head = torch.arange(num, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], num)
        kw["position_ids"] = torch.cat([head, positions + num], dim=1)
    return num
