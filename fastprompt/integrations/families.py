"""The model families fastprompt patches, one declarative entry each.

A family entry says what prompt learning needs to know about a transformers architecture and cannot read from its
config: whether attention is causal, how real tokens get their positions and whether PEFT's prefix (a P-long cache)
shifts them, whether positions are rotary or learned, where the embedding is scaled, which config fields carry
local/global layer types, windows and soft-capping, and the quirks checked by the family's parity tests
(tests/test_families_parity.py). `model_layout` (transformers_attention) and `patch_model`'s support check (peft)
read this table; nothing else holds per-family facts.

Adding a family: one `FamilyFacts` entry in FAMILIES (keyed by `config.model_type`), a tiny config in
tests/family_helpers.py, and the parity tests parametrized over it. A family whose attention cannot take a prefix
exactly goes to REFUSED with the reason, which `patch_model` repeats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..prompts.base import TIMM_VIT_MODEL_TYPE

__all__ = ["FamilyFacts", "FAMILIES", "REFUSED", "WRAPPERS", "family_facts", "pixel_model_types", "refusal_reason",
           "supported_model_types", "text_family"]

# How real tokens get position ids when the caller passes none:
OFFSET = "offset"            # arange(past_length, past_length + S)
ROBERTA = "roberta"          # from input_ids: cumsum over non-padding tokens, offset by padding_idx (+ past length)
MASK_CUMSUM = "mask_cumsum"  # from the attention mask: cumsum(mask) - 1 over [cache; seq], padding at -1 (OPT)


@dataclass(frozen=True)
class FamilyFacts:
    """Prompt-learning facts of one transformers architecture (transformers 5.24)."""

    encoder: bool                       # bidirectional self-attention (False: causal decoder)
    position_style: str = OFFSET        # OFFSET | ROBERTA | MASK_CUMSUM (see above)
    rotary: bool = True                 # positions enter through RoPE on q/k (else learned absolute embeddings)
    # PEFT hands the prefix to the model as a P-long cache, so the model numbers real tokens from P. A model whose
    # forward takes no cache (DistilBERT, ModernBERT) has no such shift: its real tokens keep positions 0..S-1.
    shifts_positions: bool = True
    # Where sqrt(hidden) scales token embeddings: "embedding" (inside the embedding module: PEFT's
    # word_embeddings(ids) is scaled, virtual tokens are not), "forward" (the model scales inputs_embeds, virtual
    # tokens included), or None.
    embedding_scale: Optional[str] = None
    all_layers_sliding: bool = False    # config.sliding_window (when set) applies to every layer (no layer_types)
    layer_types_field: Optional[str] = "layer_types"  # config field with per-layer "full"/"sliding" attention
    softcap_field: Optional[str] = "attn_logit_softcapping"
    layer_names: tuple = ("layers", "layer", "h")  # leaf name of the ModuleList holding the transformer layers
    # config field with the number of trailing layers that attend with an earlier layer's K/V (KV sharing: PEFT's
    # prefix reaches them through that layer's cache entry, so they read its prefix)
    kv_shared_layers_field: Optional[str] = None
    # config field with the width of per-layer input embeddings (a second embedding looked up from the token ids,
    # recovered from inputs_embeds by a vocabulary lookup that virtual tokens cannot pass: input-level prompts refused)
    per_layer_input_field: Optional[str] = None
    # (config field, value, why): configurations whose attention fastprompt's cannot reproduce (refused when the
    # model is switched to it: prefix tuning, fastprompt's prefix prompts, hoisting)
    refused_configs: tuple = ()
    quirks: tuple = ()                  # what the family's parity tests pin down, for readers
    # Vision Transformers (fastprompt.integrations.vision): "pixels" = the model takes pixel_values, not token ids;
    # leading_tokens = the learned tokens before the patches ([CLS], DeiT's distillation token) that input-level
    # prompts go after (-1: per instance, read by the adapter).
    inputs: str = "tokens"
    leading_tokens: int = 0
    # where a pixel model's [CLS] pre-logits (the pool query) are: "first_token" = last_hidden_state[:, 0] (the final
    # norm is inside the model), "pooler_output" (CLIP: post_layernorm of [CLS]; SigLIP: its attention-pooling head),
    # "forward_head" (timm: forward_head(features, pre_logits=True))
    pre_logits: str = "first_token"


_DECODER = dict(encoder=False)

FAMILIES: dict[str, FamilyFacts] = {
    # rotary decoders: real tokens at P.. (PEFT's cache), prefix keys never rotated
    "llama": FamilyFacts(**_DECODER),
    "mistral": FamilyFacts(**_DECODER, all_layers_sliding=True),
    "mixtral": FamilyFacts(**_DECODER, all_layers_sliding=True,
                           quirks=("MoE: the router sees the same hidden states; routing is untouched",)),
    "qwen2": FamilyFacts(**_DECODER),
    "qwen3": FamilyFacts(**_DECODER),
    "phi3": FamilyFacts(**_DECODER, all_layers_sliding=True, quirks=("fused qkv projection",)),
    "qwen2_moe": FamilyFacts(**_DECODER, quirks=("MoE with a shared expert: routing is untouched",)),
    "olmo2": FamilyFacts(**_DECODER, quirks=("q/k norms over all heads",)),
    "granite": FamilyFacts(**_DECODER, embedding_scale="forward",
                           quirks=("embedding_multiplier scales inputs_embeds (virtual tokens included)",
                                   "attention_multiplier is the score scale")),
    "phi": FamilyFacts(**_DECODER, quirks=("partial rotary", "optional q/k layer norms")),
    "gpt_neox": FamilyFacts(**_DECODER, quirks=("partial rotary (rotary_pct)", "fused qkv projection")),
    "gptj": FamilyFacts(**_DECODER, quirks=("partial interleaved rotary (rotary_dim)",)),
    "gemma": FamilyFacts(**_DECODER, embedding_scale="forward"),
    "gemma2": FamilyFacts(**_DECODER, embedding_scale="forward",
                          quirks=("local/global layers", "attention logit soft-capping")),
    "gemma3_text": FamilyFacts(**_DECODER, embedding_scale="embedding",
                               quirks=("local/global layers with their own RoPE bases", "q/k norms",
                                       "query_pre_attn_scalar scaling")),
    "gemma4_text": FamilyFacts(**_DECODER, embedding_scale="embedding",
                               kv_shared_layers_field="num_kv_shared_layers",
                               per_layer_input_field="hidden_size_per_layer_input",
                               refused_configs=(("use_bidirectional_attention", "all",
                                                 "transformers' Gemma 4 bounds its bidirectional sliding window one "
                                                 "position differently in its SDPA/eager masks (|i - j| <= w) and in "
                                                 "flash attention (|i - j| < w), so no single semantics exists to "
                                                 "reproduce"),),
                               quirks=("local/global layers with their own RoPE, head_dim and KV heads per layer "
                                       "(config.per_layer_config): PEFT sizes its prefix for the widest layer and "
                                       "gives each layer its leading heads and dims, skipping wider layers",
                                       "KV-shared trailing layers read the prefix of the layer whose K/V they share",
                                       "q/k/v norms, unit score scale", "final logit soft-capping",
                                       "per-layer input embeddings (PLE): prefix tuning only")),
    # learned absolute positions
    "gpt2": FamilyFacts(**_DECODER, rotary=False),
    "opt": FamilyFacts(**_DECODER, rotary=False, position_style=MASK_CUMSUM,
                       quirks=("positions from the attention mask (padding-aware), embedding offset 2",)),
    # encoders
    "bert": FamilyFacts(encoder=True, rotary=False),
    "electra": FamilyFacts(encoder=True, rotary=False,
                           quirks=("input-level prompts live in embedding_size space: prepended to the word "
                                   "embeddings, before embeddings_project lifts them to hidden_size",)),
    "roberta": FamilyFacts(encoder=True, rotary=False, position_style=ROBERTA),
    "xlm-roberta": FamilyFacts(encoder=True, rotary=False, position_style=ROBERTA),
    "camembert": FamilyFacts(encoder=True, rotary=False, position_style=ROBERTA),
    "distilbert": FamilyFacts(encoder=True, rotary=False, shifts_positions=False,
                              quirks=("no cache argument: positions never shift",)),
    "modernbert": FamilyFacts(encoder=True, shifts_positions=False,
                              quirks=("no cache argument: positions never shift",
                                      "local (bidirectional sliding window) / global layers, own RoPE bases")),
    # Vision Transformers: bidirectional, learned absolute positions added inside the embeddings module (prompts
    # enter after it, so they get no position), no cache. Input-level prompts go after the leading tokens.
    "vit": FamilyFacts(encoder=True, rotary=False, shifts_positions=False, inputs="pixels", leading_tokens=1),
    "deit": FamilyFacts(encoder=True, rotary=False, shifts_positions=False, inputs="pixels", leading_tokens=2,
                        quirks=("[CLS] and distillation token lead; the prompts follow both",)),
    "dinov2": FamilyFacts(encoder=True, rotary=False, shifts_positions=False, inputs="pixels", leading_tokens=1,
                          quirks=("layer scale", "the classification head averages every token after [CLS], "
                                  "input-level prompts included")),
    "clip_vision_model": FamilyFacts(encoder=True, rotary=False, shifts_positions=False, inputs="pixels",
                                     leading_tokens=1, pre_logits="pooler_output",
                                     quirks=("pre_layrnorm follows the embeddings: input-level prompts pass it",
                                             "the [CLS] pre-logits are post_layernorm([CLS]), the pooler output")),
    "siglip_vision_model": FamilyFacts(encoder=True, rotary=False, shifts_positions=False, inputs="pixels",
                                       leading_tokens=0, pre_logits="pooler_output",
                                       quirks=("no [CLS]: input-level prompts go first",
                                               "the query is the attention-pooling head's output (no [CLS])",
                                               "the pooling head attends to input-level prompts too")),
    # timm's VisionTransformer (no config; fastprompt.integrations.timm_vit is its adapter: the attention modules of
    # the instance patched, the pre-logits from forward_head). Keyed by the model_type the prompts record for it.
    TIMM_VIT_MODEL_TYPE: FamilyFacts(encoder=True, rotary=False, shifts_positions=False, inputs="pixels",
                                     leading_tokens=-1, pre_logits="forward_head",
                                     quirks=("no config: sizes from the instance (embed_dim, blocks, Attention)",
                                             "leading tokens per instance: num_prefix_tokens ([CLS], register "
                                             "tokens, DeiT's distillation token)",
                                             "input-level prompts enter norm_pre (after pos / patch dropout)",
                                             "qk_norm: sequence q/k normed, prefix keys taken as learned")),
}

# Multimodal wrappers whose text-only forward runs the text model of a family in FAMILIES unchanged (masks from the
# text config, positions from the cache length): model_type -> the text model's model_type.
WRAPPERS: dict[str, str] = {
    "gemma4": "gemma4_text",  # Gemma4ForConditionalGeneration (what AutoModelForCausalLM builds for Gemma 4 checkpoints)
}

_NO_INTERFACE = ("its attention does not go through transformers' AttentionInterface (transformers 5.24), so "
                 "fastprompt's fused prefix attention cannot be installed")

# Prefix tuning is refused for these; input-level methods (prompt tuning, P-tuning, multitask prompt tuning) only
# change the input embeddings and are accepted.
REFUSED: dict[str, str] = {
    "deberta-v2": (f"{_NO_INTERFACE}; its disentangled attention adds content-to-position and position-to-content "
                   "terms between every query and key, and a learned prefix key has no relative position, so no "
                   "exact prefix semantics exist to reproduce (PEFT itself cannot run prefix tuning on it)"),
    "deberta": (f"{_NO_INTERFACE}; its disentangled relative-position attention has no position for a prefix key "
                "(PEFT itself cannot run prefix tuning on it)"),
    "falcon": (f"{_NO_INTERFACE} (Falcon calls its own attention with ALiBi or RoPE and a fused query/key/value "
               "layout)"),
    "bloom": (f"{_NO_INTERFACE}; BLOOM adds ALiBi biases computed from the full [prefix; sequence] mask inside its "
              "own attention"),
    "gpt_neo": f"{_NO_INTERFACE} (GPT-Neo's local/global attention is its own code)",
    "albert": ("its layers share one attention module (cross-layer weight sharing), so a per-layer prefix cannot be "
               "told apart by the attention, and its forward takes no cache (PEFT cannot run prefix tuning on it)"),
}


def family_facts(model_type: str) -> Optional[FamilyFacts]:
    return FAMILIES.get(model_type)


def text_family(model_type: str) -> str:
    """The family whose facts apply: a wrapper's text model's, else `model_type` itself."""
    return WRAPPERS.get(model_type, model_type)


def refusal_reason(model_type: str) -> Optional[str]:
    return REFUSED.get(model_type)


def supported_model_types() -> tuple:
    """The families PEFT's prompt learning is accepted on: those taking token ids (PEFT's prompt-learning models
    need input_ids / inputs_embeds; pixel models take fastprompt's own prompts, fastprompt.integrations.vision),
    and the wrappers around a text family."""
    return tuple(name for name, facts in FAMILIES.items() if facts.inputs == "tokens") + tuple(WRAPPERS)


def pixel_model_types() -> tuple:
    """The Vision Transformer families (pixel_values in) that fastprompt's own prompts attach to."""
    return tuple(name for name, facts in FAMILIES.items() if facts.inputs == "pixels")
