"""Prompt hoisting against the real PEFT path on a Llama-like model: a prompt-tuning training step, and greedy
generation.

- train step: unpatched PEFT prompt tuning (P virtual tokens run through the model once per row) vs the same PEFT
  model after `fastprompt.patch_model` (hoisted: the virtual tokens run once, the rows read their K/V as a shared
  prefix). Loss and the prompt gradient must agree.
- generate: on transformers <= 5.23 the baseline is PEFT's own generate(). From 5.24 on PEFT's prompt-tuning
  generate() is wrong (it re-inserts the virtual tokens at every decoding step), so the baseline is what it does
  where it is right: transformers' generate() on the unpatched base model fed the [prompt; text] embeddings (its
  cache holds P + S entries per row); the row is labelled so. Tokens must agree. `peft_cached_greedy` (the same
  with the cache written by hand) measures the cache bytes.

`predicted_ratios` gives the arithmetic each measured ratio is set against.
"""
from __future__ import annotations

import inspect

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from ..patching import patch_model
from .cases import Case, Side, peft_train_sides
from .models import ModelShape, build_peft, token_batch

__all__ = ["hoist_train_case", "hoist_generate_case", "hoisting_cases", "predicted_ratios", "cache_bytes",
           "peft_cached_greedy"]

BASELINE_GENERATE = "PEFT semantics via base generate (PEFT's own generate wrong on transformers>=5.24)"


def predicted_ratios(shape: ModelShape, batch: int, seq: int, plen: int, new: int = 0) -> dict:
    """Hoisted / PEFT, from counting tokens: the dense layers and the LM head scale with the tokens run, the
    attention (as counted, full Lq x Lk for SDPA) with query x key pairs.

    train:  tokens (B·S + P) / (B·(P + S)); attention pairs (B·S·(P + S) + P²) / (B·(P + S)²)
    prefill: the same token ratio; generate (dense): (P + B·S + B·(new - 1)) / (B·(P + S) + B·(new - 1));
    cache: (S + new - 1) / (P + S + new - 1) (the last token is never cached).

    Generation TIME does not follow the FLOPs where decoding steps are overhead-bound (a CPU at the default shape):
    each of the new - 1 steps runs B tokens through the same layers on both sides (only the attention differs: the
    shared prompt K/V plus the cached real tokens vs P + S + t cached keys per row), so
    time ≈ (prompt pass + prefill(B·S) + (new - 1)·step) / (prefill(B·(P + S)) + (new - 1)·step).
    """
    h, inter, layers, vocab = shape.hidden, shape.intermediate, shape.layers, shape.vocab
    kv = h * shape.kv_heads // shape.heads
    dense_per_token = 2 * layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + 2 * h * vocab
    attn_per_pair = 4 * layers * h  # QK^T and PV, every query head
    tokens_peft, tokens_hoist = batch * (plen + seq), batch * seq + plen
    pairs_peft = batch * (plen + seq) ** 2
    pairs_hoist = batch * seq * (plen + seq) + plen * plen
    fwd_peft = dense_per_token * tokens_peft + attn_per_pair * pairs_peft
    fwd_hoist = dense_per_token * tokens_hoist + attn_per_pair * pairs_hoist
    out = {"tokens": tokens_hoist / tokens_peft, "attention_pairs": pairs_hoist / pairs_peft,
           "train_flops": fwd_hoist / fwd_peft}  # backward (input gradients only) scales like the forward
    if new:
        # prefill as above, then new - 1 decoding steps of B tokens each on both sides (dense part)
        out["generate_flops"] = (tokens_hoist + batch * (new - 1)) / (tokens_peft + batch * (new - 1))
        out["cache_bytes"] = (seq + new - 1) / (plen + seq + new - 1)
    return out


# ------------------------------------------------------------------------------------------------------------------
# training step


def hoist_train_case(shape: ModelShape, batch: int, seq: int, plen: int, reps: int = 3, tags=()) -> Case:
    def build(device):
        ids = token_batch(batch, seq, shape.vocab, device)
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        return peft_train_sides(shape, "prompt", plen, ids, mask, device)

    params = dict(model=shape.label(), B=batch, S=seq, P=plen)
    return Case("train step", "prompt tuning, hoisted", params, build, "peft", 2e-3, reps, tuple(tags))


# ------------------------------------------------------------------------------------------------------------------
# generation


