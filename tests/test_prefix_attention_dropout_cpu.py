"""The torch backend's attention dropout on the CPU: the in-place Philox mask, its packed form, and the chunked path.

The mask must be the contract's bit for bit (fastprompt/attention_dropout.py: the reference and the Triton
kernels draw the same), whichever ops write it (numpy on the CPU, torch elsewhere), at any key alignment and block
size; the packed mask forward returns must be what backward uses; chunks shorter than the rest must be right.
"""
import pytest
import torch

from attention_cases import Case, make_inputs
from fastprompt.ops.prefix_attention_torch import dropout as prefix_attention_torch_dropout
from fastprompt.ops.prefix_attention_torch import dropout_mask_fill
from fastprompt.attention_dropout import keep_mask_elementwise
from fastprompt.ops.prefix_attention_torch.dropout_mask_fill import KeepMaskFiller, pack_bits, unpack_bits
from test_prefix_attention_dropout import assert_errors_below, run_with_reference


@pytest.mark.parametrize("ops", ["numpy", "torch"])
@pytest.mark.parametrize("block", [5, 1 << 16])
def test_filled_mask_equals_elementwise_mask(ops, block, monkeypatch):
    """Odd row / query / key counts, key ranges starting anywhere (groups cut at both ends), ids near 2**32, blocks
    that cut lines: every decision equals the elementwise definition."""
    monkeypatch.setattr(dropout_mask_fill, "BLOCK_WORDS", block)
    seed = torch.tensor([0x12345678, 0x9ABCDEF0, 0xFFFFFFFE])
    for p, rows, queries, key_start, keys in ((0.3, 3, 5, 3, 13), (0.1, 2, 7, 0, 12), (0.9, 1, 1, 7, 1),
                                              (0.5, 4, 3, 2, 30)):
        filler = KeepMaskFiller(seed, p)
        if ops == "torch":  # the non-CPU path, run on the CPU
            filler.ops = dropout_mask_fill._TorchOps
        row_ids = torch.arange(rows) * 7 + (2**32 - 9)
        query_ids = torch.arange(queries) + (2**31 - 2)
        out = torch.empty(rows, queries, keys, dtype=torch.bool)
        filler.fill(out, row_ids, query_ids, key_start)
        expected = keep_mask_elementwise(seed, p, row_ids[:, None, None], query_ids[None, :, None],
                                         torch.arange(key_start, key_start + keys))
        assert torch.equal(out, expected), (p, rows, queries, key_start, keys)


def test_pack_unpack_round_trip():
    keep = torch.rand(64 * 37) < 0.6
    packed = torch.empty(keep.numel() // 8, dtype=torch.uint8)
    pack_bits(keep, packed)
    assert torch.equal(packed, dropout_mask_fill._pack_any_order(keep))
    out = torch.empty(keep.numel(), dtype=torch.uint8)
    assert torch.equal(unpack_bits(packed, out), keep.to(torch.uint8))
    assert torch.equal(dropout_mask_fill._unpack_any_order(packed), out)


def test_backward_uses_the_mask_forward_kept():
    """The packed mask forward returns is the seed's mask (backward without it gives the same gradients), and
    backward reads it (flipping its bits changes the gradients)."""
    from fastprompt.attention_dropout import draw_dropout_seed
    from fastprompt.ops.prefix_attention_inputs import PREFIX_SHARED

    case = Case(batch=2, hq=4, hkv=2, lq=5, lk=7, dim=8, plen=3, mode="shared", padding="holes")
    inputs = make_inputs(case)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    pk, pv = inputs["prefix_k"][None], inputs["prefix_v"][None]
    index = torch.zeros(2, 1, dtype=torch.int64)
    kpm = inputs["key_padding_mask"]
    seed = draw_dropout_seed("cpu")
    args = (q, k, v, pk, pv, index, PREFIX_SHARED, kpm, True, 0.35, 0.0, -1)
    out, lse, kept = prefix_attention_torch_dropout.forward(*args, 0.3, seed)
    assert kept.dtype == torch.uint8 and kept.numel() == prefix_attention_torch_dropout.kept_mask_bytes(2, 4, 5, 7, 3)
    grad_out = torch.randn_like(out)
    delta = (grad_out * out).sum(-1)
    bwd = lambda keep: prefix_attention_torch_dropout.backward(grad_out, *args[:8], lse, delta, *args[8:], 0.3, seed,
                                                               keep)
    with_kept, regenerated, flipped = bwd(kept), bwd(None), bwd(~kept)
    for a, b in zip(with_kept, regenerated):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(with_kept[0], flipped[0])


def test_chunks_of_unequal_length_with_gqa(monkeypatch):
    """Chunks of 2 queries over 5 (the last one shorter), GQA (G = 2: a chunk's rows are copies, not views)."""
    case = Case(batch=2, hq=4, hkv=2, lq=5, lk=9, dim=8, plen=3, mode="per_sample", padding="holes")
    monkeypatch.setattr(prefix_attention_torch_dropout, "CHUNK_SCORES", 2 * 2 * 4 * (9 + 3))
    assert_errors_below(run_with_reference(case, "torch", 0.3), 1e-5, 1e-4)


def test_float64_softcap_pool_is_exact(monkeypatch):
    case = Case(batch=2, hq=2, hkv=1, lq=6, lk=7, dim=8, plen=2, mode="pool_slots", pool_size=3, padding="left",
                softcap=3.0, window=3, dtype=torch.float64)
    monkeypatch.setattr(prefix_attention_torch_dropout, "CHUNK_SCORES", 2 * 2 * 4 * (7 + 4))
    assert_errors_below(run_with_reference(case, "torch", 0.25), 1e-12, 1e-12)


def test_dropout_path_with_additive_biases_matches_reference():
    """The dropout path takes T5's attn_bias / prefix_bias (added to the capped scores before the softmax, as the
    reference adds them): forward and all five gradients in float64 against the reference with the same seed."""
    from fastprompt import reference
    from fastprompt.attention_dropout import draw_dropout_seed
    from fastprompt.ops.prefix_attention_inputs import PREFIX_PER_SAMPLE

    torch.manual_seed(3)
    b, hq, hkv, lq, lk, d, p = 2, 4, 2, 5, 6, 8, 3
    t = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    q, k, v, pk, pv = t(b, hq, lq, d), t(b, hkv, lk, d), t(b, hkv, lk, d), t(b, hkv, p, d), t(b, hkv, p, d)
    attn_bias, prefix_bias = torch.randn(1, hq, lq, lk, dtype=torch.float64), torch.randn(b, hq, lq, p,
                                                                                          dtype=torch.float64)
    kpm = torch.ones(b, lk, dtype=torch.bool)
    kpm[1, :2] = False
    seed = draw_dropout_seed("cpu")
    ref_out, ref_lse = reference.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=True, scale=0.4,
                                                  dropout_p=0.3, dropout_seed=seed, attn_bias=attn_bias,
                                                  prefix_bias=prefix_bias, return_lse=True)
    grad_out = torch.randn_like(ref_out)
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum(), [q, k, v, pk, pv])
    args = (q.detach(), k.detach(), v.detach(), pk.detach(), pv.detach(), torch.arange(b)[:, None],
            PREFIX_PER_SAMPLE, kpm, True, 0.4, 0.0, -1)
    biases = dict(attn_bias=attn_bias, prefix_bias=prefix_bias)
    out, lse, kept = prefix_attention_torch_dropout.forward(*args, 0.3, seed, **biases)
    assert (out - ref_out).norm() / ref_out.norm() < 1e-12
    assert (lse.float() - ref_lse).norm() / ref_lse.norm() < 1e-6  # the reference returns lse in float32
    delta = (grad_out * out).sum(-1)
    grads = prefix_attention_torch_dropout.backward(grad_out, *args[:8], lse, delta, *args[8:], 0.3, seed, kept,
                                                    **biases)
    for g, rg in zip(grads, ref_grads):
        assert (g - rg).norm() / rg.norm() < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, (1e-5, 1e-4)), (torch.float64, (1e-12, 1e-12))])
