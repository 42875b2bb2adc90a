"""T5's prefix bias is computed once, not per layer, decoding step and training step: a table over query positions,
sliced per call, equal to what T5.compute_bias gives for PEFT's P-longer cache at every (query length, past) a call
can have, rebuilt when the bias weights change."""
import pytest
import torch

from fastprompt.integrations import seq2seq
from fastprompt.integrations.transformers_attention import _SLOT_ATTR

from seq2seq_helpers import requires_seq2seq_transformers, tiny_seq2seq

pytestmark = requires_seq2seq_transformers


def _decoder_slot(model):
    model.requires_grad_(False)  # PEFT freezes the base model, T5's relative attention bias with it
    seq2seq.enable_seq2seq_attention(model)
    attn = model.get_decoder().block[0].layer[0].SelfAttention
    return attn.__dict__[_SLOT_ATTR]


def _table(slot, plen, dtype=torch.float32):
    return seq2seq._PREFIX_BIAS_TABLES[slot.bias_module][(plen, dtype)][1]


def test_table_slices_equal_t5_compute_bias_and_grow():
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    plen = 5
    calls = [(1, 0), (1, 1), (3, 0), (1, 7), (1, 30), (4, 2), (1, 31)]  # decode steps, then longer rows
    for lq, past in calls:
        got = seq2seq._prefix_bias(slot, plen, lq, past, torch.float32)
        want = seq2seq.t5_prefix_bias(slot.bias_module, plen, lq, past)
        assert got.shape == (1, 4, lq, plen) and torch.equal(got, want)
    first = _table(slot, plen)
    assert first.shape[2] >= 32
    seq2seq._prefix_bias(slot, plen, 1, 5, torch.float32)  # within the table: no recomputation
    assert _table(slot, plen) is first


def test_table_follows_weight_changes_and_is_skipped_when_the_bias_trains():
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    weight = slot.bias_module.relative_attention_bias.weight
    before = seq2seq._prefix_bias(slot, 3, 2, 0, torch.float32).clone()
    with torch.no_grad():
        weight.add_(1.0)  # an in-place update (e.g. a loaded checkpoint) bumps the version
    assert torch.allclose(seq2seq._prefix_bias(slot, 3, 2, 0, torch.float32), before + 1.0)
    model.double()  # the weight's data replaced in place
    assert torch.equal(seq2seq._prefix_bias(slot, 3, 2, 0, torch.float64),
                       seq2seq.t5_prefix_bias(slot.bias_module, 3, 2, 0))
    weight.requires_grad_(True)
    trained = seq2seq._prefix_bias(slot, 3, 2, 0, torch.float64)
    assert trained.requires_grad  # computed afresh: the op then refuses a bias that needs a gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_table_per_dtype(dtype):
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    got = seq2seq._prefix_bias(slot, 4, 3, 1, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, seq2seq.t5_prefix_bias(slot.bias_module, 4, 3, 1).to(dtype))

