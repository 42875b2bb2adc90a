"""The patch lifecycle, the same for every model kind and front end: patching twice is a no-op, unpatching is
idempotent and restores exactly what was recorded in any order (also where several patches stack on one model), and
an unpatched model is its never-patched twin again (same outputs, no fastprompt attribute or hook anywhere)."""
import copy
import functools

import pytest
import torch
import transformers

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from integration_helpers import assert_close, make_inputs, tiny_model, tiny_peft_pair

import fastprompt
from fastprompt.integrations.seq2seq import enable_seq2seq_attention
from fastprompt.integrations.transformers_attention import disable_fastprompt_attention, enable_fastprompt_attention
from fastprompt.prompts import PrefixTuning, PromptPool, PromptTuning

peft = pytest.importorskip("peft")
seq2seq_helpers = pytest.importorskip("seq2seq_helpers")

CASES = ["peft-decoder-prefix", "peft-decoder-prompt", "peft-t5-prefix", "peft-t5-prompt",
         "own-decoder-prefix", "own-decoder-prompt", "own-t5-prefix", "own-t5-prompt", "own-decoder-pool"]


def _own_prompt(kind, model):
    c = model.config
    if kind == "pool":  # the query pass (query_layer=1) replaces the forward of layers 0 and 1
        prompt = PromptPool(c, pool_size=4, length=2, top_k=2, placement="prefix", layers=[1], query_layer=1,
                            seed=0).eval()
    else:
        prompt = (PrefixTuning(c, num_virtual_tokens=3, encoder_hidden_size=16) if kind == "prefix"
                  else PromptTuning(c, num_virtual_tokens=3)).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in prompt.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return prompt


def _skip_without_seq2seq():
    """Encoder-decoder prompt learning is claimed from transformers 5.24 on; below, it is refused (the oldest lane
    runs 5.23)."""
    if not seq2seq_helpers._seq2seq_supported():
        pytest.skip(f"encoder-decoder prompt learning needs a newer transformers than {transformers.__version__}")


