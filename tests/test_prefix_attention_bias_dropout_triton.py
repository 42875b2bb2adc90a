"""Attention dropout together with T5's additive score biases on the Triton kernels (TRITON_INTERPRET=1).

The op with backend="triton", attn_bias / prefix_bias and dropout_p > 0 against the float64 reference that
rebuilds the contract's Philox mask from the seed the op drew (replayed with torch.manual_seed): out, lse and the
gradients of q, k, v and the prefix (loss through out and lse) by relative error, over prefix layouts, GQA, causal
and padding, Lq = 1, odd sizes and tiles past the interpreter's 16. Plus: the Triton and torch paths keep the same
elements for the same seed, the no-grad and training paths agree, the dropout acts, the custom op under
torch.compile and opcheck, and `auto` routing biased dropout calls on CUDA tensors to Triton.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest.py sets it too)

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fastprompt.ops import prefix_attention  # noqa: E402
from fastprompt.ops import prefix_attention_dispatch as dispatch  # noqa: E402
from fastprompt.ops.prefix_attention import _forward_op  # noqa: E402
from fastprompt.ops.prefix_attention_triton import TritonBackend  # noqa: E402
from fastprompt.attention_dropout import draw_dropout_seed  # noqa: E402

from attention_cases import (Case, assert_compiled_matches_eager, check_against_reference, make_inputs,  # noqa: E402
                             op_kwargs, opcheck_args, relative_error)
from seq2seq_helpers import peft_seq2seq_pair, requires_seq2seq_transformers, seq2seq_inputs  # noqa: E402

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
SEED = 2024


def _prefix_keys(case: Case) -> int:
    return {"none": 0, "pool_slots": 3}.get(case.mode, 1) * case.plen


def _biases(case: Case, bias_batch: int, pbias_batch: int, dtype=None):
    """Fresh random attn_bias `[bias_batch, Hq, Lq, Lk]` and prefix_bias `[pbias_batch, Hq, Lq, S*P]` (None when
    there is no prefix); the attn_bias is a slice of a wider one, as T5's position_bias[..., :Lk] is."""
    dtype = dtype or case.dtype
    wide = torch.randn(bias_batch, case.hq, case.lq, case.lk + 3, dtype=torch.float64)
    bias = wide[..., 1:case.lk + 1].to(dtype)
    keys = _prefix_keys(case)
    pbias = torch.randn(pbias_batch, case.hq, case.lq, keys, dtype=torch.float64).to(dtype) if keys else None
    return bias, pbias


def _seeded_triton_op(*args, dropout_seed=None, **kwargs):
    """The op as check_against_reference calls it (with the reference's `extra`), drawing its dropout seed right
    after torch.manual_seed(SEED); the reference gets that seed as `dropout_seed`, which the op does not take."""
    torch.manual_seed(SEED)
    return prefix_attention(*args, backend="triton", **kwargs)


def _replayed_seed():
    torch.manual_seed(SEED)
    return draw_dropout_seed("cpu")


def check_biased_dropout(case: Case, dropout_p=0.3, bias_batch=1, pbias_batch=None, tol=1e-5, grad_tol=1e-4,
                         lse_grad=True):
    bias, pbias = _biases(case, bias_batch, case.batch if pbias_batch is None else pbias_batch)
    extra = {"attn_bias": bias, "prefix_bias": pbias, "dropout_p": dropout_p, "dropout_seed": _replayed_seed()}
    return check_against_reference(case, _seeded_triton_op, tol=tol, grad_tol=grad_tol, lse_grad=lse_grad,
                                   extra=extra)


