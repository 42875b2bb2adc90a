"""The families of fastprompt/integrations/families.py: patch_model = PEFT's semantics, each family's quirks right.

Oracles (tests/family_helpers.py) never run fastprompt code: PEFT's prefix as a P-long cache on the unpatched model,
or transformers' SDPA on an explicit [prefix; sequence] concatenation for the families without a cache argument.
"""
import copy

import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from family_helpers import (
    CACHELESS,
    GEMMA4,
    NEW_DECODERS,
    NEW_ENCODERS,
    NEW_FAMILIES,
    REFUSED_FAMILIES,
    assert_pair_parity,
    concat_prefix_attention,
    family_model,
    family_peft_pair,
    make_inputs,
    main_output,
    prefix_oracle_forward,
    requires_gemma4,
    task_targets,
)

import fastprompt as fp
import fastprompt.patching as fpp
from fastprompt.integrations.families import FAMILIES, REFUSED
from fastprompt.integrations.peft import SUPPORTED_MODEL_TYPES
from fastprompt.integrations.transformers_attention import model_layout

peft = pytest.importorskip("peft")

SECOND_DECODER_TASK = {"granite": "FEATURE_EXTRACTION"}  # transformers has no GraniteForSequenceClassification
PREFIX_CASES = [(f, t) for f in NEW_DECODERS for t in ("CAUSAL_LM", SECOND_DECODER_TASK.get(f, "SEQ_CLS"))] + \
               [(f, t) for f in NEW_ENCODERS for t in ("SEQ_CLS", "FEATURE_EXTRACTION")]
ENCODER_REFUSED = ("deberta-v2", "albert")
MAIN_TASK = {f: "CAUSAL_LM" if f in NEW_DECODERS + GEMMA4 else "SEQ_CLS" for f in NEW_FAMILIES + GEMMA4}


def _prefix_parity(family, task, padding="hole", method="prefix", window=None, concat=False, **kwargs):
    patched, oracle = family_peft_pair(family, method, task, window=window)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding=padding)
    targets = task_targets(task, ids, mask)
    assert_pair_parity(patched, lambda **kw: prefix_oracle_forward(oracle, family, concat=concat, **kw),
                       patched, oracle, task, ids, mask, targets, what=f"{family}/{task}/{method}/{padding}", **kwargs)
    return patched, oracle


