"""The shared prefix's CPU backward (prefix_attention_torch/cpu_flash.py) has four block strategies: the fused kernel over
the whole batch (small score blocks), the fused kernel over chunks of batch rows (each chunk's block within the
threshold), the written-out per-head / per-GQA-group loop (large blocks), and for one KV head (MQA) in [B, H, L, D]
memory the fused kernel as one single-head problem over all B·Hq·Lq rows. Each gives the reference's gradients for
q / k / v in [B, H, L, D] memory and in transformers' [B, L, H, D] memory, for MHA, GQA and MQA, in float32 and
float64."""
import pytest
import torch

from fastprompt import reference
from fastprompt.ops import prefix_attention
from fastprompt.ops.prefix_attention_torch import cpu_flash

BATCH, LQ, LK, DIM, PLEN = 3, 5, 7, 8, 4


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


def _force(monkeypatch, block, hq, dtype):
    """Make the shapes below take `block`; returns the strategy function it runs."""
    size = torch.empty((), dtype=dtype).element_size()
    row_block = hq * LQ * PLEN * size
    if block == "one KV head folded, row chunks":  # two batch rows per kernel call over B = 3
        monkeypatch.setattr(cpu_flash, "_FOLD_DQ_BYTES", 2 * hq * LQ * DIM * size)
    if not block.startswith("one KV head folded"):
        monkeypatch.setattr(cpu_flash, "_FOLD_SINGLE_KV_HEAD", False)
    if block == "batch chunks":  # two rows per chunk over B = 3: one full chunk and one short one
        monkeypatch.setattr(cpu_flash, "_KERNEL_BLOCK_BYTES", 2 * row_block)
    elif block == "per head":
        monkeypatch.setattr(cpu_flash, "_KERNEL_BLOCK_BYTES", row_block - 1)
    return {"whole batch kernel": "_kernel_prefix_backward", "batch chunks": "_chunked_kernel_prefix_backward",
            "per head": None, "one KV head folded": "_single_kv_head_prefix_backward",
            "one KV head folded, row chunks": "_flash_backward"}[block]


def _spy(monkeypatch, name):
    calls = []
    original = getattr(cpu_flash, name)
    monkeypatch.setattr(cpu_flash, name, lambda *a, **kw: calls.append(name) or original(*a, **kw))
    return calls


# (block, layout, (Hq, Hkv)): the fold exists only for one KV head in [B, H, L, D] memory
_COMBOS = [(block, layout, heads) for block in ("whole batch kernel", "batch chunks", "per head")
           for layout in ("bhld", "blhd") for heads in ((4, 4), (6, 2), (3, 1))]
_COMBOS += [("one KV head folded", "bhld", (3, 1)), ("one KV head folded", "bhld", (1, 1)),
            ("one KV head folded, row chunks", "bhld", (3, 1))]


@pytest.mark.parametrize("block,layout,heads", _COMBOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_prefix_backward_block_matches_the_reference(monkeypatch, block, layout, heads, dtype):
    hq, hkv = heads
    strategy = _force(monkeypatch, block, hq, dtype)
    calls = _spy(monkeypatch, strategy) if strategy else []
    leaves, grad = _leaves(layout, BATCH, hq, hkv, LQ, LK, DIM, PLEN, dtype, seed=hq * 10 + hkv)
    out = prefix_attention(*leaves, causal=True)
    got = torch.autograd.grad(out, leaves, grad)
    assert bool(calls) == bool(strategy)  # the strategy under test ran
    if block == "one KV head folded, row chunks":
        assert len(calls) == 1 + 2  # the sequence part, then two chunks of batch rows
    wide = [t.detach().double().requires_grad_() for t in leaves]
    ref_out = reference.prefix_attention(*wide, causal=True)
    want = torch.autograd.grad(ref_out, wide, grad.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (out.double() - ref_out).norm() / ref_out.norm() < tol
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want):
        assert (a.double() - b).norm() / b.norm() < tol, name


def test_the_block_choice_follows_the_score_block_size(monkeypatch):
    whole = _spy(monkeypatch, "_kernel_prefix_backward")
    chunked = _spy(monkeypatch, "_chunked_kernel_prefix_backward")
    folded = _spy(monkeypatch, "_single_kv_head_prefix_backward")
    leaves, grad = _leaves("blhd", 2, 4, 2, 6, 6, 8, 3, torch.float32, seed=1)
    row_block = 4 * 6 * 3 * 4

    def run():
        for calls in (whole, chunked, folded):
            calls.clear()
        torch.autograd.grad(prefix_attention(*leaves, causal=True), leaves, grad)

    run()
    assert whole and not chunked  # 2 rows' scores within the threshold: one kernel call over the batch
    monkeypatch.setattr(cpu_flash, "_KERNEL_BLOCK_BYTES", 2 * row_block - 1)
    run()
    assert chunked and len(whole) == 2  # one row per chunk
    monkeypatch.setattr(cpu_flash, "_KERNEL_BLOCK_BYTES", row_block - 1)
    run()
    assert not whole and not chunked and not folded  # the written-out loop
    leaves, grad = _leaves("bhld", 2, 4, 1, 6, 6, 8, 3, torch.float32, seed=2)
    run()
    assert folded and not whole  # one KV head in [B, H, L, D] memory: folded whatever the size
    leaves, grad = _leaves("blhd", 2, 4, 1, 6, 6, 8, 3, torch.float32, seed=3)
    run()
    assert folded and not whole and not chunked  # [B, L, H, D] memory does not fold: the loop at this threshold


def test_gqa_with_a_large_group_block_keeps_the_loop(monkeypatch):
    """Row chunks of the kernel allocate a fresh dq share (a second dq): GQA takes them only while a whole group's
    score block is within _GROUP_BLOCK_BYTES; past it the written-out loop runs (even in time, 0.8x the layer's new
    bytes at B=8 S=256 P=32). MHA has no group to fold and keeps the chunks."""
    chunked = _spy(monkeypatch, "_chunked_kernel_prefix_backward")
    b, lq, p = 2, 6, 3
    monkeypatch.setattr(cpu_flash, "_KERNEL_BLOCK_BYTES", 4 * lq * p * 4)  # one row per chunk (Hq = 4, float32)
    for (hq, hkv), group_limit, want in (((4, 2), b * 2 * lq * p * 4, True), ((4, 2), b * 2 * lq * p * 4 - 1, False),
                                         ((4, 4), 0, True)):
        monkeypatch.setattr(cpu_flash, "_GROUP_BLOCK_BYTES", group_limit)
        chunked.clear()
        leaves, grad = _leaves("bhld", b, hq, hkv, lq, lq, 8, p, torch.float32, seed=hq + hkv)
        got = torch.autograd.grad(prefix_attention(*leaves, causal=True), leaves, grad)
        assert bool(chunked) == want, (hq, hkv, group_limit)
        wide = [t.detach().double().requires_grad_() for t in leaves]
        want_grads = torch.autograd.grad(reference.prefix_attention(*wide, causal=True), wide, grad.double())
        for name, x, y in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want_grads):
            assert (x.double() - y).norm() / y.norm() < 1e-5, name
