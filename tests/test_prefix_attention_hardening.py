"""Inputs that once gave a wrong result or killed the process, on every backend, against the float64 reference
(out, lse and all five gradients), and the index checks under torch.compile (issue 10, items 1-3 and 5).

- strided / transposed views of q, k, v, prefix_k, prefix_v: the CPU flash kernel read a row of D values as one
  contiguous run whatever the last-dim stride (wrong output and gradients on PyTorch <= 2.13);
- Lk = 0 with a prefix: the CPU flash kernel divided by zero (SIGFPE);
- prefix_index out of range inside a compiled function: the check was skipped while tracing (garbage reads).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest.py sets it too)

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fastprompt as fp  # noqa: E402
from attention_cases import Case, check_against_reference  # noqa: E402
from layouts import LAYOUTS, check_layout, relayout  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", "auto", "reference"] + (["triton"] if HAS_TRITON else [])
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _relaid_op(backend, layout, only=None):
    """prefix_attention with every tensor argument (or those in `only`) re-laid out first."""
    def op(q, k, v, pk, pv, **kwargs):
        tensors = dict(q=q, k=k, v=v, pk=pk, pv=pv)
        for name, t in tensors.items():
            if only is None or name in only:
                tensors[name] = relayout(t, layout)
                check_layout(tensors[name], layout)
        return fp.ops.prefix_attention(*tensors.values(), backend=backend, **kwargs)
    return op


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("mode", ["none", "shared", "per_sample", "pool_slots"])
def test_views_match_reference(backend, layout, mode):
    case = Case(batch=2, hq=4, hkv=2, lq=5, lk=7, dim=16, plen=3, mode=mode, padding="holes",
                causal=mode != "per_sample", window=4 if mode == "pool_slots" else None)
    check_against_reference(case, _relaid_op(backend, layout), tol=TOL[case.dtype])


@pytest.mark.parametrize("name", ["q", "k", "v", "pk", "pv"])
def test_one_strided_argument_on_the_cpu_path(name):
    # the case: a single `[..., ::2]` argument among contiguous ones, shared prefix, no lse gradient
    # (the fused CPU backward)
    case = Case(batch=1, hq=2, hkv=1, lq=4, lk=4, dim=16, plen=3, mode="shared")
    check_against_reference(case, _relaid_op("torch", "strided", only={name}), tol=TOL[case.dtype],
                            lse_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lse_grad", [True, False])
def test_strided_views_every_dtype_and_backward_path(dtype, lse_grad):
    case = Case(batch=2, hq=2, hkv=1, lq=3, lk=6, dim=32, plen=2, mode="pool_slots", padding="left", dtype=dtype)
    check_against_reference(case, _relaid_op("torch", "strided"), tol=TOL[dtype], lse_grad=lse_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["shared", "per_sample", "pool", "pool_slots"])
@pytest.mark.parametrize("causal", [True, False])
def test_no_sequence_keys_gives_the_prefix_only_result(backend, mode, causal):
    case = Case(batch=2, hq=4, hkv=2, lq=3, lk=0, dim=16, plen=5, mode=mode, causal=causal)
    for lse_grad in (True, False):  # both backward paths of the torch backend
        errors = check_against_reference(case, _relaid_op(backend, "contiguous"), tol=TOL[case.dtype],
                                         lse_grad=lse_grad)
        assert set(errors) == {"out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_at_all_gives_zeros(backend):
    q = torch.randn(1, 2, 3, 16, requires_grad=True)
    k = v = torch.randn(1, 1, 0, 16, requires_grad=True)
    out, lse = fp.ops.prefix_attention(q, k, v, backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# --- prefix_index range checks under torch.compile -----------------------------------------------------------


def _pool_inputs():
    q, k, v = torch.randn(2, 2, 3, 16), torch.randn(2, 1, 4, 16), torch.randn(2, 1, 4, 16)
    return q, k, v, torch.randn(3, 1, 2, 16), torch.randn(3, 1, 2, 16)


BAD_INDICES = [[0, 3], [-2, 0], [0, 10**6]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_call_refuses_a_bad_prefix_index(backend):
    torch._dynamo.reset()
    q, k, v, pk, pv = _pool_inputs()

    def attend(q, k, v, pk, pv, index):
        return fp.ops.prefix_attention(q, k, v, pk, pv, prefix_index=index, backend=backend)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    good = torch.tensor([2, -1])
    torch.testing.assert_close(compiled(q, k, v, pk, pv, good), attend(q, k, v, pk, pv, good))
    for bad in BAD_INDICES:
        with pytest.raises(ValueError, match=r"`prefix_index` entries must be in \[-1, N=3\)"):
            attend(q, k, v, pk, pv, torch.tensor(bad))  # eager
        with pytest.raises(ValueError, match=r"`prefix_index` entries must be in \[-1, N=3\)"):
            compiled(q, k, v, pk, pv, torch.tensor(bad))


@pytest.mark.slow  # inductor's C++ compile: ~1-2 minutes on a shared CPU
def test_inductor_compiled_call_refuses_a_bad_prefix_index():
    torch._dynamo.reset()
    q, k, v, pk, pv = _pool_inputs()
    compiled = torch.compile(lambda index: fp.ops.prefix_attention(q, k, v, pk, pv, prefix_index=index) * 2)
    compiled(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="`prefix_index` entries must be in"):
        compiled(torch.tensor([0, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_with_an_explicit_backend(backend):
    torch._dynamo.reset()
    q, k, v, pk, pv = (t.requires_grad_() for t in _pool_inputs())
    index = torch.tensor([[1, -1], [0, 0]], dtype=torch.int8)

    def step(q, k, v, pk, pv):
        out, lse = fp.ops.prefix_attention(q, k, v, pk, pv, prefix_index=index, backend=backend, return_lse=True)
        return out.square().sum() + lse.sum()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        loss = fn(q, k, v, pk, pv)
        results.append([loss] + list(torch.autograd.grad(loss, (q, k, v, pk, pv))))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["none", "shared", "pool_slots"])
@pytest.mark.parametrize("lse_grad", [True, False])
def test_empty_batch(backend, mode, lse_grad):
    # B = 0 (e.g. an empty shard): empty results and gradients, no crash; a [0, S] prefix_index is a valid pool index
    q = torch.randn(0, 2, 3, 16, requires_grad=True)
    k, v = torch.randn(0, 1, 4, 16, requires_grad=True), torch.randn(0, 1, 4, 16, requires_grad=True)
    pk = pv = index = None
    if mode == "shared":
        pk, pv = torch.randn(1, 2, 16, requires_grad=True), torch.randn(1, 2, 16, requires_grad=True)
    elif mode == "pool_slots":
        pk, pv = torch.randn(3, 1, 2, 16, requires_grad=True), torch.randn(3, 1, 2, 16, requires_grad=True)
        index = torch.zeros(0, 2, dtype=torch.long)
    out, lse = fp.ops.prefix_attention(q, k, v, pk, pv, prefix_index=index, backend=backend, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    (out.sum() + (lse.sum() if lse_grad else 0)).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    if pk is not None:
        assert not pk.grad.any() and not pv.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["none", "shared", "pool_slots"])
@pytest.mark.parametrize("biased", [False, True])
def test_empty_batch_with_dropout(backend, mode, biased):
    # B = 0 with attention dropout (a training step on an empty shard): the same empty results and zero prefix
    # gradients as the reference, no crash
    torch.manual_seed(0)
    q = torch.randn(0, 2, 3, 16)
    k, v = torch.randn(0, 1, 4, 16), torch.randn(0, 1, 4, 16)
    pk = pv = index = None
    if mode == "shared":
        pk, pv = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    elif mode == "pool_slots":
        pk, pv = torch.randn(3, 1, 2, 16), torch.randn(3, 1, 2, 16)
        index = torch.zeros(0, 2, dtype=torch.long)
    biases = {}
    if biased:
        biases["attn_bias"] = torch.randn(1, 2, 3, 4)
        if pk is not None:
            biases["prefix_bias"] = torch.randn(1, 2, 3, (1 if index is None else index.shape[1]) * 2)
    results = []
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v) + ((pk, pv) if pk is not None else ())]
        out, lse = fp.ops.prefix_attention(*leaves[:3], *(leaves[3:] or (None, None)), prefix_index=index,
                                           dropout_p=0.3, backend=name, return_lse=True, **biases)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        grads = torch.autograd.grad(out.sum() + lse.sum(), leaves, allow_unused=True)
        results.append([out, lse] + [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)])
    for got, expected in zip(*results):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
