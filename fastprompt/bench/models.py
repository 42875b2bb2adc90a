"""Model builders for the end-to-end comparisons: a Llama-like config, PEFT prompt-learning models (plain and
patched by fastprompt), fastprompt's prompt pool and its explicit (PEFT-way) formulation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ..integrations.cache_compat import cache_kwarg

__all__ = ["ModelShape", "llama_config", "build_base", "build_peft", "explicit_pool_forward", "token_batch"]


@dataclass(frozen=True)
class ModelShape:
    layers: int = 8
    hidden: int = 512
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 1024
    vocab: int = 1024

    def label(self) -> str:
        return f"L{self.layers} h{self.hidden} {self.heads}q/{self.kv_heads}kv"


def llama_config(shape: ModelShape):
    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, attention_dropout=0.0,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       attn_implementation="sdpa")


def build_base(shape: ModelShape, device="cpu", dtype=torch.float32, seed: int = 0):
    """A randomly initialized LlamaForCausalLM (same weights for the same seed), default (SDPA) attention."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape)).to(device=device, dtype=dtype)
    model.generation_config.pad_token_id = 0
    return model


def build_peft(shape: ModelShape, method: str, num_virtual_tokens: int, device="cpu", dtype=torch.float32,
               seed: int = 0, adapters: int = 1):
    """A PEFT prompt-learning model ("prefix" or "prompt") on a fresh base; `adapters` > 1 adds adapters
    task0..task{n-1} (prefix tuning), each with its own random prefix."""
    import peft  # optional dependency (the bench extra)

    base = build_base(shape, device, dtype, seed)
    if method == "prefix":
        def config():
            return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    elif method == "prompt":
        def config():
            return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    else:
        raise ValueError(f"unknown PEFT method {method!r}")
    torch.manual_seed(seed + 1)
    model = peft.get_peft_model(base, config(), adapter_name="task0")
    for t in range(1, adapters):
        torch.manual_seed(seed + 1 + t)
        model.add_adapter(f"task{t}", config())
    # PEFT initializes the prefix embedding with N(0, 1) (or tiny values); make every adapter distinct and sized
    # like real K/V so outputs depend on the prefix.
    with torch.no_grad():
        for t in range(adapters):
            emb = model.prompt_encoder[f"task{t}"].embedding.weight
            emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed + 100 + t)).to(emb))
    model.set_adapter("task0")
    return model.to(device)


def token_batch(batch: int, seq: int, vocab: int, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)


def explicit_pool_forward(model, prompt, input_ids, query, labels=None):
    """A prefix-placement hard-selection PromptPool run the PEFT way on an unpatched model: each row's chosen
    entries gathered into per-row prefix K/V `[B, Hkv, k·length, D]` per layer, placed in a DynamicCache, the
    attention mask extended with ones, real tokens at positions 0..S-1 (fastprompt's prefix placement), the
    key-pull loss added like fastprompt does."""
    batch, seq = input_ids.shape
    index, chosen_sim = prompt.select(query)
    cache = DynamicCache(config=model.config)
    plen = None
    for i, layer in enumerate(prompt.layers):
        keys = prompt.pool[i, 0][index]  # [B, k, Hkv, length, D]
        values = prompt.pool[i, 1][index]
        b, k, hkv, length, dim = keys.shape
        plen = k * length
        cache.update(keys.permute(0, 2, 1, 3, 4).reshape(b, hkv, plen, dim),
                     values.permute(0, 2, 1, 3, 4).reshape(b, hkv, plen, dim), layer)
    mask = torch.ones(batch, plen + seq, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(seq, device=input_ids.device)[None].expand(batch, -1)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, labels=labels, use_cache=False,
                **{cache_kwarg(model.forward): cache})  # `cache` from transformers 5.24, `past_key_values` before
    loss = out.loss
    if loss is not None and prompt.config.add_aux_loss:
        loss = loss + (-prompt.config.pull_constraint_coeff * chosen_sim.mean()).to(loss.dtype)
    return out, loss