def _case(name):
    """(model to patch, its never-patched twin, what patch_model takes besides the model, is_seq2seq)"""
    front, kind, method = name.split("-")
    seq2seq = kind == "t5"
    if seq2seq:
        _skip_without_seq2seq()
    if front == "peft":
        if seq2seq:
            cls = peft.PrefixTuningConfig if method == "prefix" else peft.PromptTuningConfig
            model, twin = seq2seq_helpers.peft_seq2seq_pair("t5", cls(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
        else:
            model, twin = tiny_peft_pair("qwen2", method, "CAUSAL_LM")
        return model, twin, None, seq2seq
    model = seq2seq_helpers.tiny_seq2seq("t5") if seq2seq else tiny_model("llama", "CAUSAL_LM")
    twin = copy.deepcopy(model)
    return model, twin, _own_prompt(method, model), seq2seq


def _outputs(model, seq2seq):
    if seq2seq:
        ids, mask, labels, _ = seq2seq_helpers.seq2seq_inputs("t5")
        return model(input_ids=ids, attention_mask=mask, labels=labels).logits
    ids, mask = make_inputs(padding="left")
    return model(input_ids=ids, attention_mask=mask).logits


def _base(model):
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def _fastprompt_leftovers(model):
    """Every fastprompt attribute, instance value or hook left on the model or any of its submodules."""
    found = []
    for name, module in model.named_modules():
        for key, value in module.__dict__.items():
            if "fastprompt" in key or type(value).__module__.startswith("fastprompt"):
                found.append(f"{name or '<model>'}.{key}")
        for key in module._modules:
            if "fastprompt" in key:
                found.append(f"{name or '<model>'}._modules[{key}]")
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                if getattr(hook, "__module__", "").startswith("fastprompt"):
                    found.append(f"{name or '<model>'} hook {hook.__name__}")
    return found


def _snapshot(model):
    return ({name: sorted(m.__dict__) for name, m in model.named_modules()},
            sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
            _base(model).config._attn_implementation)


def _assert_never_patched(model, twin, seq2seq, attn_before):
    assert _fastprompt_leftovers(model) == []
    assert _base(model).config._attn_implementation == attn_before
    with torch.no_grad():
        assert_close(_outputs(model, seq2seq), _outputs(twin, seq2seq), rtol=0, atol=1e-6, what="unpatched vs twin")


def _patch(model, prompt):
    return fastprompt.patch_model(model) if prompt is None else fastprompt.patch_model(model, prompt)


@pytest.mark.parametrize("case", CASES)
def test_patch_twice_is_a_no_op_and_unpatch_twice_restores_once(case):
    model, twin, prompt, seq2seq = _case(case)
    attn_before = _base(model).config._attn_implementation
    assert _patch(model, prompt) is model
    with torch.no_grad():
        once = _outputs(model, seq2seq)
    snapshot = _snapshot(model)
    assert _patch(model, prompt) is model  # the same for every model kind: nothing nests, nothing raises
    assert _snapshot(model) == snapshot
    with torch.no_grad():
        assert torch.equal(_outputs(model, seq2seq), once)
    assert fastprompt.unpatch_model(model) is model
    _assert_never_patched(model, twin, seq2seq, attn_before)
    assert fastprompt.unpatch_model(model) is model  # idempotent
    _assert_never_patched(model, twin, seq2seq, attn_before)


@pytest.mark.parametrize("unpatch_first", [True, False], ids=["unpatch-then-disable", "disable-then-unpatch"])
@pytest.mark.parametrize("case", CASES)
def test_stacked_patches_unpatch_in_either_order(case, unpatch_first):
    """A patched model whose attention is also enabled by hand: either undo first, the model keeps what the other
    one still needs; after both it is its never-patched twin."""
    model, twin, prompt, seq2seq = _case(case)
    attn_before = _base(model).config._attn_implementation
    _patch(model, prompt)
    with torch.no_grad():
        patched = _outputs(model, seq2seq)
    enable = enable_seq2seq_attention if seq2seq else enable_fastprompt_attention
    token = enable(_base(model))
    if unpatch_first:
        fastprompt.unpatch_model(model)
        # the hand-enabled attention stays on, with no prefix: the twin's outputs up to rounding
        assert _base(model).config._attn_implementation.startswith("fastprompt")
        with torch.no_grad():
            assert_close(_outputs(model, seq2seq), _outputs(twin, seq2seq), rtol=1e-4, atol=1e-5,
                         what="enabled attention, unpatched")
        disable_fastprompt_attention(_base(model), token)
    else:
        disable_fastprompt_attention(_base(model), token)
        with torch.no_grad():  # the patch is whole: still its own outputs
            assert torch.equal(_outputs(model, seq2seq), patched)
        fastprompt.unpatch_model(model)
    _assert_never_patched(model, twin, seq2seq, attn_before)
    disable_fastprompt_attention(_base(model), token)  # a second disable of the same token does nothing
    fastprompt.unpatch_model(model)
    _assert_never_patched(model, twin, seq2seq, attn_before)


def _instance_generate(*args, **kwargs):
    return "the instance's own generate"


@pytest.mark.parametrize("own_generate", [True, False], ids=["own-generate", "no-own-generate"])
@pytest.mark.parametrize("case", ["peft-t5-prompt", "peft-t5-prefix", "own-t5-prompt", "own-t5-prefix",
                                  "peft-decoder-prompt", "own-decoder-prompt"])
def test_unpatch_restores_the_instance_generate_it_found(case, own_generate):
    """Seq2seq input-level PEFT patches replace get_prompt only: unpatch used to delete an instance `generate` it
    never replaced. Every patch gives back exactly the instance attribute it found, or none."""
    model, _, prompt, _ = _case(case)
    if own_generate:
        model.__dict__["generate"] = _instance_generate
    _patch(model, prompt)
    fastprompt.unpatch_model(model)
    if own_generate:
        assert model.__dict__.get("generate") is _instance_generate
    else:
        assert "generate" not in model.__dict__
    assert _fastprompt_leftovers(model) == []


@pytest.mark.parametrize("family", ["decoder", "t5"])
def test_enabling_attention_twice_nests_the_same_for_every_model_kind(family):
    if family == "t5":
        _skip_without_seq2seq()
        model, enable = seq2seq_helpers.tiny_seq2seq("t5"), enable_seq2seq_attention
    else:
        model, enable = tiny_model("qwen2", "CAUSAL_LM"), enable_fastprompt_attention
    before = model.config._attn_implementation
    first, second = enable(model), enable(model)
    disable_fastprompt_attention(model, first)  # the first token is no owner: the second user keeps it on
    assert model.config._attn_implementation.startswith("fastprompt")
    disable_fastprompt_attention(model, first)
    assert model.config._attn_implementation.startswith("fastprompt")
    disable_fastprompt_attention(model, second)
    assert model.config._attn_implementation == before
    assert _fastprompt_leftovers(model) == []


def test_both_entry_points_enable_one_switch_on_an_encoder_decoder_model():
    """One attention integration: enable_fastprompt_attention and enable_seq2seq_attention are the same switch on a
    T5 model (its roles recorded either way, each enable one more user); enable_seq2seq_attention refuses a
    decoder-only model."""
    _skip_without_seq2seq()
    from fastprompt.integrations.transformers_attention import SLOT_ATTR, STATE_ATTR

    model = seq2seq_helpers.tiny_seq2seq("t5")
    before = model.config._attn_implementation
    first = enable_fastprompt_attention(model)
    second = enable_seq2seq_attention(model)
    state = model.__dict__[STATE_ATTR]
    assert second.state is first.state is state and state.users == 2
    assert model.config._attn_implementation == "fastprompt_seq2seq"
    roles = {(slot.role, slot.prefix_key) for slot in (
        m.__dict__[SLOT_ATTR] for m in model.modules() if SLOT_ATTR in m.__dict__)}
    assert ("encoder", ("encoder", 0)) in roles and ("self", ("self", 1)) in roles and ("cross", ("cross", 1)) in roles
    disable_fastprompt_attention(model, second)
    disable_fastprompt_attention(model, first)
    assert model.config._attn_implementation == before
    assert _fastprompt_leftovers(model) == []
    decoder = tiny_model("qwen2", "CAUSAL_LM")
    with pytest.raises(ValueError, match="enable_seq2seq_attention needs an encoder-decoder model"):
        enable_seq2seq_attention(decoder)
    assert _fastprompt_leftovers(decoder) == []


@pytest.mark.parametrize("case", [c for c in CASES if c != "own-t5-prompt"])
def test_patching_again_with_another_backend_applies_it_for_every_model_kind(case):
    """Patching twice is a no-op except that a different backend is applied, for PEFT models and fastprompt's own
    prompts alike (the own-prompt path used to ignore it), wherever the patch runs fastprompt's attention."""
    from fastprompt.integrations.transformers_attention import STATE_ATTR

    model, _, prompt, _ = _case(case)

    def patch(backend):
        return (fastprompt.patch_model(model, backend=backend) if prompt is None
                else fastprompt.patch_model(model, prompt, backend=backend))

    patch("torch")
    state = _base(model).__dict__.get(STATE_ATTR)
    if state is None:  # this patch runs no fastprompt attention (e.g. PEFT prompt tuning on T5): nothing to apply
        pytest.skip(f"{case}: no fastprompt attention")
    assert state.backend == "torch"
    snapshot = _snapshot(model)
    patch("reference")
    assert state.backend == "reference" and _snapshot(model) == snapshot
    patch("auto")
    assert state.backend == "auto"
    fastprompt.unpatch_model(model)
    assert _fastprompt_leftovers(model) == []


@pytest.mark.parametrize("case", ["peft-decoder-prompt", "own-decoder-prompt"])
def test_unpatch_forgets_hoist_prompts_false(case):
    """patch_model(..., hoist_prompts=False) records the choice on the model: unpatch removes it with the rest."""
    model, twin, prompt, seq2seq = _case(case)
    attn_before = _base(model).config._attn_implementation
    if prompt is None:
        fastprompt.patch_model(model, hoist_prompts=False)
    else:
        fastprompt.patch_model(model, prompt, hoist_prompts=False)
    fastprompt.unpatch_model(model)
    _assert_never_patched(model, twin, seq2seq, attn_before)


def _switch_story(case):
    """What a user sees of the one attention switch on the model of `case`, step by step: enabling twice, disabling
    each token twice, patching twice and patching another prompt. Equal stories: the same semantics."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from fastprompt.integrations.transformers_attention import STATE_ATTR, fastprompt_attention_forward

    model, twin, prompt, seq2seq = _case(case)
    before = model.config._attn_implementation
    story = []
    first, second = enable_fastprompt_attention(model), enable_fastprompt_attention(model)
    state = model.__dict__[STATE_ATTR]
    name = model.config._attn_implementation
    story.append(("enabled twice", name.startswith("fastprompt"), state.users, first.state is second.state,
                  ALL_ATTENTION_FUNCTIONS[name] is fastprompt_attention_forward))
    for token in (first, first, second, second):  # a token disabled twice counts once; the last user restores
        disable_fastprompt_attention(model, token)
        story.append(("disabled", model.config._attn_implementation == before,
                      STATE_ATTR in model.__dict__, _fastprompt_leftovers(model) == []))
    assert fastprompt.patch_model(model, prompt) is model
    snapshot = _snapshot(model)
    story.append(("patched twice", fastprompt.patch_model(model, prompt) is model, _snapshot(model) == snapshot))
    other = _own_prompt("prefix", model)
    with pytest.raises(ValueError) as refused:
        fastprompt.patch_model(model, other)
    story.append(("another prompt", str(refused.value)))
    fastprompt.unpatch_model(model)
    fastprompt.unpatch_model(model)
    _assert_never_patched(model, twin, seq2seq, before)
    return story


def test_the_one_switch_behaves_the_same_for_a_decoder_only_and_a_t5_model():
    """One attention integration: a decoder-only model and T5 go through the same registered function and the
    same switch, whose every observable step is the same for both kinds of model."""
    _skip_without_seq2seq()
    decoder, t5 = _switch_story("own-decoder-prefix"), _switch_story("own-t5-prefix")
    assert decoder == t5
    assert decoder[0] == ("enabled twice", True, 2, True, True)
    assert [step[1:] for step in decoder[1:5]] == [(False, True, False)] * 2 + [(True, False, True)] * 2
    assert decoder[5] == ("patched twice", True, True)


def test_query_pass_layer_forwards_are_in_the_one_record_and_restored_exactly():
    """A pool with query_layer=k replaces the forward of layers [0, k], recorded in the attach's one record of
    replaced methods: unpatch gives each layer back exactly the instance forward it had (its own, here a wrapper
    set before patching as accelerate's hooks do, or none), leaves alone one set after patching, and a second
    unpatch does nothing. A deep copy's unpatch restores the copy's layers, not the original's."""
    model = tiny_model("llama", "CAUSAL_LM")
    twin = copy.deepcopy(model)
    layers = model.model.layers
    own_calls = []

    def own_forward(*args, **kwargs):  # the layer's own instance forward, found by the patch
        own_calls.append(1)
        return type(layers[1]).forward(layers[1], *args, **kwargs)

    layers[1].__dict__["forward"] = own_forward
    prompt = _own_prompt("pool", model)
    fastprompt.patch_model(model, prompt)
    installed = [layer.__dict__.get("forward") for layer in layers]
    assert all(type(f).__module__ == "fastprompt.integrations.query_pass" for f in installed), installed
    with torch.no_grad():
        patched = _outputs(model, False)
    assert own_calls  # the query pass runs the layer's own forward, not its class's
    fastprompt.patch_model(model, prompt)  # twice: nothing nests
    assert all(layer.__dict__.get("forward") is f for layer, f in zip(layers, installed))
    with torch.no_grad():
        assert torch.equal(_outputs(model, False), patched)

    patched_copy = copy.deepcopy(model)
    fastprompt.unpatch_model(patched_copy)
    assert "forward" not in patched_copy.model.layers[0].__dict__
    assert patched_copy.model.layers[1].__dict__["forward"] is own_forward  # what it had (deepcopy keeps functions)
    assert all(layer.__dict__.get("forward") is f for layer, f in zip(layers, installed))  # the original: patched

    fastprompt.unpatch_model(model)
    assert "forward" not in layers[0].__dict__ and layers[1].__dict__["forward"] is own_forward
    fastprompt.unpatch_model(model)  # idempotent
    assert "forward" not in layers[0].__dict__ and layers[1].__dict__["forward"] is own_forward
    del layers[1].__dict__["forward"]
    _assert_never_patched(model, twin, False, twin.config._attn_implementation)

    # a forward someone sets on a layer after patching is theirs: unpatch leaves it, and restores the rest
    fastprompt.patch_model(model, prompt)
    theirs = functools.partial(type(layers[0]).forward, layers[0])
    layers[0].__dict__["forward"] = theirs
    fastprompt.unpatch_model(model)
    assert layers[0].__dict__["forward"] is theirs and "forward" not in layers[1].__dict__