@pytest.mark.parametrize("padding", ["left", "right", "hole"])
@pytest.mark.parametrize("family,task", PREFIX_CASES)
def test_prefix_tuning_parity(family, task, padding):
    _prefix_parity(family, task, padding)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_prefix_projection_parity(family):
    _prefix_parity(family, MAIN_TASK[family], method="prefix_proj")


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "gemma3_text", "xlm-roberta", "distilbert", "modernbert"])
def test_prefix_tuning_parity_user_position_ids(family):
    """PEFT shifts user position ids by P where its prefix is a cache; a cache-less family keeps them."""
    _, mask = make_inputs(padding="left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    if family in ("xlm-roberta",):  # RoBERTa numbers positions from padding_idx + 1
        position_ids = position_ids + 2
    _prefix_parity(family, MAIN_TASK[family], padding="left", position_ids=position_ids)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_prefix_changes_the_output(family):
    """Parity is not vacuous: the prefix moves every real token's output."""
    patched, _ = family_peft_pair(family, "prefix", "FEATURE_EXTRACTION")
    fpp.patch_model(patched)
    plain = family_model(family, "FEATURE_EXTRACTION")  # the same base weights (same seed), no adapter
    ids, mask = make_inputs(padding="left")
    with torch.no_grad():
        with_prefix = patched(input_ids=ids, attention_mask=mask).last_hidden_state
        without = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    moved = (with_prefix - without).abs().amax(dim=-1)
    assert bool((moved[mask.bool()] > 1e-4).all())


@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp", "ptuning_lstm", "mpt"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_input_level_parity(family, method):
    task = MAIN_TASK[family]
    patched, oracle = family_peft_pair(family, method, task)
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="hole")
    kwargs = {"task_ids": torch.tensor([2, 0, 1])} if method == "mpt" else {}
    assert_pair_parity(patched, oracle, patched, oracle, task, ids, mask, task_targets(task, ids, mask),
                       what=f"{family}/{task}/{method}", **kwargs)


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "mixtral", "modernbert"])
def test_sliding_window_layers(family):
    """Local layers with a window shorter than P + S: the sequence is windowed exactly as the family does it, the
    prefix stays visible (fastprompt's documented semantics; PEFT's cache prefix would slide out of view)."""
    patched, oracle = _prefix_parity(family, MAIN_TASK[family], padding="left", window=3, concat=True)
    layout = model_layout(patched)
    assert "sliding_attention" in layout.layer_types and layout.sliding_window == 3


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_routing_untouched(family):
    """The router of every MoE layer sees the same hidden states, so it picks the same experts with the same
    weights as in the unpatched PEFT model."""
    patched, oracle = family_peft_pair(family, "prefix", "CAUSAL_LM")
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="hole")
    routes = {"patched": [], "oracle": []}

    def record(name):
        return lambda module, args, output: routes[name].append(output[0] if isinstance(output, tuple) else output)

    def gates(model):
        return [m for n, m in model.named_modules() if n.endswith("mlp.gate")]

    handles = [g.register_forward_hook(record("patched")) for g in gates(patched)]
    handles += [g.register_forward_hook(record("oracle")) for g in gates(oracle)]
    with torch.no_grad():
        patched(input_ids=ids, attention_mask=mask)
        prefix_oracle_forward(oracle, family, ids, mask)
    for h in handles:
        h.remove()
    assert len(routes["patched"]) == len(routes["oracle"]) == 2
    for got, want in zip(routes["patched"], routes["oracle"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


EXPECTED_LAYOUT = {  # is_causal, position_style, rotary, shifts_positions, layer_types, sliding_window
    "opt": (True, "mask_cumsum", False, True, ("full_attention",) * 2, None),
    "gpt_neox": (True, "offset", True, True, ("full_attention",) * 2, None),
    "gptj": (True, "offset", True, True, ("full_attention",) * 2, None),
    "phi3": (True, "offset", True, True, ("full_attention",) * 2, None),
    "mixtral": (True, "offset", True, True, ("full_attention",) * 2, None),
    "gemma3_text": (True, "offset", True, True, ("sliding_attention", "full_attention"), 64),
    "distilbert": (False, "offset", False, False, ("full_attention",) * 2, None),
    "xlm-roberta": (False, "roberta", False, True, ("full_attention",) * 2, None),
    "electra": (False, "offset", False, True, ("full_attention",) * 2, None),
    "modernbert": (False, "offset", True, False, ("full_attention", "sliding_attention"), 2),
    "qwen2_moe": (True, "offset", True, True, ("full_attention",) * 2, None),
    "olmo2": (True, "offset", True, True, ("full_attention",) * 2, None),
    "granite": (True, "offset", True, True, ("full_attention",) * 2, None),
    "phi": (True, "offset", True, True, ("full_attention",) * 2, None),
}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_layout(family):
    layout = model_layout(family_model(family, "FEATURE_EXTRACTION"))
    got = (layout.is_causal, layout.position_style, layout.rotary, layout.shifts_positions, layout.layer_types,
           layout.sliding_window)
    assert got == EXPECTED_LAYOUT[family]
    assert layout.num_layers == 2 and layout.hidden_size == 32
    assert family in SUPPORTED_MODEL_TYPES and family in FAMILIES


def test_embedding_scale_facts():
    assert FAMILIES["gemma3_text"].embedding_scale == "embedding"  # Gemma3TextScaledWordEmbedding
    assert FAMILIES["gemma"].embedding_scale == FAMILIES["gemma2"].embedding_scale == "forward"
    assert FAMILIES["llama"].embedding_scale is None


@pytest.mark.parametrize("family", REFUSED_FAMILIES)
def test_refused_families_prefix_tuning(family):
    task = "SEQ_CLS" if family in ENCODER_REFUSED else "CAUSAL_LM"
    model, _ = family_peft_pair(family, "prefix", task, attn="eager")
    with pytest.raises(TypeError, match="cannot patch prefix tuning") as err:
        fpp.patch_model(model)
    assert REFUSED[family] in str(err.value)
    assert "forward" not in model.__dict__  # nothing was patched


@pytest.mark.parametrize("family", REFUSED_FAMILIES)
def test_refused_families_take_input_level_prompts(family):
    task = "SEQ_CLS" if family in ENCODER_REFUSED else "CAUSAL_LM"
    patched, oracle = family_peft_pair(family, "ptuning_mlp", task, attn="eager")
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="right")
    assert_pair_parity(patched, oracle, patched, oracle, task, ids, mask, task_targets(task, ids, mask),
                       what=f"{family}/{task}/ptuning_mlp")


# ----------------------------------------------------------------------------------------------------------------
# fastprompt's own prompts


def _own_prompt(kind, model):
    if kind == "prefix":
        return fp.PrefixTuning(model, num_virtual_tokens=3)
    if kind == "ptuning_v2":
        return fp.PTuningV2(model, num_virtual_tokens=3, prefix_dropout=0.0)
    if kind == "prompt":
        return fp.PromptTuning(model, num_virtual_tokens=3, init="vocab")
    raise KeyError(kind)


def _own_oracle(twin, prompt, ids, mask, targets):
    """The same prompt written out: explicit [prefix; sequence] attention (real tokens keep their positions), or
    the prompt embeddings concatenated before the token embeddings."""
    batch = ids.shape[0]
    if prompt.placement == "prefix":
        prefixes = prompt.layer_prefixes(batch)
        kv = [(prefixes[i].key.expand(batch, -1, -1, -1), prefixes[i].value.expand(batch, -1, -1, -1))
              for i in range(len(prefixes))]
        with concat_prefix_attention(twin, kv):
            return twin(input_ids=ids, attention_mask=mask, **targets)
    rows = prompt.input_prompts(batch)
    rows = rows.expand(batch, -1, -1) if rows.dim() == 2 else rows
    P = rows.shape[1]
    embeds = torch.cat([rows, twin.get_input_embeddings()(ids)], dim=1)
    full = torch.cat([torch.ones(batch, P, dtype=mask.dtype), mask], dim=1)
    if "labels" in targets and targets["labels"].dim() == 2:
        targets = dict(targets, labels=torch.cat([torch.full((batch, P), -100), targets["labels"]], dim=1))
    return twin(inputs_embeds=embeds, attention_mask=full, **targets)


@pytest.mark.parametrize("kind", ["prefix", "ptuning_v2", "prompt"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_own_prompts(family, kind):
    task = MAIN_TASK[family]
    model = family_model(family, task)
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    prompt = _own_prompt(kind, model).eval()
    fp.patch_model(model, prompt)
    ids, mask = make_inputs(padding="hole")
    targets = task_targets(task, ids, mask)
    assert_pair_parity(model, lambda **kw: _own_oracle(twin, prompt, kw.pop("input_ids"), kw.pop("attention_mask"),
                                                       kw), model, prompt, task, ids, mask, targets,
                       what=f"{family}/{kind}")


@pytest.mark.parametrize("family", ["opt", "gpt_neox", "gemma3_text"])
def test_prefix_tuning_greedy_generation(family):
    """Patched generate() = a no-cache greedy loop over PEFT's prefix semantics (left padding: OPT's positions come
    from the attention mask)."""
    _greedy_generation_parity(family)


def _greedy_generation_parity(family):
    patched, oracle = family_peft_pair(family, "prefix", "CAUSAL_LM")
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="left")
    new_tokens = 4
    with torch.no_grad():
        got = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=1)
        seq, seq_mask = ids, mask
        for _ in range(new_tokens):
            # generate's positions: padding-aware (left pads excluded), shifted by P as PEFT does
            position_ids = (seq_mask.cumsum(-1) - 1).clamp(min=0)
            logits = prefix_oracle_forward(oracle, family, seq, seq_mask, position_ids=position_ids).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], dim=1)
    got, want = got[:, ids.shape[1]:], seq[:, ids.shape[1]:]
    eos = 3
    for row_got, row_want in zip(got.tolist(), want.tolist()):  # generate pads a row after its end-of-sequence
        stop = row_want.index(eos) + 1 if eos in row_want else new_tokens
        assert row_got[:stop] == row_want[:stop]


