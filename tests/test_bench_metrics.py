"""The benchmark's measuring instruments on cases whose answer is known."""
import pytest
import torch

from fastprompt.bench import metrics
from fastprompt.bench.baselines import peft_style_attention
from fastprompt.bench.runner import compare_outputs


def test_new_bytes_of_a_known_allocation():
    x = torch.ones(10, 10)

    def step():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = a.view(10, 100)  # a view: nothing new
        b.add_(1.0)  # in place: nothing new
        return x * 2.0  # 400 bytes

    new, peak, count = metrics.measure_allocations(step)
    assert new == 4000 + 400
    assert count == 2
    assert peak == 4400  # both alive together at the end of the step


def test_peak_counts_only_what_is_alive_together():
    def step():
        for _ in range(3):
            t = torch.empty(1000, dtype=torch.float64)  # 8000 bytes, freed before the next one
            del t
        return None

    new, peak, _ = metrics.measure_allocations(step)
    assert new == 3 * 8000
    assert peak == 8000


def test_saved_bytes_unique_storages_and_exclusions():
    w = torch.randn(64, 32, requires_grad=True)  # a "parameter": excluded
    x = torch.randn(8, 64)

    def step():
        h = x @ w  # saves x (excluded: an input) and w (excluded)
        y = torch.tanh(h)  # saves its output y: 8*32*4 bytes
        return (y * y).sum()  # saves y twice: counted once

    assert metrics.saved_bytes(step, exclude=[w, x]) == 8 * 32 * 4


def test_flops_of_a_matmul_and_of_cpu_attention():
    a, b = torch.randn(16, 32), torch.randn(32, 8)
    assert metrics.flops(lambda: a @ b) == 2 * 16 * 32 * 8
    q = torch.randn(2, 4, 16, 8)
    k = v = torch.randn(2, 4, 24, 8)
    # PyTorch has no formula for the CPU flash kernel; the harness registers SDPA's: 4·B·H·Lq·Lk·D
    counted = metrics.flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert counted == 4 * 2 * 4 * 16 * 24 * 8


def test_flops_of_grouped_query_attention_forward_and_backward_on_every_torch():
    # PyTorch's own SDPA formulas refuse GQA shapes before torch 2.13 (torch 2.11 raised in every GQA bench case):
    # the harness counts every query head, as the kernel broadcasts the key/value heads
    b, hq, hkv, sq, sk, d, dv = 2, 6, 2, 5, 7, 8, 8
    q = torch.randn(b, hq, sq, d, requires_grad=True)
    k, v = torch.randn(b, hkv, sk, d), torch.randn(b, hkv, sk, dv)
    forward = 2 * b * hq * sq * sk * (d + dv)
    assert metrics.flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)) \
        == forward

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        out.sum().backward()

    assert metrics.flops(step) == forward + 2 * b * hq * sq * sk * (3 * d + 2 * dv)


def test_attention_flop_formulas_match_pytorchs_on_equal_heads_and_name_bad_shapes():
    from torch.utils import flop_counter as fc
    q, k, v = (2, 4, 5, 8), (2, 4, 7, 8), (2, 4, 7, 16)
    assert metrics.attention_flops(q, k, v) == fc.sdpa_flop_count(q, k, v)
    assert metrics.attention_backward_flops((2, 4, 5, 16), q, k, v) == fc.sdpa_backward_flop_count(
        (2, 4, 5, 16), q, k, v)
    with pytest.raises(ValueError, match="hq a multiple of hkv"):
        metrics.attention_flops((2, 3, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8))


def _attention_inputs(batch=2, hq=4, hkv=2, seq=16, plen=8, dim=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, seq, dim, generator=g)
    k, v = torch.randn(batch, hkv, seq, dim, generator=g), torch.randn(batch, hkv, seq, dim, generator=g)
    pk, pv = torch.randn(hkv, plen, dim, generator=g), torch.randn(hkv, plen, dim, generator=g)
    return q, k, v, pk, pv


def test_the_peft_style_path_allocates_the_concatenated_kv_and_repeat_kv():
    batch, hq, hkv, seq, plen, dim = 2, 4, 2, 16, 8, 8
    q, k, v, pk, pv = _attention_inputs(batch, hq, hkv, seq, plen, dim)
    tracker = metrics.AllocationTracker()
    with tracker:
        out = peft_style_attention(q, k, v, pk, pv)
    kv_cat = 2 * batch * hkv * (plen + seq) * dim * 4  # torch.cat of K and of V
    repeated = 2 * batch * hq * (plen + seq) * dim * 4  # repeat_kv of both
    assert tracker.by_op["aten.cat.default"] == kv_cat
    assert tracker.by_op["aten.clone.default"] >= repeated
    assert tracker.new_bytes >= kv_cat + repeated + batch * seq * (plen + seq)  # + the 4D bool mask
    # and it computes prefix attention: same result as the op
    from fastprompt.ops import prefix_attention

    torch.testing.assert_close(out, prefix_attention(q, k, v, pk, pv), rtol=1e-5, atol=1e-5)


def test_fastprompt_attention_builds_no_concatenation_and_less():
    q, k, v, pk, pv = _attention_inputs()
    from fastprompt.ops import prefix_attention

    fp, peft = metrics.AllocationTracker(), metrics.AllocationTracker()
    with fp:
        prefix_attention(q, k, v, pk, pv)
    with peft:
        peft_style_attention(q, k, v, pk, pv)
    assert "aten.cat.default" not in fp.by_op
    assert fp.new_bytes < peft.new_bytes
    # the custom op is opened up: its internal kernel calls are seen, not just its outputs
    assert any("flash_attention" in name for name in fp.by_op)


def test_compare_outputs():
    a = {"x": torch.tensor([1.0, 2.0]), "tokens": torch.tensor([1, 2])}
    ok, diff = compare_outputs(a, {"x": torch.tensor([1.0, 2.0 + 1e-7], dtype=torch.float64),
                                   "tokens": torch.tensor([1, 2])}, 1e-5)
    assert ok and diff == pytest.approx(5e-8, rel=1e-2)
    ok, diff = compare_outputs(a, {"x": torch.tensor([1.0, 2.0]), "tokens": torch.tensor([1, 3])}, 1e-5)
    assert not ok and diff == 0.5
    assert compare_outputs(a, {"x": torch.tensor([1.0, 2.0])}, 1e-5)[0] is False
