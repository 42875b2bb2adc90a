"""Integrations with Hugging Face transformers (attention + mask registration, prefix plumbing) and PEFT.

The modules sit in one-way layers: a module imports from its own layer and the layers below, never from above, and
never a private (underscore) name of another module; no import hides inside a function except an optional
dependency's (peft), marked `# optional dependency`. tests/test_import_layers.py checks all of it over the whole
package, function-level imports included. Below the integrations: fastprompt.ops (the op, its backends) and
fastprompt.prompts (fastprompt's own prompt modules, LayerPrefix), which never import the integrations.

1. Model adapters: how a transformers model takes prefixes, whatever placed them.
   - transformers_attention: the one attention integration of every model kind: the attention and mask functions
     (registered as "fastprompt" and, for encoder-decoder models, "fastprompt_seq2seq"), the per-instance switch
     (enable / disable, counted users, the last disable restores), layer discovery and ModelLayout, the role of
     each attention module recorded on it as data (AttentionSlot), the per-call binding of prefixes.
   - seq2seq_attention: encoder-decoder facts it consults (T5 / BART: which module is encoder, decoder self- or
     cross-attention, T5's relative position bias for the prefix, BART's shifted positions) and their checks.
   - timm_vit: timm's VisionTransformer (no attention interface): its Attention modules patched per instance onto
     the same op and the same per-call prefix binding; where its input prompts go and where its query comes from.
   - families: the per-family facts table. call_context: state bound to one call (AttentionCall). cache_compat,
     generate_args, prompt_cache: transformers' cache and generate() conventions, and what a cache holds of a
     prompt.
     patched_method: methods bound to one instance and the one record of what a patch replaced (ReplacedMethods).
     peft_config: PEFT enum values. prompt_tasks: per-token task outputs with prompt tokens removed.
2. Techniques: what prompt learning does on top of an adapter, for either front end.
   - placement: input placement ([prompt; tokens] and what moves with it).
   - query_pass: the query of query-selected prompts (the frozen model's encoding), the query_layer pass and the
     reuse of its lower layers.
   - prompt_hoisting: input-level prompts run once per step as a K/V pass (causal LMs).
   - peft_prompts: PEFT's adapters read once per call (prefix K/V, multitask task ids).
   - vision: Vision Transformers (pixel_values in; timm: x): input prompts after the leading tokens, the [CLS] query.
3. Front ends: what patch_model drives.
   - peft (PEFT models, decoder-only and encoder-only) and seq2seq (PEFT prefix tuning on SEQ_2_SEQ_LM).
   - prompt_attach (fastprompt's own prompts on any model), with attach_state (what attaching records),
     own_prompt_generate and seq2seq_own_prompts (their generate()).
Above them: fastprompt.patching (patch_model / unpatch_model), fastprompt.cli and fastprompt.bench.
"""
from .transformers_attention import (  # noqa: F401
    ATTENTION_NAME,
    LayerPrefix,
    ModelLayout,
    disable_fastprompt_attention,
    enable_fastprompt_attention,
    layer_prefixes,
    model_layout,
)

__all__ = [
    "ATTENTION_NAME",
    "LayerPrefix",
    "ModelLayout",
    "enable_fastprompt_attention",
    "disable_fastprompt_attention",
    "layer_prefixes",
    "model_layout",
]
