"""Triton prefix attention with additive score biases (T5's relative position bias) under TRITON_INTERPRET=1.

The public op with backend="triton" and attn_bias `[1|B, Hq, Lq, Lk]` / prefix_bias `[1|B, Hq, Lq, S*P]`, against
the float64 reference: out, lse and the gradients of q, k, v and the prefix (loss through out and lse) by relative
error. Cases are pairwise over prefix layout x GQA x padding x causal/window/softcap x Lq = 1 x odd P and head dims
x bias layout (batch-broadcast, expanded, sliced, transposed views) x dtypes; plus backend routing and refusals.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest.py sets it too)

import functools  # noqa: E402
import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fastprompt import reference  # noqa: E402
from fastprompt.ops import prefix_attention  # noqa: E402
from fastprompt.ops import prefix_attention_dispatch as dispatch  # noqa: E402
from fastprompt.ops.prefix_attention_inputs import check_prefix_attention_args  # noqa: E402
from fastprompt.ops.prefix_attention_triton import TritonBackend  # noqa: E402

from attention_cases import Case, check_against_reference, differentiable, make_inputs, relative_error  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-4, F16: 2e-2, BF16: 2e-2}


def _prefix_keys(case: Case) -> int:
    return {"none": 0, "pool_slots": 3}.get(case.mode, 1) * case.plen


def make_bias(batch, hq, lq, keys, layout, dtype):
    """A fresh random `[1|B, Hq, Lq, keys]` bias in one of the memory layouts a caller may hand the op."""
    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)

    if layout == "batch":
        return randn(batch, hq, lq, keys)
    if layout == "broadcast":  # T5's position_bias: one [1, H, Lq, Lk] for the whole batch
        return randn(1, hq, lq, keys)
    if layout == "expanded":  # batch stride 0
        return randn(1, hq, lq, keys).expand(batch, -1, -1, -1)
    if layout == "heads_expanded":  # head stride 0, odd row stride
        return randn(batch, 1, lq, keys + 3)[..., 1:keys + 1].expand(-1, hq, -1, -1)
    if layout == "sliced":  # T5's position_bias[..., :Lk] of a longer one
        return randn(1, hq, lq, keys + 5)[..., 2:keys + 2]
    if layout == "transposed":  # last-dim stride != 1
        return randn(batch, hq, keys, lq).transpose(-1, -2)
    raise ValueError(layout)


def check_biased(case: Case, *, bias_layout="broadcast", prefix_bias_layout="batch", bias_dtype=None,
                 attn_bias=True, prefix_bias=True, tol=None, lse_grad=True, edit_biases=None):
    """The biased triton op vs the float64 reference on the same inputs; returns the relative errors."""
    tol = TOL[case.dtype] if tol is None else tol
    bias_dtype = bias_dtype or case.dtype
    keys = _prefix_keys(case)
    bias = make_bias(case.batch, case.hq, case.lq, case.lk, bias_layout, bias_dtype) if attn_bias else None
    pbias = (make_bias(case.batch, case.hq, case.lq, keys, prefix_bias_layout, bias_dtype)
             if prefix_bias and keys else None)
    if edit_biases is not None:
        bias, pbias = edit_biases(bias, pbias)
    return check_against_reference(case, functools.partial(prefix_attention, backend="triton"), tol=tol,
                                   lse_grad=lse_grad, extra={"attn_bias": bias, "prefix_bias": pbias})


# (case, attn_bias layout, prefix_bias layout): pairwise over the contract's axes. The interpreter runs 16x16
# tiles, so Lk / P past 16 reach the mask-free interior tiles and the partial prefix tail tile.
CASES = [
    (Case(mode="none", hq=3, hkv=3, lq=5, lk=7, dim=16, causal=True), "broadcast", None),
    (Case(mode="none", hq=4, hkv=1, lq=6, lk=9, dim=40, causal=False, padding="holes"), "transposed", None),
    (Case(mode="shared", hq=4, hkv=2, lq=5, lk=7, plen=3, dim=32, causal=True, padding="holes"), "broadcast",
     "batch"),
    (Case(mode="shared", batch=1, hq=1, hkv=1, lq=18, lk=36, plen=19, dim=16, causal=True, padding="right"),
     "sliced", "broadcast"),
    (Case(mode="per_sample", hq=4, hkv=1, lq=6, lk=6, plen=5, dim=24, causal=False, padding="left"), "batch",
     "expanded"),
    (Case(mode="per_sample", batch=3, hq=2, hkv=2, lq=4, lk=5, plen=1, dim=8, causal=True), "heads_expanded",
     "transposed"),
    (Case(mode="pool", hq=4, hkv=2, lq=5, lk=7, plen=7, dim=64, causal=True, padding="holes"), "expanded",
     "sliced"),
    (Case(mode="pool_slots", batch=2, hq=4, hkv=2, lq=3, lk=9, plen=5, dim=16, causal=False), "batch",
     "heads_expanded"),
    (Case(mode="pool_slots", hq=2, hkv=1, lq=5, lk=6, plen=2, dim=16, causal=True, padding="empty_row"),
     "broadcast", "batch"),
    # decode: one query row per sample, the T5 decoder step
    (Case(mode="shared", batch=3, hq=4, hkv=4, lq=1, lk=9, plen=3, dim=32, causal=True, padding="left"),
     "broadcast", "broadcast"),
    (Case(mode="pool_slots", hq=2, hkv=1, lq=1, lk=1, plen=6, dim=16, causal=True), "sliced", "batch"),
    # softcap and sliding window (the bias is added after the cap)
    (Case(mode="shared", hq=2, hkv=1, lq=7, lk=11, plen=4, dim=16, causal=True, softcap=1.5, window=4), "batch",
     "batch"),
    (Case(mode="per_sample", hq=2, hkv=2, lq=6, lk=6, plen=3, dim=16, causal=False, window=2), "transposed",
     "broadcast"),
    # head dims: odd, and the largest the kernels take
    (Case(mode="shared", batch=1, hq=2, hkv=1, lq=3, lk=4, plen=2, dim=100, causal=True), "broadcast", "batch"),
    (Case(mode="pool", batch=2, hq=2, hkv=2, lq=2, lk=3, plen=3, dim=256, causal=False), "batch", "broadcast"),
]


@pytest.mark.parametrize("case,bias_layout,prefix_bias_layout", CASES,
                         ids=[f"{c}-{a}-{p}" for c, a, p in CASES])
def test_biased_triton_matches_reference(case, bias_layout, prefix_bias_layout):
    check_biased(case, bias_layout=bias_layout, prefix_bias_layout=prefix_bias_layout or "batch")


@pytest.mark.parametrize("which", ["attn_bias_only", "prefix_bias_only"])
def test_one_bias_alone(which):
    case = Case(mode="pool_slots", hq=2, hkv=1, lq=3, lk=5, plen=3, dim=16, causal=True, padding="holes")
    check_biased(case, attn_bias=which == "attn_bias_only", prefix_bias=which == "prefix_bias_only")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_half_precision(dtype):
    case = Case(mode="pool_slots", hq=2, hkv=1, lq=4, lk=6, plen=5, dim=32, causal=True, padding="holes",
                dtype=dtype)
    check_biased(case, bias_layout="broadcast", prefix_bias_layout="batch")


@pytest.mark.parametrize("bias_dtype", [torch.float64, F16, BF16])
def test_bias_dtype_differs_from_q(bias_dtype):
    """The kernels read the bias in its own dtype (T5 computes position_bias in the model's dtype)."""
    case = Case(mode="shared", hq=2, hkv=1, lq=4, lk=6, plen=3, dim=16, causal=False)
    check_biased(case, bias_dtype=bias_dtype, bias_layout="batch", prefix_bias_layout="broadcast")


def test_minus_inf_bias_hides_keys():
    """A -inf bias hides a key, as a mask does (T5 folds its masks into position_bias)."""
    def hide(bias, pbias):
        bias, pbias = bias.clone(), pbias.clone()
        bias[0, 0, 2, ::2] = float("-inf")
        bias[1, :, 0, :] = float("-inf")  # a row that sees only prefix keys
        pbias[:, 1, 3, 0] = float("-inf")
        pbias[0, 0, 4, :] = float("-inf")  # a row that sees only sequence keys
        return bias, pbias

    case = Case(mode="per_sample", hq=2, hkv=1, lq=5, lk=7, plen=3, dim=16, causal=False)
    check_biased(case, bias_layout="batch", prefix_bias_layout="batch", edit_biases=hide)


def test_minus_inf_bias_on_every_key_of_a_row():
    """A row whose every key has a -inf bias gives out 0, lse -inf and no gradient (never NaN). The reference's
    autograd gives NaN there (logsumexp of all -inf), so the oracle is the reference with that row's bias zeroed and
    its incoming gradients dropped: every other row, and every gradient, must match it."""
    case = Case(mode="shared", hq=2, hkv=1, lq=5, lk=7, plen=3, dim=16, causal=False)
    inputs = make_inputs(case)
    names = differentiable(inputs)
    leaves = [inputs[n].clone().requires_grad_(True) for n in names]
    ref_leaves = [inputs[n].double().requires_grad_(True) for n in names]
    bias, pbias = torch.randn(1, 2, 5, 7), torch.randn(2, 2, 5, 3)
    hidden = torch.zeros(5, dtype=torch.bool)
    hidden[1] = True
    out, lse = prefix_attention(*leaves, causal=False, backend="triton", return_lse=True,
                                attn_bias=bias.masked_fill(hidden[:, None], float("-inf")),
                                prefix_bias=pbias.masked_fill(hidden[:, None], float("-inf")))
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1])) and (lse[:, :, 1] == float("-inf")).all()
    ref_out, ref_lse = reference.prefix_attention(
        *ref_leaves, causal=False, return_lse=True, attn_bias=bias.double().masked_fill(hidden[:, None], 0.0),
        prefix_bias=pbias.double().masked_fill(hidden[:, None], 0.0))
    shown = ~hidden[:, None]
    assert relative_error(out * shown, ref_out * shown) < 1e-5
    assert relative_error(lse[:, :, ~hidden], ref_lse[:, :, ~hidden]) < 1e-5
    # random incoming gradients on the hidden row too (out there is a constant 0, lse a constant -inf): none leak
    grad_out, grad_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out.float(), grad_lse.float()))
    ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_leaves, (grad_out.masked_fill(hidden[:, None], 0.0),
                                                                     grad_lse.masked_fill(hidden, 0.0)))
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert relative_error(g, rg) < 1e-4


