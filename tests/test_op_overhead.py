"""The per-call fast paths (fastprompt/ops/prefix_attention.py's eager inference call, the plain-torch gather/mix
paths) give the same results as the paths they bypass, and bypass nothing that must still run (the index check)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastprompt import reference
from fastprompt.ops import prefix_attention
from fastprompt.ops.gather_prompts import gather_prompts
from fastprompt.ops.mix_prompts import mix_prompts


def _inputs(lq, lk, prefix="shared", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 4, lq, 8, generator=g)
    k, v = torch.randn(3, 2, lk, 8, generator=g), torch.randn(3, 2, lk, 8, generator=g)
    shape = {"shared": (2, 5, 8), "pool": (4, 2, 5, 8)}[prefix]
    return q, k, v, torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


@pytest.mark.parametrize("lq,lk", [(1, 7), (1, 1), (5, 5), (3, 9)])
@pytest.mark.parametrize("prefix", ["shared", "pool"])
def test_eager_inference_path_equals_the_custom_op_path(lq, lk, prefix):
    q, k, v, pk, pv = _inputs(lq, lk, prefix)
    index = torch.tensor([[3, -1], [0, 2], [-1, -1]]) if prefix == "pool" else None
    with torch.no_grad():
        fast = prefix_attention(q, k, v, pk, pv, prefix_index=index, causal=True)
        with FlopCounterMode(display=False) as counter:  # a dispatch mode: the call goes through the custom op
            via_op = prefix_attention(q, k, v, pk, pv, prefix_index=index, causal=True)
    assert counter.get_total_flops() > 0  # the op's FLOP formula still sees the call
    assert torch.equal(fast, via_op)
    ref = reference.prefix_attention(q.double(), k.double(), v.double(), pk.double(), pv.double(),
                                     prefix_index=index, causal=True)
    assert (fast.double() - ref).norm() / ref.norm() < 1e-6


def test_pool_index_checked_on_every_call_of_the_fast_path():
    q, k, v, pk, pv = _inputs(2, 4, "pool")
    index = torch.tensor([0, 3, 1])
    prefix_attention(q, k, v, pk, pv, prefix_index=index)
    with torch.no_grad():  # the eager inference path
        prefix_attention(q, k, v, pk, pv, prefix_index=index)
    index[1] = 4  # out of range for a pool of 4 entries
    with pytest.raises(ValueError, match="prefix_index"), torch.no_grad():
        prefix_attention(q, k, v, pk, pv, prefix_index=index)
    with pytest.raises(ValueError, match="prefix_index"):  # and with gradients (the custom op)
        prefix_attention(q, k, v, pk, pv, prefix_index=torch.tensor([0, -2, 1]))


@pytest.mark.parametrize("index", [[[2, 0, 2], [1, 1, 0]], [[2, -1, 2], [-1, 1, 0]]])
def test_plain_gather_forward_and_backward_match_the_reference(index):
    pool = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    index = torch.tensor(index)
    grad = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    out = gather_prompts(pool, index)
    (dpool,) = torch.autograd.grad(out, pool, grad)
    ref = reference.gather_prompts(pool, index)
    (dref,) = torch.autograd.grad(ref, pool, grad)
    assert torch.equal(out, ref)
    torch.testing.assert_close(dpool, dref, rtol=1e-12, atol=1e-12)


def test_plain_dense_mix_matches_the_reference():
    pool = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 3, 5, dtype=torch.float64)
    got = torch.autograd.grad(mix_prompts(pool, weights), (pool, weights), grad)
    ref = torch.autograd.grad(reference.mix_prompts(pool, weights), (pool, weights), grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_plain_gather_refuses_an_out_of_range_index():
    with pytest.raises(ValueError, match="index values must lie in"):
        gather_prompts(torch.randn(3, 4), torch.tensor([0, 3]))


@pytest.mark.parametrize("index", [[2, 0, 2, 1], [2, -1, 0, -1], [-1, -1, -1, -1]])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_cpu_gather_without_a_range_pass_matches_the_reference(index, dtype):
    # the CPU path lets index_select bounds-check; an index it refuses is then looked at (empty slots or an error)
    pool = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    index = torch.tensor(index, dtype=dtype)
    grad = torch.randn(4, 5, 7, dtype=torch.float64)
    out = gather_prompts(pool, index)
    (dpool,) = torch.autograd.grad(out, pool, grad)
    ref = reference.gather_prompts(pool, index.long())
    (dref,) = torch.autograd.grad(ref, pool, grad)
    assert torch.equal(out, ref)
    torch.testing.assert_close(dpool, dref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [[0, 3], [-2, 0], [[1, -1], [3, 0]]])
def test_cpu_gather_refuses_an_out_of_range_index_with_the_ops_error(bad):
    pool = torch.randn(3, 4, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"index values must lie in \[-1, 2\]"):
        gather_prompts(pool, torch.tensor(bad))
