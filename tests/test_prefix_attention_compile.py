"""prefix_attention is a torch.library custom op: opcheck validates its registration (schema, fake tensor,
autograd), and torch.compile traces it as one opaque node in forward and backward."""
import pytest
import torch

import fastprompt as fp
from attention_cases import Case, make_inputs, op_kwargs
from fastprompt.ops.prefix_attention import _forward_op
from fastprompt.ops.prefix_attention_inputs import check_prefix_attention_args


@pytest.mark.parametrize("mode", ["none", "shared", "pool_slots"])
def test_opcheck(mode):
    case = Case(mode=mode, padding="holes")
    inputs = make_inputs(case)
    for n in ("q", "k", "v", "prefix_k", "prefix_v"):
        if inputs[n] is not None:
            inputs[n].requires_grad_()
    a = check_prefix_attention_args(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                                    inputs["prefix_index"], inputs["key_padding_mask"], True, None, None, None)
    torch.library.opcheck(_forward_op, a.op_inputs() + ("torch",))


def test_torch_compile_forward_backward_matches_eager():
    case = Case(mode="pool_slots", padding="holes", softcap=2.0)
    inputs = make_inputs(case)
    names = ("q", "k", "v", "prefix_k", "prefix_v")

    def step(q, k, v, pk, pv):
        out, lse = fp.ops.prefix_attention(q, k, v, pk, pv, return_lse=True, **op_kwargs(case, inputs))
        return (out.square().sum() + lse.masked_fill(lse.isinf(), 0).sum())

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        tensors = [inputs[n].detach().clone().requires_grad_() for n in names]
        loss = fn(*tensors)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in tensors])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