# ----------------------------------------------------------------------------------------------------------------
# Gemma 4: per-layer attention shapes, KV-shared layers, per-layer input embeddings, a multimodal wrapper


GEMMA4_PREFIX_CASES = [("gemma4_text", "CAUSAL_LM"), ("gemma4_text", "FEATURE_EXTRACTION"), ("gemma4", "CAUSAL_LM")]


@requires_gemma4
@pytest.mark.filterwarnings("ignore:Prefix tuning injected")  # PEFT's (and the patched model's) note on shared layers
@pytest.mark.parametrize("padding", ["left", "right", "hole"])
@pytest.mark.parametrize("family,task", GEMMA4_PREFIX_CASES)
def test_gemma4_prefix_tuning_parity(family, task, padding):
    """PEFT sizes the prefix for the widest (global) layers and gives the local ones its leading dims; the KV-shared
    layers attend with the prefix their source layer's cache entry got. The wrapper (per-layer inputs) too."""
    _prefix_parity(family, task, padding)


@requires_gemma4
@pytest.mark.filterwarnings("ignore:Prefix tuning injected")
@pytest.mark.parametrize("family", GEMMA4)
def test_gemma4_prefix_projection_and_user_positions(family):
    _prefix_parity(family, "CAUSAL_LM", method="prefix_proj")
    _, mask = make_inputs(padding="left")
    _prefix_parity(family, "CAUSAL_LM", padding="left", position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


@requires_gemma4
def test_gemma4_peft_warning_and_error_on_skipped_layers():
    """PEFT's notes on the layers without a prefix of their own: the same warning (the KV-shared layers), and its
    error when no layer fits the prefix (PEFT's test: num_key_value_heads set past the prefix's heads)."""
    patched, oracle = family_peft_pair("gemma4_text", "prefix", "CAUSAL_LM")
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="left")
    notes = []
    for call in (lambda: patched(input_ids=ids, attention_mask=mask),
                 lambda: prefix_oracle_forward(oracle, "gemma4_text", ids, mask)):
        with pytest.warns(UserWarning, match=r"injected into layers \[0, 1\]; skipped \[2, 3\]") as record:
            call()
        notes.append({str(w.message) for w in record if "Prefix tuning" in str(w.message)})
    assert notes[0] == notes[1]
    patched, oracle = family_peft_pair("gemma4_text", "prefix", "CAUSAL_LM")
    for model in (patched, oracle):
        model.get_base_model().config.num_key_value_heads = 999
    fpp.patch_model(patched)
    for call in (lambda: patched(input_ids=ids, attention_mask=mask),
                 lambda: prefix_oracle_forward(oracle, "gemma4_text", ids, mask)):
        with pytest.raises(ValueError, match="skipped every layer"):
            call()


