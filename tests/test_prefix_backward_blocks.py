"""The shared prefix's written-out CPU backward (prefix_attention_cpu_flash) has two block strategies: every head
in one batched matmul per term (small score blocks) and a per-head / per-GQA-group loop (large ones). Both give
the reference's gradients for q / k / v in [B, H, L, D] memory and in transformers' [B, L, H, D] memory, for MHA,
GQA and MQA, in float32 and float64."""
import pytest
import torch

from fastprompt import reference
from fastprompt.ops import prefix_attention
from fastprompt.ops import prefix_attention_cpu_flash as cpu_flash


def _leaves(layout, b, hq, hkv, lq, lk, d, p, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(heads, length):
        if layout == "bhld":
            t = torch.randn(b, heads, length, d, generator=g, dtype=dtype)
        else:  # transformers: [B, L, H, D] memory viewed as [B, H, L, D]
            t = torch.randn(b, length, heads, d, generator=g, dtype=dtype).transpose(1, 2)
        return t.requires_grad_()

    q, k, v = rnd(hq, lq), rnd(hkv, lk), rnd(hkv, lk)
    pk = torch.randn(hkv, p, d, generator=g, dtype=dtype).requires_grad_()
    pv = torch.randn(hkv, p, d, generator=g, dtype=dtype).requires_grad_()
    grad = torch.randn(b, hq, lq, d, generator=g, dtype=dtype)
    return (q, k, v, pk, pv), grad


@pytest.mark.parametrize("block", ["fused kernel", "per head"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_prefix_backward_blocks_match_the_reference(monkeypatch, block, layout, heads, dtype):
    if block == "per head":
        monkeypatch.setattr(cpu_flash, "_KERNEL_BLOCK_BYTES", 0)
    hq, hkv = heads
    leaves, grad = _leaves(layout, 3, hq, hkv, 5, 7, 8, 4, dtype, seed=hq * 10 + hkv)
    out = prefix_attention(*leaves, causal=True)
    got = torch.autograd.grad(out, leaves, grad)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    ref_out = reference.prefix_attention(*wide, causal=True)
    want = torch.autograd.grad(ref_out, wide, grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (out.double() - ref_out).norm() / ref_out.norm() < tol
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want):
        assert (a.double() - b).norm() / b.norm() < tol, name


def test_the_block_choice_follows_the_score_block_size(monkeypatch):
    calls = []
    original = cpu_flash._kernel_prefix_backward
    monkeypatch.setattr(cpu_flash, "_kernel_prefix_backward", lambda *a: calls.append(1) or original(*a))
    leaves, grad = _leaves("blhd", 2, 4, 2, 6, 6, 8, 3, torch.float32, seed=1)
    torch.autograd.grad(prefix_attention(*leaves, causal=True), leaves, grad)
    assert calls  # 2·4·6·3 scores: the kernel
    monkeypatch.setattr(cpu_flash, "_KERNEL_BLOCK_BYTES", 2 * 4 * 6 * 3 * 4 - 1)
    calls.clear()
    torch.autograd.grad(prefix_attention(*leaves, causal=True), leaves, grad)
    assert not calls