CASES = [
    # shared prefix, GQA, causal, padding holes
    Case(batch=2, hq=4, hkv=2, lq=9, lk=11, dim=16, plen=5, mode="shared", padding="holes"),
    # per-sample prefix, not causal, right padding, odd head dim
    Case(batch=2, hq=2, hkv=2, lq=5, lk=9, dim=24, plen=4, mode="per_sample", padding="right", causal=False),
    # pool with an empty (-1) slot and a repeated entry, left padding, MQA
    Case(batch=3, hq=2, hkv=1, lq=7, lk=7, dim=8, plen=3, mode="pool_slots", pool_size=4, padding="left"),
    # one pool entry per row
    Case(batch=2, hq=3, hkv=1, lq=4, lk=6, dim=16, plen=2, mode="pool", padding="holes"),
    # no prefix: attn_bias alone
    Case(batch=2, hq=3, hkv=1, lq=6, lk=6, dim=8, plen=2, mode="none", padding="none"),
    # a row that sees no key at all, softcap and a sliding window
    Case(batch=2, hq=2, hkv=1, lq=6, lk=10, dim=8, plen=3, mode="pool_slots", padding="empty_row", softcap=2.0,
         window=4),
    # decode: one query row (T5's decoder step), odd head dim
    Case(batch=3, hq=4, hkv=2, lq=1, lk=9, dim=40, plen=3, mode="shared", padding="left"),
    # more keys than one 16-wide interpreter tile on both sides, P not a tile multiple
    Case(batch=2, hq=4, hkv=1, lq=3, lk=37, dim=16, plen=19, mode="per_sample", padding="holes"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_biased_dropout_triton_matches_reference(case):
    check_biased_dropout(case, bias_batch=1 if case.lq > 1 else case.batch)


def test_high_dropout_rate_and_batch_broadcast_prefix_bias():
    case = Case(batch=2, hq=2, hkv=1, lq=5, lk=7, dim=16, plen=3, mode="pool_slots", padding="holes", causal=False)
    check_biased_dropout(case, dropout_p=0.8, bias_batch=case.batch, pbias_batch=1)


def _call(case, inputs, bias, pbias, backend, dropout_p=0.3, grad=True):
    leaves = [inputs[n].detach().clone().requires_grad_(grad) if inputs[n] is not None else None for n in NAMES]
    torch.manual_seed(SEED)
    out, lse = prefix_attention(*leaves, dropout_p=dropout_p, backend=backend, return_lse=True,
                                attn_bias=bias, prefix_bias=pbias, **op_kwargs(case, inputs))
    return out, lse, [t for t in leaves if t is not None]


def test_triton_and_torch_paths_keep_the_same_elements():
    """Same seed, same mask: the Triton kernels and the torch path (prefix_attention_torch/dropout.py) give the same
    output and gradients; the no-dropout output differs, so the mask acted."""
    case = Case(batch=2, hq=4, hkv=2, lq=6, lk=9, dim=16, plen=3, mode="pool_slots", padding="holes")
    inputs = make_inputs(case)
    bias, pbias = _biases(case, 1, case.batch)
    results = {}
    for backend in ("triton", "torch"):
        out, lse, leaves = _call(case, inputs, bias, pbias, backend)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), leaves)
        results[backend] = (out.detach(), lse, grads)
    (out, lse, grads), (t_out, t_lse, t_grads) = results["triton"], results["torch"]
    assert relative_error(out, t_out) < 1e-5 and relative_error(lse, t_lse) < 1e-5
    for g, tg in zip(grads, t_grads):
        assert relative_error(g, tg) < 1e-4
    plain, _, _ = _call(case, inputs, bias, pbias, "triton", dropout_p=0.0, grad=False)
    assert relative_error(out, plain) > 1e-2


def test_inference_and_training_calls_agree_and_reproduce():
    """No-grad calls skip the custom op; both draw the same seed under manual_seed, so the same tensors."""
    case = Case(batch=2, hq=2, hkv=1, lq=3, lk=5, dim=16, plen=2, mode="pool_slots")
    inputs = make_inputs(case)
    bias, pbias = _biases(case, case.batch, 1)
    with torch.no_grad():
        fast, _, _ = _call(case, inputs, bias, pbias, "triton", grad=False)
    graded, _, _ = _call(case, inputs, bias, pbias, "triton")
    assert graded.grad_fn is not None
    assert torch.equal(fast, graded.detach())
    torch.manual_seed(SEED + 1)
    other = prefix_attention(*(inputs[n] for n in NAMES), dropout_p=0.3, backend="triton", attn_bias=bias,
                             prefix_bias=pbias, **op_kwargs(case, inputs))
    assert not torch.equal(other, fast)


def test_compiled_biased_dropout_triton_call():
    """The biased Triton op with dropout is a custom op taking the seed as an input: torch.compile (the seed drawn
    in the graph from the same generator) gives the same loss and gradients as eager."""
    case = Case(mode="shared", hq=2, hkv=1, lq=4, lk=5, plen=3, dim=16, padding="holes")
    inputs = make_inputs(case)
    bias, pbias = _biases(case, 1, case.batch)

    def step(q, k, v, pk, pv):
        out = prefix_attention(q, k, v, pk, pv, dropout_p=0.3, backend="triton", attn_bias=bias, prefix_bias=pbias,
                               key_padding_mask=inputs["key_padding_mask"])
        return out.square().sum()

    assert_compiled_matches_eager(step, inputs, NAMES)


def test_opcheck_biased_op_with_dropout():
    case = Case(batch=2, hq=2, hkv=1, lq=3, lk=4, dim=8, plen=2, mode="pool_slots", padding="holes")
    a = opcheck_args(case)
    a.attn_bias, a.prefix_bias = _biases(case, 1, case.batch)
    a.dropout_p, a.dropout_seed = 0.2, draw_dropout_seed("cpu")
    torch.library.opcheck(_forward_op, a.op_inputs() + ("triton",))


# ---------------------------------------------------------------------------------------------------------------
# Backend choice