def test_bias_changes_the_result():
    """The kernels do read the bias: the biased and unbiased outputs differ, and the bias-free call agrees."""
    case = Case(mode="shared", hq=2, hkv=2, lq=4, lk=5, plen=3, dim=16)
    inputs = make_inputs(case)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"])
    bias, pbias = torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 3)
    plain = prefix_attention(*args, backend="triton")
    biased = prefix_attention(*args, backend="triton", attn_bias=bias, prefix_bias=pbias)
    zero = prefix_attention(*args, backend="triton", attn_bias=torch.zeros_like(bias))
    assert relative_error(biased, plain) > 1e-2
    assert relative_error(zero, plain) < 1e-6


def test_inference_and_training_calls_agree():
    """No-grad calls skip the custom-op dispatch; both paths give the same tensors."""
    case = Case(mode="pool_slots", hq=2, hkv=1, lq=3, lk=5, plen=2, dim=16)
    inputs = make_inputs(case)
    bias, pbias = torch.randn(2, 2, 3, 5), torch.randn(1, 2, 3, 6)
    kw = dict(prefix_index=inputs["prefix_index"], backend="triton", attn_bias=bias, prefix_bias=pbias)
    with torch.no_grad():
        fast = prefix_attention(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], **kw)
    q = inputs["q"].clone().requires_grad_(True)
    graded = prefix_attention(q, inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], **kw)
    assert graded.grad_fn is not None
    assert torch.equal(fast, graded.detach())