def cache_bytes(cache) -> int:
    """Bytes of the K/V tensors a transformers cache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def peft_cached_greedy(model, ids, mask, new_tokens: int):
    """PEFT prompt tuning's generation, written out: [prompt; text] embeddings through the unpatched base model with
    a DynamicCache (P + S entries per row), then greedy one token per step at positions P + S + t (PEFT drops
    position ids); EOS is never chosen (min_new_tokens = max_new_tokens). Returns (tokens [B, S + new], cache)."""
    base = model.get_base_model()
    config = model.active_peft_config
    batch = ids.shape[0]
    prompts = model.get_prompt(batch_size=batch)
    embeds = torch.cat([prompts.to(base.dtype), model.word_embeddings(ids)], dim=1)
    full_mask = torch.cat([mask.new_ones(batch, config.num_virtual_tokens), mask], dim=1)
    cache = DynamicCache(config=base.config)
    # transformers 5.24 renamed the argument (the old name is a deprecated alias)
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    eos = base.generation_config.eos_token_id
    out = base(inputs_embeds=embeds, attention_mask=full_mask, use_cache=True, **{cache_arg: cache})
    tokens = ids
    for step in range(new_tokens):
        logits = out.logits[:, -1].clone()
        if eos is not None:
            logits[:, eos] = float("-inf")
        nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        if step == new_tokens - 1:
            break
        full_mask = torch.cat([full_mask, full_mask.new_ones(batch, 1)], dim=1)
        out = base(input_ids=nxt, attention_mask=full_mask, use_cache=True, **{cache_arg: cache})
    return tokens, cache


def peft_semantics_generate(model, ids, mask, **gen):
    """What PEFT's prompt-tuning generate() does where it is right (transformers <= 5.23): transformers' generate()
    on the unpatched base model fed the [prompt; text] embeddings, the mask extended with ones; the cache holds
    P + S + new - 1 entries per row. Positions come from the mask (arange for the unpadded batches used here, as
    PEFT's forward gives). Returns the new tokens [B, new]."""
    base = model.get_base_model()
    batch = ids.shape[0]
    num = model.active_peft_config.num_virtual_tokens
    embeds = torch.cat([model.get_prompt(batch_size=batch).to(base.dtype), model.word_embeddings(ids)], dim=1)
    full_mask = torch.cat([mask.new_ones(batch, num), mask], dim=1)
    return base.generate(inputs_embeds=embeds, attention_mask=full_mask, **gen)


def hoist_generate_case(shape: ModelShape, batch: int, seq: int, plen: int, new_tokens: int, reps: int = 3,
                        tags=()) -> Case:
    def build(device):
        ids = token_batch(batch, seq, shape.vocab, device, seed=1)
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        peft_model = build_peft(shape, "prompt", plen, device).eval()
        fp_model = build_peft(shape, "prompt", plen, device).eval()
        patch_model(fp_model)
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        def fp_step():
            with torch.no_grad():
                return fp_model.generate(input_ids=ids, attention_mask=mask, **gen)[:, seq:]

        if real_peft:
            def peft_step():
                with torch.no_grad():
                    return peft_model.generate(input_ids=ids, attention_mask=mask, **gen)[:, seq:]
        else:
            def peft_step():
                with torch.no_grad():
                    return peft_semantics_generate(peft_model, ids, mask, **gen)

        keep = list(peft_model.parameters()) + list(fp_model.parameters())
        return {"fastprompt": Side(fp_step, lambda: {"tokens": fp_step()}, keep),
                "baseline": Side(peft_step, lambda: {"tokens": peft_step()}, keep)}

    real_peft = peft_generate_is_right()
    params = dict(model=shape.label(), B=batch, S=seq, P=plen, new=new_tokens)
    return Case("generate", "prompt tuning, hoisted", params, build, "peft" if real_peft else BASELINE_GENERATE, 0.0,
                reps, tuple(tags))


def peft_generate_is_right() -> bool:
    """PEFT's prompt-tuning generate() re-inserts the virtual tokens at every step from transformers 5.24 on (it
    looks for the renamed `past_key_values` argument); before, it is the real baseline."""
    return Version(transformers.__version__) < Version("5.24")


def measured_cache_bytes(shape: ModelShape, batch: int, seq: int, plen: int, new_tokens: int,
                         device="cpu") -> dict:
    """Bytes the KV cache holds at the end of generation: hoisted generate() vs PEFT's P + S + new - 1 per row."""
    ids = token_batch(batch, seq, shape.vocab, device, seed=1)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    model = build_peft(shape, "prompt", plen, device).eval()
    with torch.no_grad():
        _, peft_cache = peft_cached_greedy(model, ids, mask, new_tokens)
        patch_model(model)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    hoisted = cache_bytes(out.past_key_values)
    peft = cache_bytes(peft_cache)
    return {"hoisted_bytes": hoisted, "peft_bytes": peft, "ratio": hoisted / peft}


# ------------------------------------------------------------------------------------------------------------------
# the suite's share


REFERENCE = ModelShape(layers=8, hidden=512, heads=8, kv_heads=2, intermediate=1024, vocab=1024)
SMOKE = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=128)


def hoisting_cases(mode: str = "default") -> list:
    """The hoisting rows of `fastprompt bench`: B=8, S=128, P=100 (generation: 32-token prompt, 32 new tokens);
    "full": the Llama-like reference shape and the sweep P in {20, 100, 200}."""
    if mode == "smoke":
        return [hoist_train_case(SMOKE, 2, 16, 6, reps=1), hoist_generate_case(SMOKE, 2, 8, 6, 3, reps=1)]
    shape = REFERENCE if mode == "full" else ModelShape(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512,
                                                        vocab=512)
    reps = 3 if mode == "full" else 2
    plens = (20, 100, 200) if mode == "full" else (100,)
    cases = [hoist_train_case(shape, 8, 128, p, reps=reps, tags=("hoist_sweep_prefix",)) for p in plens]
    cases += [hoist_generate_case(shape, 8, 32, p, 32, reps=reps, tags=("hoist_sweep_prefix",)) for p in plens]
    return cases
