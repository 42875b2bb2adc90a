"""gather_prompts / mix_prompts vs the reference, float64, with gradients; Triton runs under TRITON_INTERPRET=1."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest
import torch

from fastprompt.ops.gather_prompts import gather_prompts
from fastprompt.ops.mix_prompts import mix_prompts
from fastprompt import reference_prompts as ref

BACKENDS = ["torch", "triton", "reference"]


def _pool(n=7, entry=(3, 5), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *entry, generator=g, dtype=dtype).requires_grad_()


def _grads(fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", [[3, 0, 6, 3, -1], [[1, -1, 4], [4, 4, 0], [-1, -1, -1], [6, 2, 1], [0, 0, 5]]])
def test_gather_matches_reference(backend, index):
    pool = _pool()
    index = torch.tensor(index)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(*index.shape, 3, 5, generator=g, dtype=torch.float64)
    out_ref, (dpool_ref,) = _grads(lambda: ref.gather_prompts(pool, index), [pool], grad_out)
    out, (dpool,) = _grads(lambda: gather_prompts(pool, index, backend=backend), [pool], grad_out)
    assert out.shape == (*index.shape, 3, 5)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(dpool, dpool_ref, rtol=1e-12, atol=1e-12)
    assert torch.all(out[index == -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mix_dense_matches_reference(backend):
    pool = _pool(n=5, entry=(2, 7))
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn(3, 2, 7, generator=g, dtype=torch.float64)
    out_ref, grads_ref = _grads(lambda: ref.mix_prompts(pool, weights), [pool, weights], grad_out)
    out, grads = _grads(lambda: mix_prompts(pool, weights, backend=backend), [pool, weights], grad_out)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mix_sparse_matches_reference(backend):
    pool = _pool(n=6, entry=(37,))
    g = torch.Generator().manual_seed(3)
    index = torch.tensor([[5, 1], [2, -1], [2, 2], [-1, -1]])
    weights = torch.randn(4, 2, generator=g, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn(4, 37, generator=g, dtype=torch.float64)
    out_ref, grads_ref = _grads(lambda: ref.mix_prompts(pool, weights, index), [pool, weights], grad_out)
    out, grads = _grads(lambda: mix_prompts(pool, weights, index, backend=backend), [pool, weights], grad_out)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.all(grads[1][index == -1] == 0)


def test_gather_float32_triton_vs_torch_large_entry():
    pool = _pool(n=4, entry=(1100,), dtype=torch.float32)  # more than one F tile
    index = torch.tensor([[3, 3, 0], [1, -1, 3]])
    grad_out = torch.ones(2, 3, 1100)
    out_t, (d_t,) = _grads(lambda: gather_prompts(pool, index, backend="torch"), [pool], grad_out)
    out_k, (d_k,) = _grads(lambda: gather_prompts(pool, index, backend="triton"), [pool], grad_out)
    torch.testing.assert_close(out_k, out_t)
    torch.testing.assert_close(d_k, d_t)
    assert torch.all(d_t[3] == 3) and torch.all(d_t[2] == 0)


def test_auto_on_cpu_is_torch_and_compiles_as_custom_op():
    pool = _pool(n=3, entry=(4,))
    index = torch.tensor([2, -1])
    out = gather_prompts(pool, index)
    torch.testing.assert_close(out, ref.gather_prompts(pool, index))
    assert torch.ops.fastprompt.gather_prompts.default is not None
    assert torch.ops.fastprompt.mix_prompts.default is not None


def test_opcheck_custom_ops():
    pool = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, -1, 0])
    torch.library.opcheck(torch.ops.fastprompt.gather_prompts.default, (pool, index, "torch"))
    weights = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastprompt.mix_prompts.default, (pool, weights, None, "torch"))


def test_triton_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gather_prompts(_pool(), torch.tensor([0]), backend="triton")


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda p: gather_prompts(p, torch.tensor([7])), ValueError, r"index values must lie in \[-1, 6\]"),
        (lambda p: gather_prompts(p, torch.tensor([-2])), ValueError, "index values"),
        (lambda p: gather_prompts(p, torch.tensor([0.0])), TypeError, "index must be an integer"),
        (lambda p: gather_prompts(p, torch.zeros(1, 1, 1, dtype=torch.long)), ValueError, r"index must be \[B\]"),
        (lambda p: gather_prompts(p.detach().long(), torch.tensor([0])), TypeError, "pool must be a floating"),
        (lambda p: gather_prompts(p, [0]), TypeError, "index must be a torch.Tensor"),
        (lambda p: gather_prompts(p, torch.tensor([0]), backend="fast"), ValueError, "backend must be one of"),
        (lambda p: gather_prompts(p, torch.tensor([0]), backend="cuda"), RuntimeError, "CUDA tensors"),
        (lambda p: mix_prompts(p, torch.ones(2, 6, dtype=torch.float64)), ValueError, "N = 7"),
        (lambda p: mix_prompts(p, torch.ones(2, 7)), TypeError, "weights must have pool's dtype"),
        (lambda p: mix_prompts(p, torch.ones(7, dtype=torch.float64)), ValueError, r"weights must be \[B, N\]"),
        (
            lambda p: mix_prompts(p, torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.long)),
            ValueError,
            "index must have weights' shape",
        ),
        (
            lambda p: mix_prompts(p, torch.ones(2, 2, dtype=torch.float64), torch.full((2, 2), 9)),
            ValueError,
            "index values",
        ),
    ],
)
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_pool())


# --- under torch.compile: fullgraph, and the index range refused at run time (issue 10, items 3 and 5) ---------


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_fullgraph_compile_matches_eager_and_refuses_bad_indices(backend):
    torch._dynamo.reset()
    pool = _pool(n=5, entry=(3, 4))
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_()

    def select(pool, weights, index):
        hard = gather_prompts(pool, index, backend=backend)
        soft = mix_prompts(pool, weights, index, backend=backend)
        return hard.square().sum() + (soft * soft.detach().sin()).sum()

    compiled = torch.compile(select, fullgraph=True, backend="aot_eager")
    index = torch.tensor([[4, -1, 4], [0, 2, 2]])  # duplicates and an empty slot
    results = []
    for fn in (select, compiled):
        loss = fn(pool, weights, index)
        results.append([loss] + list(torch.autograd.grad(loss, (pool, weights))))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-12, atol=1e-12)
    for bad in ([[0, 5, 1], [0, 0, 0]], [[0, -2, 1], [0, 0, 0]], [[10**6, 0, 0], [0, 0, 0]]):
        with pytest.raises(ValueError, match=r"index values must lie in \[-1, 4\]"):
            compiled(pool, weights, torch.tensor(bad))