def test_compiled_biased_triton_call():
    """The biased Triton path is a custom op: opaque to torch.compile, same values and gradients as eager."""
    case = Case(mode="shared", hq=2, hkv=1, lq=4, lk=5, plen=3, dim=16, causal=True)
    inputs = make_inputs(case)
    bias, pbias = torch.randn(1, 2, 4, 5), torch.randn(2, 2, 4, 3)

    def run(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, backend="triton", attn_bias=bias, prefix_bias=pbias)

    leaves = [inputs[n].clone().requires_grad_(True) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    compiled_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    eager = run(*leaves)
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)(*compiled_leaves)
    assert relative_error(compiled, eager) < 1e-6
    grad = torch.randn_like(eager)
    eager.backward(grad)
    compiled.backward(grad)
    for a, b in zip(compiled_leaves, leaves):
        assert relative_error(a.grad, b.grad) < 1e-6


@pytest.mark.parametrize("bad", [3, -2])
def test_biased_triton_refuses_a_bad_pool_index(bad):
    q = torch.randn(2, 2, 3, 16)
    k = v = torch.randn(2, 2, 4, 16)
    pool = torch.randn(3, 2, 2, 16)
    with pytest.raises(ValueError, match="prefix_index"):
        prefix_attention(q, k, v, pool, pool, prefix_index=torch.tensor([0, bad]), attn_bias=torch.randn(1, 2, 3, 4),
                         backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# Backend choice for biased calls
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_cuda,triton_reason,expected", [
    (True, None, "triton"),  # a GPU call the kernels cover: Triton
    (True, "triton is not installed", "torch"),  # ... or the exact torch path
    (False, None, "torch"),  # CPU: the torch path (the interpreter is for tests)
])
def test_auto_routes_biased_calls(monkeypatch, is_cuda, triton_reason, expected):
    real = TritonBackend.not_supported_reasons
    monkeypatch.setattr(TritonBackend, "not_supported_reasons",
                        classmethod(lambda cls, args, grad: [triton_reason] if triton_reason else real(args, grad)))
    if is_cuda:  # CPU tensors under the interpreter, walked in CUDA's order
        monkeypatch.setitem(dispatch.PRIORITY, "cpu", dispatch.PRIORITY["cuda"])
    q, k = torch.randn(1, 2, 3, 16, requires_grad=True), torch.randn(1, 2, 4, 16)
    args = check_prefix_attention_args(q, k, k, None, None, None, None, True, None, None, None,
                                       attn_bias=torch.randn(1, 2, 3, 4))
    assert dispatch.resolve_backend("auto", args, True) == expected


