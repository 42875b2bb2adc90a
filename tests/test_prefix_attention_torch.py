"""The torch and reference backends of prefix_attention against the float64 oracle, over the whole contract."""
import pytest
import torch

import fastprompt as fp
from attention_cases import Case, check_against_reference, make_inputs, op_kwargs

MODES = ["none", "shared", "per_sample", "pool", "pool_slots"]


def _op(backend):
    def run(*args, **kwargs):
        return fp.ops.prefix_attention(*args, backend=backend, **kwargs)
    return run


CASES = [
    # every prefix layout x the masks that matter most
    *[Case(mode=m, padding=p, causal=c) for m in MODES for p in ("none", "holes") for c in (True, False)],
    Case(mode="shared", padding="left", hq=4, hkv=1),  # MQA
    Case(mode="pool_slots", padding="right", hq=6, hkv=2),  # GQA group 3
    Case(mode="per_sample", hq=3, hkv=3),  # MHA
    Case(mode="shared", lq=1, lk=9),  # decode: Lq = 1
    Case(mode="pool", lq=9, lk=4, causal=False),  # Lq > Lk
    Case(mode="shared", lq=8, lk=8, window=3),
    Case(mode="pool_slots", lq=4, lk=10, window=2, causal=False, padding="holes"),
    Case(mode="shared", softcap=1.5, padding="holes"),
    Case(mode="pool_slots", softcap=3.0, window=4),
    Case(mode="none", padding="empty_row", causal=False),  # a row with no visible key
    Case(mode="pool_slots", padding="empty_row", causal=False),
    Case(mode="pool", padding="empty_row", causal=True, lq=3, lk=3),
    Case(mode="shared", plen=1), Case(mode="shared", plen=17, lk=20, lq=19),
    *[Case(mode="shared", dim=d, batch=1, lq=3, lk=4, plen=5) for d in (32, 64, 80, 96, 128, 256)],
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("lse_grad", [True, False], ids=["lse-grad", "out-grad"])
def test_float32_matches_float64_reference(case, backend, lse_grad):
    # out-grad takes the fused CPU kernel's backward, lse-grad the explicit one
    check_against_reference(case, _op(backend), tol=1e-5, grad_tol=1e-4, lse_grad=lse_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["shared", "pool_slots"])
@pytest.mark.parametrize("lse_grad", [True, False], ids=["lse-grad", "out-grad"])
def test_half_precision_matches_float64_reference(dtype, mode, lse_grad):
    case = Case(mode=mode, padding="holes", dtype=dtype, lq=6, lk=6)
    check_against_reference(case, _op("torch"), tol=1e-2, grad_tol=3e-2, lse_grad=lse_grad)


@pytest.mark.parametrize("case", [Case(mode="pool_slots", padding="holes", softcap=2.0),
                                  Case(mode="shared", window=3, lq=6, lk=6)], ids=str)
def test_explicit_composition_matches_reference(case, monkeypatch):
    # the path taken off the CPU and under softcap, forced here on the CPU
    from fastprompt.ops.prefix_attention_torch import TorchBackend

    monkeypatch.setattr(TorchBackend, "_fused_cpu", classmethod(lambda cls, args: False))
    for lse_grad in (True, False):
        check_against_reference(case, _op("torch"), tol=1e-5, grad_tol=1e-4, lse_grad=lse_grad)


def test_float64_is_exact():
    case = Case(mode="pool_slots", padding="holes", dtype=torch.float64, softcap=2.0, window=5)
    errors = check_against_reference(case, _op("torch"), tol=1e-12)
    assert max(errors.values()) < 1e-12


def test_gradcheck_reference_float64():
    case = Case(batch=2, hq=2, hkv=1, lq=3, lk=4, dim=4, plen=2, mode="pool_slots", padding="holes",
                softcap=2.0, dtype=torch.float64)
    inputs = make_inputs(case)
    names = ["q", "k", "v", "prefix_k", "prefix_v"]
    tensors = [inputs[n].requires_grad_() for n in names]

    def f(*ts):
        return fp.reference.prefix_attention(*ts, **op_kwargs(case, inputs))

    assert torch.autograd.gradcheck(f, tensors)


def test_gradcheck_op_float64():
    case = Case(batch=2, hq=4, hkv=2, lq=3, lk=4, dim=4, plen=2, mode="shared", padding="left", window=2,
                dtype=torch.float64)
    inputs = make_inputs(case)
    tensors = [inputs[n].requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]

    def f(*ts):  # lse is float32 by contract, too coarse for finite differences; its gradient is checked above
        return fp.ops.prefix_attention(*ts, backend="torch", **op_kwargs(case, inputs))

    assert torch.autograd.gradcheck(f, tensors)


def test_empty_rows_give_zeros_and_minus_inf_without_nan():
    case = Case(mode="pool_slots", padding="empty_row", causal=False)
    inputs = make_inputs(case)
    for n in ("q", "k", "v", "prefix_k", "prefix_v"):
        inputs[n].requires_grad_()
    out, lse = fp.ops.prefix_attention(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"],
                                       inputs["prefix_v"], return_lse=True, **op_kwargs(case, inputs))
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[1:]).all()
    out.sum().backward()
    for n in ("q", "k", "v", "prefix_k", "prefix_v"):
        assert torch.isfinite(inputs[n].grad).all(), n
    assert torch.all(inputs["q"].grad[0] == 0)