def test_public_op_with_biases_and_dropout_matches_reference(dtype, tol):
    """fp.ops.prefix_attention(..., attn_bias, prefix_bias, dropout_p) (T5 training) against the float64 reference
    that replays the seed the op drew: out, lse and the five gradients (lse's gradient included)."""
    import fastprompt as fp
    from fastprompt import reference
    from fastprompt.attention_dropout import draw_dropout_seed

    torch.manual_seed(5)
    b, hq, hkv, lq, lk, d, p = 2, 4, 2, 6, 7, 8, 3
    master = [torch.randn(*s, dtype=torch.float64) for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d),
                                                              (hkv, p, d), (hkv, p, d))]
    ours = [t.to(dtype).requires_grad_() for t in master]
    refs = [t.clone().requires_grad_() for t in master]
    attn_bias, prefix_bias = torch.randn(1, hq, lq, lk, dtype=dtype), torch.randn(1, hq, lq, p, dtype=dtype)
    kpm = torch.ones(b, lk, dtype=torch.bool)
    kpm[0, -2:] = False
    torch.manual_seed(11)
    seed = draw_dropout_seed("cpu")
    torch.manual_seed(11)
    out, lse = fp.ops.prefix_attention(*ours, key_padding_mask=kpm, causal=True, dropout_p=0.3, attn_bias=attn_bias,
                                       prefix_bias=prefix_bias, return_lse=True)
    ref_out, ref_lse = reference.prefix_attention(*refs, key_padding_mask=kpm, causal=True, dropout_p=0.3,
                                                  dropout_seed=seed, attn_bias=attn_bias.double(),
                                                  prefix_bias=prefix_bias.double(), return_lse=True)
    rel = lambda a, r: ((a.double() - r.double()).norm() / r.double().norm()).item()
    assert rel(out, ref_out) < tol[0] and rel(lse, ref_lse) < max(tol[0], 1e-6)  # the reference's lse is float32
    grad_out, grad_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    grads = torch.autograd.grad((out.double() * grad_out).sum() + (lse.double() * grad_lse).sum(), ours)
    ref_grads = torch.autograd.grad((ref_out * grad_out).sum() + (ref_lse.double() * grad_lse).sum(), refs)
    for g, rg in zip(grads, ref_grads):
        assert rel(g, rg) < tol[1]
    plain = reference.prefix_attention(*master, key_padding_mask=kpm, causal=True, attn_bias=attn_bias.double(),
                                       prefix_bias=prefix_bias.double())
    assert rel(out, plain) > 1e-2  # dropout did drop something
