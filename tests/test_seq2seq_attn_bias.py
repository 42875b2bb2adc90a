"""prefix_attention with additive score biases (T5's relative position bias) vs the float64 reference."""
import pytest
import torch

from fastprompt import reference
from fastprompt.ops import prefix_attention


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(mode, batch=3, hq=4, hkv=2, lq=5, lk=7, p=3, d=8, pool=4, slots=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, v = r(batch, hq, lq, d), r(batch, hkv, lk, d), r(batch, hkv, lk, d)
    index = None
    if mode == "shared":
        pk, pv, keys = r(hkv, p, d), r(hkv, p, d), p
    elif mode == "per_sample":
        pk, pv, keys = r(batch, hkv, p, d), r(batch, hkv, p, d), p
    else:
        pk, pv, keys = r(pool, hkv, p, d), r(pool, hkv, p, d), slots * p
        index = torch.tensor([[0, 3], [2, -1], [1, 1]])[:batch]
    mask = torch.ones(batch, lk, dtype=torch.bool)
    mask[1, :2] = False
    mask[2, 4] = False
    return q, k, v, pk, pv, index, mask, r(1, hq, lq, lk), r(batch, hq, lq, keys)


@pytest.mark.parametrize("mode", ["shared", "per_sample", "pool"])
@pytest.mark.parametrize("causal", [True, False])
def test_biased_forward_backward_matches_reference(mode, causal):
    q, k, v, pk, pv, index, mask, bias, pbias = _inputs(mode)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    out = prefix_attention(*leaves, prefix_index=index, key_padding_mask=mask, causal=causal, scale=1.0,
                           attn_bias=bias, prefix_bias=pbias, backend="torch")
    refs = [t.clone().requires_grad_(True) for t in (q, k, v, pk, pv)]
    ref = reference.prefix_attention(*refs, prefix_index=index, key_padding_mask=mask, causal=causal, scale=1.0,
                                     attn_bias=bias, prefix_bias=pbias)
    assert _rel(out, ref) < 1e-10
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(leaves, refs):
        assert _rel(a.grad, b.grad) < 1e-10


def test_bias_changes_the_result_and_float32_path():
    q, k, v, pk, pv, index, mask, bias, pbias = _inputs("shared")
    plain = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask)
    biased = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, attn_bias=bias, prefix_bias=pbias)
    assert _rel(plain, biased) > 1e-2
    f32 = prefix_attention(*(t.float() for t in (q, k, v, pk, pv)), key_padding_mask=mask,
                           attn_bias=bias.float(), prefix_bias=pbias.float())
    assert _rel(f32.double(), biased) < 1e-5
    only_seq = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, attn_bias=bias, backend="reference")
    only_seq_torch = prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, attn_bias=bias)
    assert _rel(only_seq_torch, only_seq) < 1e-10
    no_prefix = prefix_attention(q, k, v, key_padding_mask=mask, attn_bias=bias)
    assert _rel(no_prefix, reference.prefix_attention(q, k, v, key_padding_mask=mask, attn_bias=bias)) < 1e-10


def test_bias_errors():
    q, k, v, pk, pv, index, mask, bias, pbias = _inputs("shared")
    with pytest.raises(ValueError, match="attn_bias.*must be"):
        prefix_attention(q, k, v, pk, pv, attn_bias=bias[..., :-1])
    with pytest.raises(ValueError, match="prefix_bias.*no prefix"):
        prefix_attention(q, k, v, prefix_bias=pbias)
    with pytest.raises(ValueError, match="requires grad"):
        prefix_attention(q, k, v, pk, pv, attn_bias=bias.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="backend='cuda'.*CUDA kernels take no attn_bias"):
        prefix_attention(q, k, v, pk, pv, attn_bias=bias, backend="cuda")
    with pytest.raises(TypeError, match="attn_bias"):
        prefix_attention(q, k, v, pk, pv, attn_bias=[1.0])


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("bad", [3, -2, 10**6])
def test_biased_call_refuses_a_bad_pool_index(backend, bad):
    """The biased path runs no forward-op body, so it checks the pool index itself (eager and compiled alike)."""
    q = torch.randn(2, 2, 3, 8)
    k = v = torch.randn(2, 2, 4, 8)
    pool = torch.randn(3, 2, 2, 8)
    bias = torch.randn(1, 2, 3, 4)
    index = torch.tensor([0, bad])
    with pytest.raises(ValueError, match="prefix_index"):
        prefix_attention(q, k, v, pool, pool, prefix_index=index, attn_bias=bias, backend=backend)
    compiled = torch.compile(lambda i: prefix_attention(q, k, v, pool, pool, prefix_index=i, attn_bias=bias,
                                                        backend=backend), backend="aot_eager")
    with pytest.raises(Exception, match="prefix_index"):
        compiled(index)
