"""T5 prefix tuning in train() mode with attention dropout: the decoder's prefixed self-attention goes through the
fused op (T5's relative position bias as attn_bias / prefix_bias, dropout drawn inside the op), not an explicit
attention over concatenated keys. The op itself is checked against the reference with biases and dropout in
test_prefix_attention_dropout_cpu.py; here: the routing, reproducibility and no concatenation."""
import pytest
import torch

from integration_helpers import single_thread  # noqa: F401 (autouse fixture)
from seq2seq_helpers import peft_seq2seq_pair, requires_seq2seq_transformers, seq2seq_inputs

import fastprompt

peft = pytest.importorskip("peft")


@requires_seq2seq_transformers
def test_t5_training_with_attention_dropout_runs_through_the_op(monkeypatch):
    import fastprompt.ops as ops
    from test_prefix_attention_materialization import ShapeRecorder

    patched, _ = peft_seq2seq_pair("t5", peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    fastprompt.patch_model(patched)
    for module in patched.modules():
        if type(module).__name__ == "T5Attention":
            module.dropout = 0.3  # attention dropout (the tiny config has none)
    patched.train()
    calls = []
    real = ops.prefix_attention

    def spy(q, k, v, prefix_k=None, prefix_v=None, **kw):
        calls.append((prefix_k is not None, kw.get("attn_bias") is not None, kw.get("dropout_p", 0.0)))
        return real(q, k, v, prefix_k, prefix_v, **kw)

    monkeypatch.setattr(ops, "prefix_attention", spy)
    ids, mask, labels, _ = seq2seq_inputs("t5")

    def step(seed):
        patched.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = patched(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in patched.parameters() if p.requires_grad]

    recorder = ShapeRecorder()
    with recorder:
        first = step(7)
    again, other = step(7), step(8)
    assert any(pre and bias and p == 0.3 for pre, bias, p in calls)  # prefixed, biased, with dropout
    assert torch.isfinite(first[0]) and all(torch.isfinite(g).all() for g in first[1]) and first[1]
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    assert not torch.equal(first[0], other[0])
    batch, tgt, heads, dim, plen = ids.shape[0], labels.shape[1], 4, 8, 4
    forbidden = {(batch, heads, plen + tgt, dim), (batch, heads, tgt, plen + tgt)}  # joined K/V, scores (P + tgt != D)
    assert not [s for _, s in recorder.shapes if s in forbidden]