def test_auto_on_cpu_runs_the_torch_path(monkeypatch):
    calls = []
    real = TritonBackend.forward
    monkeypatch.setattr(TritonBackend, "forward", classmethod(lambda cls, args: calls.append(1) or real(args)))
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    bias = torch.randn(1, 2, 3, 4)
    out = prefix_attention(q, k, v, attn_bias=bias)
    assert not calls
    assert relative_error(out, reference.prefix_attention(q, k, v, attn_bias=bias)) < 1e-5
    prefix_attention(q, k, v, attn_bias=bias, backend="triton")
    assert calls == [1]


def test_refusals_name_the_reason():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    bias = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="backend='cuda'.*CUDA kernels take no attn_bias"):
        prefix_attention(q, k, v, attn_bias=bias, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton'.*float16, bfloat16 or float32 inputs"):
        prefix_attention(q.double(), k.double(), v.double(), attn_bias=bias, backend="triton")
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(ValueError, match="backend='triton'.*`attn_bias`"):
            prefix_attention(q, k, v, attn_bias=bias.to(torch.float8_e4m3fn), backend="triton")
    with pytest.raises(ValueError, match="requires grad"):
        prefix_attention(q, k, v, attn_bias=bias.requires_grad_(True), backend="triton")


def test_flop_counter_counts_the_biased_op():
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(2, 2, 3, 16, requires_grad=True), torch.randn(2, 2, 4, 16, requires_grad=True),
               torch.randn(2, 2, 4, 16, requires_grad=True))
    pk = torch.randn(2, 5, 16, requires_grad=True)
    bias = torch.randn(1, 2, 3, 4)
    with FlopCounterMode(display=False) as counter:
        prefix_attention(q, k, v, pk, pk, attn_bias=bias, backend="triton").sum().backward()
    assert counter.get_total_flops() == (4 + 10) * 2 * 2 * 3 * (4 + 5) * 16
