"""What a patched encoder-decoder forward / generate computes once and shares across layers and decoding steps:
T5's prefix bias (a table over query positions, sliced per call, equal to what T5.compute_bias gives for PEFT's
P-longer cache at every (query length, past) a call can have) and the SDPA masks of the prefix-less layers."""
import pytest
import torch

from fastprompt.integrations import seq2seq
from fastprompt.integrations.transformers_attention import _SLOT_ATTR

from seq2seq_helpers import peft_seq2seq_pair, requires_seq2seq_transformers, seq2seq_inputs, tiny_seq2seq

pytestmark = requires_seq2seq_transformers


def _decoder_slot(model):
    model.requires_grad_(False)  # PEFT freezes the base model, T5's relative attention bias with it
    seq2seq.enable_seq2seq_attention(model)
    attn = model.get_decoder().block[0].layer[0].SelfAttention
    return attn.__dict__[_SLOT_ATTR]


def test_table_slices_equal_t5_compute_bias_and_grow():
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    plen = 5
    with seq2seq.decoder_prefixes(model, {}, position_shift=plen):
        calls = [(1, 0), (1, 1), (3, 0), (1, 7), (1, 30), (4, 2), (1, 31)]  # decode steps, then longer rows
        for lq, past in calls:
            got = seq2seq._prefix_bias(slot, plen, lq, past, torch.float32)
            want = seq2seq.t5_prefix_bias(slot.bias_module, plen, lq, past)
            assert got.shape == (1, 4, lq, plen) and torch.equal(got, want)
        (table,) = [entry[2] for key, entry in slot.state.call_cache.items() if key[0] == "t5 prefix bias"]
        assert table.shape[2] >= 32
        first = table
        seq2seq._prefix_bias(slot, plen, 1, 5, torch.float32)  # within the table: no recomputation
        assert slot.state.call_cache[("t5 prefix bias", plen, torch.float32, table.device)][2] is first
    assert slot.state.call_cache is None  # the table lives for one forward / generate


def test_table_follows_weight_changes_and_is_skipped_when_the_bias_trains():
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    weight = slot.bias_module.relative_attention_bias.weight
    with seq2seq.decoder_prefixes(model, {}, position_shift=3):
        before = seq2seq._prefix_bias(slot, 3, 2, 0, torch.float32).clone()
        with torch.no_grad():
            weight.add_(1.0)  # an in-place update (e.g. a loaded checkpoint) bumps the version
        after = seq2seq._prefix_bias(slot, 3, 2, 0, torch.float32)
        assert torch.allclose(after, before + 1.0)
        weight.requires_grad_(True)
        trained = seq2seq._prefix_bias(slot, 3, 2, 0, torch.float32)
        assert trained.requires_grad  # computed afresh: the op then refuses a bias that needs a gradient
    # outside the block (a checkpointed layer's recompute): computed afresh, the same values
    with torch.no_grad():
        outside = seq2seq._prefix_bias(slot, 3, 2, 0, torch.float32)
    assert torch.equal(outside, seq2seq.t5_prefix_bias(slot.bias_module, 3, 2, 0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_table_per_dtype(dtype):
    model = tiny_seq2seq("t5")
    slot = _decoder_slot(model)
    with seq2seq.decoder_prefixes(model, {}, position_shift=4):
        got = seq2seq._prefix_bias(slot, 4, 3, 1, dtype)
        assert got.dtype == dtype
        assert torch.equal(got, seq2seq.t5_prefix_bias(slot.bias_module, 4, 3, 1).to(dtype))


def test_prefix_less_layers_share_one_mask_per_forward(monkeypatch):
    """T5's two encoder layers get one padding + position-bias mask, its two cross-attentions one padding mask;
    the logits stay those of the unpatched PEFT model."""
    import fastprompt
    import peft

    patched, oracle = peft_seq2seq_pair("t5", peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    fastprompt.patch_model(patched)
    built = []
    real = seq2seq._sdpa_with_bias_mask

    def counting(q, k, kpm, bias, causal):
        built.append((tuple(q.shape), bias is not None))
        return real(q, k, kpm, bias, causal)

    monkeypatch.setattr(seq2seq, "_sdpa_with_bias_mask", counting)
    ids, mask, labels, _ = seq2seq_inputs("t5")
    with torch.no_grad():
        got = patched(input_ids=ids, attention_mask=mask, labels=labels).logits
        want = oracle(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert sorted(b for _, b in built) == [False, True]  # cross-attention (no bias), encoder (T5's bias)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