def test_noncontiguous_inputs_like_transformers_views():
    # transformers hands attention (B, H, L, D) views of (B, L, H, D) projections
    b, h, l, d = 2, 4, 5, 8
    q = torch.randn(b, l, h, d).transpose(1, 2)
    k = torch.randn(b, l, 2, d).transpose(1, 2)
    v = torch.randn(b, l, 2, d).transpose(1, 2)
    pk, pv = torch.randn(2, 3, d), torch.randn(2, 3, d)
    out = fp.ops.prefix_attention(q, k, v, pk, pv)
    ref = fp.reference.prefix_attention(q.contiguous(), k.contiguous(), v.contiguous(), pk, pv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_and_gradients_follow_the_input_layout(backend):
    # out in q's [B, L, H, D] memory makes transformers' transpose + reshape free; grads match their inputs
    if backend == "triton":
        pytest.importorskip("triton")
    b, l, d = 2, 5, 16
    q = torch.randn(b, l, 4, d).transpose(1, 2).requires_grad_()
    k = torch.randn(b, l, 2, d).transpose(1, 2).requires_grad_()
    v = torch.randn(b, l, 2, d).transpose(1, 2).requires_grad_()
    pk, pv = torch.randn(2, 3, d), torch.randn(2, 3, d)
    out = fp.ops.prefix_attention(q, k, v, pk, pv, backend=backend)
    assert out.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g, t in zip(grads, (q, k, v)):
        assert g.stride() == t.stride()


def test_shared_prefix_gradient_is_summed_over_batch_and_group():
    case = Case(mode="shared", batch=3, hq=4, hkv=2)
    inputs = make_inputs(case)
    pk = inputs["prefix_k"].requires_grad_()
    out = fp.ops.prefix_attention(inputs["q"], inputs["k"], inputs["v"], pk, inputs["prefix_v"])
    out.sum().backward()
    total = torch.zeros_like(pk)
    for b in range(3):  # row by row, the shared prefix's gradient adds up
        pkb = inputs["prefix_k"].detach().clone().requires_grad_()
        fp.ops.prefix_attention(inputs["q"][b:b + 1], inputs["k"][b:b + 1], inputs["v"][b:b + 1], pkb,
                                inputs["prefix_v"]).sum().backward()
        total += pkb.grad
    torch.testing.assert_close(pk.grad, total, rtol=1e-5, atol=1e-6)


def test_auto_on_cpu_is_torch():
    from fastprompt.ops.prefix_attention import resolve_backend
    from fastprompt.ops.prefix_attention_inputs import check_prefix_attention_args

    inputs = make_inputs(Case())
    args = check_prefix_attention_args(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"],
                                       inputs["prefix_v"], None, None, True, None, None, None)
    assert resolve_backend("auto", args, needs_grad=True) == "torch"