def _recording_triton_forward(monkeypatch, calls):
    """TritonBackend.forward, recording each biased call's dropout_p."""
    real = TritonBackend.forward

    def forward(cls, args):
        if args.biased:
            calls.append(args.dropout_p)
        return real(args)

    monkeypatch.setattr(TritonBackend, "forward", classmethod(forward))


def test_auto_routes_biased_dropout_calls_on_cuda_to_triton(monkeypatch):
    """`auto` asks the Triton checks with the call's dropout_p and picks Triton where it is first in line and the
    checks pass (CUDA tensors; here the CPU under the interpreter, given CUDA's priority list)."""
    seen = []
    real = TritonBackend.not_supported_reasons
    monkeypatch.setattr(TritonBackend, "not_supported_reasons",
                        classmethod(lambda cls, args, grad: seen.append(args.dropout_p) or real(args, grad)))
    case = Case(batch=2, hq=2, hkv=1, lq=3, lk=5, dim=16, plen=2, mode="shared")
    a = opcheck_args(case)
    a.attn_bias, a.dropout_p = _biases(case, 1, case.batch)[0], 0.1
    assert dispatch.resolve_backend("auto", a, True) == "torch"  # the CPU's list: the torch path only
    monkeypatch.setitem(dispatch.PRIORITY, "cpu", dispatch.PRIORITY["cuda"])
    assert dispatch.resolve_backend("auto", a, True) == "triton"
    assert seen == [0.1]


def test_auto_biased_dropout_call_reaches_the_triton_kernels(monkeypatch):
    """End to end through the front door: with Triton chosen (as on CUDA) the biased kernels get the dropout."""
    calls = []
    _recording_triton_forward(monkeypatch, calls)
    monkeypatch.setitem(dispatch.PRIORITY, "cpu", dispatch.PRIORITY["cuda"])
    case = Case(batch=2, hq=2, hkv=1, lq=3, lk=5, dim=16, plen=2, mode="shared")
    inputs = make_inputs(case)
    bias, pbias = _biases(case, 1, case.batch)
    out, _, _ = _call(case, inputs, bias, pbias, "auto")
    expected, _, _ = _call(case, inputs, bias, pbias, "triton")
    assert calls == [0.3, 0.3] and torch.equal(out, expected)


def test_cuda_backend_still_refuses_a_bias():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="backend='cuda'.*CUDA kernels take no attn_bias"):
        prefix_attention(q, k, v, attn_bias=torch.randn(1, 2, 3, 4), dropout_p=0.1, backend="cuda")


def test_reference_with_same_seed_equals_triton():
    """backend='reference' draws the same seed the same way: the op's reference backend and Triton agree."""
    case = Case(batch=2, hq=2, hkv=2, lq=4, lk=6, dim=8, plen=3, mode="per_sample", padding="right")
    inputs = make_inputs(case)
    bias, pbias = _biases(case, case.batch, case.batch)
    out, lse, _ = _call(case, inputs, bias, pbias, "triton", grad=False)
    ref, ref_lse, _ = _call(case, inputs, bias, pbias, "reference", grad=False)
    assert relative_error(out, ref) < 1e-5 and relative_error(lse, ref_lse) < 1e-5



# ---------------------------------------------------------------------------------------------------------------
# T5 prefix tuning in train() mode on the Triton kernels


@pytest.mark.slow  # ~14 s interpreted: the op-level tests above show the feature, this the T5 wiring
@requires_seq2seq_transformers
def test_t5_training_step_with_attention_dropout_on_triton_equals_torch_path(monkeypatch):
    """A patched T5 prefix-tuning model with attention dropout, backend="triton" vs backend="torch", same seed:
    the same loss and prompt gradients (same mask in every biased, dropped attention), and the dropout acted."""
    peft = pytest.importorskip("peft")
    import fastprompt

    dropped = []
    _recording_triton_forward(monkeypatch, dropped)

    config = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
    runs = {}
    for backend in ("triton", "torch"):
        model, _ = peft_seq2seq_pair("t5", config)
        fastprompt.patch_model(model, backend=backend)
        for module in model.modules():
            if type(module).__name__ == "T5Attention":
                module.dropout = 0.3  # attention dropout (the tiny config has none)
        model.train()
        ids, mask, labels, _ = seq2seq_inputs("t5")
        torch.manual_seed(7)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        runs[backend] = (loss.detach(), [p.grad for p in model.parameters() if p.requires_grad])
        if backend == "triton":
            model.eval()
            with torch.no_grad():
                runs["eval"] = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert 0.3 in dropped  # the Triton kernels ran biased attention with dropout
    (loss, grads), (t_loss, t_grads) = runs["triton"], runs["torch"]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert relative_error(loss, t_loss) < 1e-5
    for g, tg in zip(grads, t_grads):
        assert relative_error(g, tg) < 1e-4
    assert relative_error(loss, runs["eval"]) > 1e-4  # train() dropped something
