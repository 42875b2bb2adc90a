"""T5's prefix bias is computed once, not per layer, decoding step and training step: a table over query positions,
sliced per call, equal to what T5.compute_bias gives for PEFT's P-longer cache at every (query length, past) a call
can have, rebuilt when the bias weights change."""
import pytest
import torch

from fastprompt.integrations import seq2seq_attention as seq2seq
from fastprompt.integrations.transformers_attention import SLOT_ATTR, enable_seq2seq_attention

from seq2seq_helpers import requires_seq2seq_transformers, tiny_seq2seq

pytestmark = requires_seq2seq_transformers


def _decoder_slot(model):
    model.requires_grad_(False)  # PEFT freezes the base model, T5's relative attention bias with it
    enable_seq2seq_attention(model)
    attn = model.get_decoder().block[0].layer[0].SelfAttention
    return attn.__dict__[SLOT_ATTR]


def _table(slot, plen, dtype=torch.float32):
    return seq2seq._PREFIX_BIAS_TABLES[slot.bias_module][(plen, dtype)][1]


def test_table_slices_equal_t5_compute_bias_and_grow():
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    plen = 5
    calls = [(1, 0), (1, 1), (3, 0), (1, 7), (1, 30), (4, 2), (1, 31)]  # decode steps, then longer rows
    for lq, past in calls:
        got = seq2seq.prefix_bias_for_call(slot, plen, lq, past, torch.float32)
        want = seq2seq.t5_prefix_bias(slot.bias_module, plen, lq, past)
        assert got.shape == (1, 4, lq, plen) and torch.equal(got, want)
    first = _table(slot, plen)
    assert first.shape[2] >= 32
    seq2seq.prefix_bias_for_call(slot, plen, 1, 5, torch.float32)  # within the table: no recomputation
    assert _table(slot, plen) is first


def test_table_follows_weight_changes_and_is_skipped_when_the_bias_trains():
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    weight = slot.bias_module.relative_attention_bias.weight
    before = seq2seq.prefix_bias_for_call(slot, 3, 2, 0, torch.float32).clone()
    with torch.no_grad():
        weight.add_(1.0)  # an in-place update (e.g. a loaded checkpoint) bumps the version
    assert torch.allclose(seq2seq.prefix_bias_for_call(slot, 3, 2, 0, torch.float32), before + 1.0)
    model.double()  # the weight's data replaced in place
    assert torch.equal(seq2seq.prefix_bias_for_call(slot, 3, 2, 0, torch.float64),
                       seq2seq.t5_prefix_bias(slot.bias_module, 3, 2, 0))
    weight.requires_grad_(True)
    trained = seq2seq.prefix_bias_for_call(slot, 3, 2, 0, torch.float64)
    assert trained.requires_grad  # computed afresh: the op then refuses a bias that needs a gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_table_per_dtype(dtype):
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    got = seq2seq.prefix_bias_for_call(slot, 4, 3, 1, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, seq2seq.t5_prefix_bias(slot.bias_module, 4, 3, 1).to(dtype))



def _greedy_no_cache(model, ids, mask, steps, start):
    """Greedy decoding over the model's full forward, decoder_input_ids grown one token at a time (no cache)."""
    dec = torch.full((ids.shape[0], 1), start, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return dec


@pytest.mark.parametrize("update", ["data_in_place", "data_assigned_in_place"])
def test_table_follows_weight_updates_through_data(update):
    """EMA, weight averaging and some loaders write a weight through `.data`: its object, `_version` and `data_ptr`
    all stay the same. No-grad forwards and generate() after such an update must read the new bias: the patched model
    against the unpatched PEFT model given the same update (forward), and a no-cache greedy loop over it (generate)."""
    peft = pytest.importorskip("peft")
    import fastprompt
    from seq2seq_helpers import peft_seq2seq_pair, rel, seq2seq_inputs

    patched, oracle = peft_seq2seq_pair("t5", peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    fastprompt.patch_model(patched)
    ids, mask, labels, decoder_mask = seq2seq_inputs("t5")
    call = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask)
    with torch.no_grad():
        patched(**call)  # builds the table from the weights as they are
        patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        for model in (patched, oracle):
            weight = model.get_base_model().decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
            version, pointer = weight._version, weight.data_ptr()
            if update == "data_in_place":
                weight.data.mul_(-1.5).add_(0.7)  # an EMA-style update: the .data alias has its own version counter
            else:
                weight.data.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)))
            assert (weight._version, weight.data_ptr()) == (version, pointer)  # nothing but the values tells
        got = patched(**call).logits
        want = oracle(**call).logits
        assert rel(got, want) < 1e-5
        tokens = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                  do_sample=False)
    expected = _greedy_no_cache(oracle, ids, mask, 5, patched.config.decoder_start_token_id)
    assert torch.equal(tokens, expected), f"generate() after the update\n{tokens}\n!= no-cache greedy\n{expected}"


def test_table_checked_once_per_call():
    """The content check runs once per call (the call's memo serves the other layers and decoding steps)."""
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    from fastprompt.integrations.transformers_attention import AttentionCall, bind_call

    checks = []
    original = seq2seq._built_from
    seq2seq._built_from = lambda *args: checks.append(1) or original(*args)
    try:
        seq2seq.prefix_bias_for_call(slot, 3, 2, 0, torch.float32)  # builds the table (no check: nothing to compare yet)
        checks.clear()
        with bind_call(slot.state, AttentionCall(prefixes={})):
            for past in range(6):  # six layers / steps of one call
                seq2seq.prefix_bias_for_call(slot, 3, 1, past, torch.float32)
        assert len(checks) == 1
    finally:
        seq2seq._built_from = original


def test_table_built_under_inference_mode_serves_a_later_training_step():
    """A forward under torch.inference_mode() (evaluation between training steps) must not leave an inference tensor
    as the table: the next forward with grad saves the bias for the prefixes' backward ("Inference tensors cannot
    be saved for backward"). Its loss and prefix gradients equal the unpatched PEFT model's."""
    peft = pytest.importorskip("peft")
    import fastprompt
    from seq2seq_helpers import peft_seq2seq_pair, rel, seq2seq_inputs

    patched, oracle = peft_seq2seq_pair("t5", peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    fastprompt.patch_model(patched)
    ids, mask, labels, decoder_mask = seq2seq_inputs("t5")
    call = dict(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask)
    with torch.inference_mode():
        evaluated = patched(**call).logits
    assert rel(evaluated, oracle(**call).logits.detach()) < 1e-5
    got, want = patched(**call).loss, oracle(**call).loss
    assert rel(got.detach(), want.detach()) < 1e-5
    got.backward()
    want.backward()
    theirs = dict(oracle.named_parameters())
    trained = [(n, p) for n, p in patched.named_parameters() if p.requires_grad]
    assert trained
    scale = max(float(theirs[n].grad.abs().max()) for n, _ in trained)
    for name, p in trained:
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")