@requires_gemma4
@pytest.mark.filterwarnings("ignore:Prefix tuning injected")
@pytest.mark.parametrize("family", GEMMA4)
def test_gemma4_prefix_tuning_greedy_generation(family):
    """generate() slices the queries before the KV-shared layers (logits_to_keep); the prefill and decode steps
    equal a no-cache greedy loop over PEFT's prefix semantics."""
    _greedy_generation_parity(family)


@requires_gemma4
@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp", "ptuning_lstm", "mpt"])
def test_gemma4_input_level_parity(method):
    patched, oracle = family_peft_pair("gemma4_text", method, "CAUSAL_LM")
    fpp.patch_model(patched)
    ids, mask = make_inputs(padding="hole")
    kwargs = {"task_ids": torch.tensor([2, 0, 1])} if method == "mpt" else {}
    assert_pair_parity(patched, oracle, patched, oracle, "CAUSAL_LM", ids, mask, task_targets("CAUSAL_LM", ids, mask),
                       what=f"gemma4_text/{method}", **kwargs)


@requires_gemma4
def test_gemma4_per_layer_inputs_refuse_input_level_prompts():
    """With per-layer input embeddings the model recovers token ids from inputs_embeds by a vocabulary lookup, which
    virtual tokens fail: PEFT's own forward raises; patch_model and attach refuse up front and say why."""
    patched, oracle = family_peft_pair("gemma4", "prompt", "CAUSAL_LM")
    ids, mask = make_inputs(padding="none")
    with pytest.raises(RuntimeError, match="inputs_embeds"):
        oracle(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="per-layer input embeddings"):
        fpp.patch_model(patched)
    model = family_model("gemma4", "CAUSAL_LM")
    with pytest.raises(ValueError, match="per-layer input embeddings"):
        fp.patch_model(model, fp.PromptTuning(model, num_virtual_tokens=3, init="vocab"))
    assert "forward" not in model.__dict__ and "forward" not in patched.__dict__


