"""The biased CPU path (prefix_attention_torch/cpu_flash_bias.py: T5's bias as the fused flash kernel's additive masks, two parts
merged by lse) vs the float64 reference, over the shapes its shortcuts special-case: decode (Lq = 1), Lq == Lk
causal (the kernel's own is_causal with the bias as it is), more queries than keys, windows, empty sequences and
pools, broadcast and sliced biases, transformers' [B, L, H, D] memory, GQA, a differentiated lse."""
import pytest
import torch

from fastprompt import reference
from fastprompt.ops import prefix_attention
from fastprompt.ops import prefix_attention_torch as torch_path


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _rand(g, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=dtype)


def _case(mode="shared", batch=3, hq=4, hkv=2, lq=5, lk=7, p=3, d=8, slots=2, pool=4, bias_batch=1, layout="bhld",
          padded=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def act(length, heads):  # transformers hands q/k/v over as [B, L, H, D] memory viewed [B, H, L, D]
        t = _rand(g, batch, length, heads, d, dtype=dtype)
        return t.transpose(1, 2) if layout == "blhd" else t.transpose(1, 2).contiguous()

    q, k, v = act(lq, hq), act(lk, hkv), act(lk, hkv)
    index = None
    if mode == "shared":
        pk, pv, keys = _rand(g, hkv, p, d, dtype=dtype), _rand(g, hkv, p, d, dtype=dtype), p
    elif mode == "per_sample":
        pk, pv, keys = _rand(g, batch, hkv, p, d, dtype=dtype), _rand(g, batch, hkv, p, d, dtype=dtype), p
    else:
        pk, pv, keys = _rand(g, pool, hkv, p, d, dtype=dtype), _rand(g, pool, hkv, p, d, dtype=dtype), slots * p
        index = torch.tensor([[0, 3], [-1, -1], [1, 2]])[:batch, :slots]
    mask = None
    if padded:
        mask = torch.ones(batch, lk, dtype=torch.bool)
        mask[1, :] = False  # a row with no visible sequence key
        mask[2, :2] = False
    return dict(q=q, k=k, v=v, pk=pk, pv=pv, index=index, mask=mask,
                bias=_rand(g, bias_batch, hq, lq, lk, dtype=dtype), pbias=_rand(g, bias_batch, hq, lq, keys, dtype=dtype))


def _check(c, causal=True, window=None, with_bias=True, with_pbias=True, grads=True, tol=1e-10, lse_grad=False):
    bias = c["bias"] if with_bias else None
    pbias = c["pbias"] if with_pbias else None
    kw = dict(prefix_index=c["index"], key_padding_mask=c["mask"], causal=causal, scale=1.0, window=window,
              attn_bias=bias, prefix_bias=pbias)
    leaves = [c[n].detach().clone().requires_grad_(grads) for n in ("q", "k", "v", "pk", "pv")]
    refs = [c[n].detach().double().clone().requires_grad_(grads) for n in ("q", "k", "v", "pk", "pv")]
    out, lse = prefix_attention(*leaves, backend="torch", return_lse=True, **kw)
    wide = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    ref, ref_lse = reference.prefix_attention(*refs, return_lse=True, **wide)
    assert torch.isfinite(out).all()
    assert _rel(out.double(), ref) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and _rel(lse.double()[finite], ref_lse[finite]) < max(tol, 1e-7)
    if not grads:
        return
    g = torch.Generator().manual_seed(7)
    grad = _rand(g, *out.shape, dtype=out.dtype)
    loss = (out * grad).sum() + ((lse * lse.isfinite()).nan_to_num(0.0).sum() if lse_grad else 0.0)
    ref_loss = (ref * grad.double()).sum() + ((ref_lse * finite).nan_to_num(0.0).sum() if lse_grad else 0.0)
    loss.backward()
    ref_loss.backward()
    for name, a, b in zip(("q", "k", "v", "prefix_k", "prefix_v"), leaves, refs):
        assert _rel(a.grad.double(), b.grad) < tol, name


@pytest.mark.parametrize("mode", ["shared", "per_sample", "pool"])
def test_decode_step_no_grad_and_grad(mode):
    c = _case(mode, lq=1, lk=6, layout="blhd")
    _check(c)
    with torch.no_grad():  # the direct kernel path (no autograd.Function)
        _check(c, grads=False)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("bias_batch", [1, 3])
def test_square_causal_runs_the_kernels_causality_with_the_bias(layout, bias_batch):
    _check(_case(lq=6, lk=6, layout=layout, bias_batch=bias_batch))


@pytest.mark.parametrize("mode", ["shared", "pool"])
def test_more_queries_than_keys_padding_and_windows(mode):
    _check(_case(mode, lq=7, lk=4))  # the first queries see no sequence key (bottom-right causality)
    _check(_case(mode, lq=5, lk=9, padded=True), causal=False, window=3)
    _check(_case(mode, lq=5, lk=9, padded=True), causal=True, window=2)


def test_one_bias_only_and_empty_sequence():
    c = _case(lq=4, lk=4, padded=True)
    _check(c, with_pbias=False)
    _check(c, with_bias=False)
    _check(_case(lq=3, lk=0, bias_batch=1), causal=False, with_bias=False)


def test_sliced_bias_as_t5_hands_it_over():
    c = _case(lq=1, lk=5, layout="blhd")
    wide = torch.randn(1, 4, 1, 9, dtype=torch.float64)
    c["bias"] = wide[..., :5]  # position_bias[..., :key_length]: a view with a longer row stride
    _check(c)


def test_differentiated_lse_falls_back_to_the_exact_backward():
    _check(_case(lq=5, lk=6, padded=True), lse_grad=True)
    _check(_case("pool", lq=5, lk=6), lse_grad=True)


def test_float32_and_the_fused_path_is_taken(monkeypatch):
    c = _case(lq=6, lk=6, layout="blhd", dtype=torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("the explicit composition ran")

    monkeypatch.setattr(torch_path, "explicit_forward", refuse)
    monkeypatch.setattr(torch_path, "explicit_backward", refuse)
    _check(c, tol=2e-6)
    _check(_case("per_sample", lq=1, lk=6, dtype=torch.float32), tol=2e-6)


def test_low_precision_keeps_the_float32_bias_path():
    c = _case(lq=4, lk=6, dtype=torch.bfloat16)
    _check(c, tol=2e-2)