@requires_gemma4
def test_gemma4_own_prompts():
    """fastprompt's own input-level prompts run on Gemma 4 (no per-layer inputs); its prefix prompts, one shape for
    every layer, are refused where the layers differ."""
    test_own_prompts("gemma4_text", "prompt")
    for kind in ("prefix", "ptuning_v2"):
        model = family_model("gemma4_text", "CAUSAL_LM")
        with pytest.raises(ValueError, match="layers of .* differ"):
            fp.patch_model(model, _own_prompt(kind, model))


@requires_gemma4
@pytest.mark.parametrize("family", GEMMA4)
def test_gemma4_layout(family):
    layout = model_layout(family_model(family, "CAUSAL_LM"))
    assert layout.model_type == "gemma4_text" and layout.num_layers == 4 and layout.is_causal
    assert layout.layer_kv_shapes == ((2, 8), (2, 16), (2, 8), (2, 16)) and (layout.num_kv_heads, layout.head_dim) == (
        2, 16)
    assert layout.kv_sources == (0, 1, 0, 1) and not layout.uniform_prefixes
    assert layout.per_layer_inputs == (family == "gemma4")
    assert layout.layers_path.endswith("language_model.layers" if family == "gemma4" else "model.layers")
    assert "gemma4_text" in FAMILIES and family in SUPPORTED_MODEL_TYPES


@requires_gemma4
def test_gemma4_sliding_window_layers():
    """A local window shorter than P + S on Gemma 4's local layers (head_dim 8, the global ones 16; KV-shared layers):
    the sequence windowed as the family does it, the prefix always visible (the documented semantics)."""
    patched, oracle = _prefix_parity("gemma4_text", "CAUSAL_LM", padding="left", window=3, concat=True)
    assert model_layout(patched).sliding_window == 3


@requires_gemma4
def test_gemma4_bidirectional_attention_refused():
    """use_bidirectional_attention="all": transformers' own attention paths disagree on the window bound, so
    fastprompt's attention refuses it (input-level prompts, which leave the attention alone, still run)."""
    patched, oracle = family_peft_pair("gemma4_text", "prefix", "FEATURE_EXTRACTION")
    config = patched.get_base_model().config
    config.use_bidirectional_attention = "all"
    with pytest.raises(ValueError, match="use_bidirectional_attention='all'.*window"):
        fpp.patch_model(patched)
    assert "forward" not in patched.__dict__ and config._attn_implementation == "sdpa"
