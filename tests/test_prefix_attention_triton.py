"""Triton prefix-attention kernels under TRITON_INTERPRET=1, against the float64 reference.

Two layers: the backend module on the normalized layout (BACKEND_INTERFACE.md), and the public op with
backend="triton". Every comparison covers out, lse and all five gradients by relative error. The case lists are
pairwise rather than a full cross product (prefix mode x GQA x padding x causal/window/softcap x shapes x P x head
dim x dtype) so the file stays within a few minutes on one interpreted CPU core.
"""
import os

# Before triton is imported: the switch is read when kernels are decorated (conftest.py sets it too).
os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fastprompt import reference  # noqa: E402
from fastprompt.ops import prefix_attention  # noqa: E402
from fastprompt.ops.prefix_attention_inputs import PrefixAttentionArgs  # noqa: E402
from fastprompt.ops.prefix_attention_triton import TritonBackend  # noqa: E402

from attention_cases import Case, check_against_reference, relative_error  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: 1e-4, F16: 2e-2, BF16: 2e-2}
# Gradients in bfloat16 (8-bit mantissa): the kernel rounds P and dS to bf16 before its dot products, as FlashAttention
# does, and a gradient that is a short sum (P = 1, Lq = 1: one term per element) keeps that rounding whole. Over fresh
# random inputs the relative error of d(prefix_k) in such a case has median 0.006 and reached 0.021 once in CI
# (triton 3.9); 4e-2 is ten bf16 ulps, still far below what a wrong gradient gives (order 1).
GRAD_TOL = {F32: 1e-4, F16: 2e-2, BF16: 4e-2}

# ---------------------------------------------------------------------------------------------------------------
# Backend module, normalized layout
# ---------------------------------------------------------------------------------------------------------------


def _normalized_problem(batch, hq, hkv, lq, lk, dim, plen, mode, dtype, slots=1, padding="none", prefix_dtype=None,
                        transposed=False):
    """Random inputs in the normalized layout; mode 0 none, 1 shared, 2 per sample, 3 pool [B, S] (with -1 slots)."""

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, dtype=torch.float64).to(dt)

    if transposed:  # transformers hands (B, H, L, D) views of (B, L, H, D) projections
        q = randn(batch, lq, hq, dim).transpose(1, 2)
        k = randn(batch, lk, hkv, dim).transpose(1, 2)
        v = randn(batch, lk, hkv, dim).transpose(1, 2)
    else:
        q, k, v = randn(batch, hq, lq, dim), randn(batch, hkv, lk, dim), randn(batch, hkv, lk, dim)
    pdt = prefix_dtype or dtype
    pk = pv = index = None
    if mode == 1:
        pk, pv = randn(1, hkv, plen, dim, dt=pdt), randn(1, hkv, plen, dim, dt=pdt)
        index = torch.zeros(batch, 1, dtype=torch.long)
    elif mode == 2:
        pk, pv = randn(batch, hkv, plen, dim, dt=pdt), randn(batch, hkv, plen, dim, dt=pdt)
        index = torch.arange(batch)[:, None]
    elif mode == 3:
        pool = 3
        pk, pv = randn(pool, hkv, plen, dim, dt=pdt), randn(pool, hkv, plen, dim, dt=pdt)
        index = torch.randint(0, pool, (batch, slots))
        index[0, -1] = -1  # an empty slot
        if batch > 1 and slots > 1:
            index[1, 0] = index[1, 1]  # one entry twice in a row: its gradient is added twice
    kpm = None
    if padding != "none":
        kpm = torch.ones(batch, lk, dtype=torch.bool)
        if padding == "holes":
            kpm[0, 1::3] = False
        elif padding == "left":
            kpm[0, : lk // 2] = False
        elif padding == "right":
            kpm[-1, lk - lk // 3 - 1:] = False
        elif padding == "empty_row":  # row 0: all keys padding, and (pool) all slots empty -> sees nothing
            kpm[0] = False
            if mode == 3:
                index[0] = -1
    return q, k, v, pk, pv, index, kpm


def _public_prefix(pk, pv, index, mode):
    if mode == 0:
        return dict(prefix_k=None, prefix_v=None)
    if mode == 1:
        return dict(prefix_k=pk[0], prefix_v=pv[0])
    if mode == 2:
        return dict(prefix_k=pk, prefix_v=pv)
    return dict(prefix_k=pk, prefix_v=pv, prefix_index=index)


def _check_backend(batch=2, hq=4, hkv=2, lq=6, lk=9, dim=32, plen=5, mode=1, dtype=F32, slots=1, padding="none",
                   causal=True, softcap=0.0, window=-1, prefix_dtype=None, transposed=False):
    q, k, v, pk, pv, index, kpm = _normalized_problem(batch, hq, hkv, lq, lk, dim, plen, mode, dtype, slots, padding,
                                                      prefix_dtype, transposed)
    scale = dim ** -0.5
    args = PrefixAttentionArgs(q, k, v, pk, pv, index, mode, kpm, causal, scale, softcap, window)
    out, lse, kept = TritonBackend.forward(args)
    assert kept is None
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:3]

    grad_out = torch.randn(out.shape, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, dtype=torch.float64).masked_fill(torch.isinf(lse), 0.0)
    delta = (grad_out.to(dtype).float() * out.float()).sum(-1) - grad_lse.float()
    grads = TritonBackend.backward(args, grad_out.to(dtype), out, lse, delta, None)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    prefix = [None, None] if pk is None else [t.detach().double().requires_grad_() for t in (pk, pv)]
    ref_out, ref_lse = reference.prefix_attention(
        *leaves, **_public_prefix(*prefix, index, mode), key_padding_mask=kpm, causal=causal, scale=scale,
        softcap=softcap or None, window=None if window < 0 else window, return_lse=True)
    loss = (ref_out * grad_out).sum() + (ref_lse.masked_fill(torch.isinf(ref_lse), 0.0) * grad_lse).sum()
    wrt = leaves + ([] if pk is None else prefix)
    ref_grads = torch.autograd.grad(loss, wrt)

    tol = TOL[dtype]
    errors = {"out": relative_error(out, ref_out), "lse": relative_error(lse, ref_lse)}
    for name, g, rg, x in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads, wrt):
        assert g.shape == x.shape, name
        assert torch.isfinite(g).all(), name
        errors[name] = relative_error(g, rg)
    if pk is None:
        assert grads[3] is None and grads[4] is None
    else:
        assert grads[3].dtype == pk.dtype and grads[4].dtype == pv.dtype
    assert not torch.isnan(out).any()
    bad = {n: e for n, e in errors.items() if e > (tol if n in ("out", "lse") else GRAD_TOL[dtype])}
    assert not bad, f"relative errors above {tol} (gradients {GRAD_TOL[dtype]}): {bad} (all: {errors})"
    return out, lse


BACKEND_CASES = [
    # prefix modes x GQA x padding x masks (fp32, D=32)
    dict(mode=0, hq=4, hkv=2, padding="holes", causal=True),
    dict(mode=1, hq=4, hkv=2, padding="left", causal=False, window=3),
    dict(mode=2, hq=2, hkv=2, padding="right", causal=True, softcap=2.0),
    dict(mode=3, hq=4, hkv=1, padding="holes", causal=False, slots=3, plen=17),
    dict(mode=3, hq=4, hkv=2, padding="empty_row", causal=False, slots=2, plen=1),
    dict(mode=1, hq=4, hkv=1, lq=1, lk=13, causal=True, window=4, softcap=3.0),
    dict(mode=2, hq=4, hkv=2, lq=21, lk=7, causal=True, plen=17),  # Lq > Lk: early rows see only the prefix
    dict(mode=0, hq=2, hkv=1, lq=20, lk=5, causal=True),  # ... and with no prefix, nothing (lse -inf)
    dict(mode=3, hq=4, hkv=2, lq=17, lk=35, causal=True, window=9, padding="holes", slots=2),
    dict(mode=1, hq=2, hkv=2, lq=17, lk=17, causal=False, transposed=True, padding="left"),
    # mixed dtypes: a float32 prefix with half-precision activations
    dict(mode=1, dtype=F16, prefix_dtype=F32, padding="right"),
    dict(mode=3, dtype=BF16, prefix_dtype=F32, slots=2, causal=False),
]


@pytest.mark.parametrize("kw", BACKEND_CASES, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_backend_matches_reference(kw):
    _check_backend(**kw)


def test_backend_row_with_no_visible_key_gives_zero_and_minus_inf():
    out, lse = _check_backend(mode=3, slots=2, padding="empty_row", causal=False, batch=2)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isfinite(lse[1]).all()


# ---------------------------------------------------------------------------------------------------------------
# Public op, backend="triton"
# ---------------------------------------------------------------------------------------------------------------


def _triton_op(*args, **kwargs):
    return prefix_attention(*args, backend="triton", **kwargs)


# Pairwise over: mode, GQA, padding, causal, window, softcap, Lq/Lk, P, D, dtype.
OP_CASES = [
    Case(mode="shared", hq=4, hkv=2, padding="holes", causal=True, plen=5, dim=32),
    Case(mode="per_sample", hq=4, hkv=4, padding="left", causal=False, plen=1, dim=64, window=3),
    Case(mode="pool", hq=4, hkv=1, padding="right", causal=True, plen=17, dim=80, softcap=2.0),
    Case(mode="pool_slots", hq=4, hkv=2, padding="none", causal=False, plen=5, dim=96),
    Case(mode="none", hq=2, hkv=2, padding="holes", causal=True, lq=1, lk=9, dim=128),
    Case(mode="pool_slots", hq=2, hkv=1, padding="empty_row", causal=False, plen=1, dim=32),
    Case(mode="shared", hq=4, hkv=1, padding="none", causal=True, lq=9, lk=4, plen=17, dim=64, window=2),
    Case(mode="per_sample", hq=2, hkv=2, padding="right", causal=True, lq=17, lk=33, plen=5, dim=32, softcap=5.0,
         window=7),
    # half precision (fp16 / bf16) over the same axes
    Case(mode="shared", hq=4, hkv=2, padding="left", causal=True, plen=17, dim=80, dtype=F16),
    Case(mode="pool_slots", hq=4, hkv=1, padding="holes", causal=False, plen=5, dim=64, dtype=BF16, softcap=2.0),
    Case(mode="per_sample", hq=2, hkv=2, padding="none", causal=True, lq=1, lk=17, plen=1, dim=96, dtype=BF16),
    Case(mode="none", hq=4, hkv=2, padding="right", causal=False, lq=17, lk=9, dim=32, dtype=F16, window=4),
    Case(mode="pool", hq=4, hkv=4, padding="empty_row", causal=True, plen=17, dim=128, dtype=BF16, window=3),
    Case(mode="pool_slots", hq=2, hkv=1, padding="left", causal=True, lq=3, lk=20, plen=1, dim=32, dtype=F16),
    # head dim 256 (BLOCK_D 256) and odd small dims: tiny batch/lengths
    Case(batch=1, mode="shared", hq=2, hkv=1, lq=4, lk=6, plen=5, dim=256, padding="holes"),
    Case(batch=2, mode="pool_slots", hq=2, hkv=2, lq=3, lk=5, plen=17, dim=256, dtype=BF16, causal=False),
    Case(batch=1, mode="per_sample", hq=2, hkv=1, lq=5, lk=5, plen=5, dim=256, dtype=F16, softcap=3.0),
    Case(mode="shared", hq=2, hkv=1, lq=4, lk=6, plen=3, dim=8),  # D < 16: padded to the smallest dot tile
]


@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_op_triton_matches_reference(case):
    check_against_reference(case, _triton_op, tol=TOL[case.dtype], grad_tol=GRAD_TOL[case.dtype])


def test_op_triton_matches_torch_backend_without_lse_grad():
    case = Case(mode="pool_slots", hq=4, hkv=2, padding="holes", causal=True, plen=5, dim=32, window=4)
    check_against_reference(case, _triton_op, tol=1e-4, lse_grad=False)


# ---------------------------------------------------------------------------------------------------------------
# What the backend refuses, and how
# ---------------------------------------------------------------------------------------------------------------


def _args(q, k, kpm=None, prefix_k=None):
    index = None if prefix_k is None else torch.zeros(q.shape[0], 1, dtype=torch.long)
    return PrefixAttentionArgs(q, k, k, prefix_k, prefix_k, index, 0 if prefix_k is None else 1, kpm, True, 0.1,
                               0.0, -1)


def _supports(q, k=None, prefix_k=None, **kw):
    """The backend's reasons joined by "; ", or None when it can run the call."""
    k = torch.randn(q.shape[0], 1, 4, q.shape[-1], dtype=q.dtype) if k is None else k
    return "; ".join(TritonBackend.not_supported_reasons(_args(q, k, kw.get("kpm"), prefix_k), True)) or None


def test_supports_whole_contract_under_interpreter():
    for dtype in (F32, F16, BF16):
        for dim in (8, 32, 80, 96, 256):
            q = torch.randn(2, 2, 3, dim, dtype=dtype)
            assert _supports(q, prefix_k=torch.randn(1, 1, 5, dim, dtype=dtype)) is None


def test_supports_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 3, 32)
    assert _supports(q) == "triton kernels need CUDA tensors, got cpu (CPU tensors only under TRITON_INTERPRET=1)"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        TritonBackend.forward(_args(q, q[:, :1]))


@pytest.mark.parametrize("what", ["float64", "head_dim_512", "int_mask"])
def test_supports_refuses_and_forward_raises(what):
    q = torch.randn(1, 2, 3, 512 if what == "head_dim_512" else 32,
                    dtype=torch.float64 if what == "float64" else F32)
    k = q[:, :1].clone()
    kpm = torch.ones(1, 3, dtype=torch.int32) if what == "int_mask" else None
    reasons = TritonBackend.not_supported_reasons(_args(q, k, kpm), False)
    assert reasons and all(isinstance(reason, str) and reason for reason in reasons)
    with pytest.raises(ValueError, match="triton backend cannot run"):
        TritonBackend.forward(_args(q, k, kpm))
    if what != "int_mask":  # the public op turns an int mask into bool itself
        with pytest.raises(ValueError, match="backend='triton' cannot run"):
            prefix_attention(q, k, k, backend="triton")


def test_backend_reads_pool_index_in_kernel_without_host_sync(monkeypatch):
    # .item()/.tolist() on the index would be a device sync on GPU; the kernels read prefix_index themselves.
    def forbidden(*_args, **_kwargs):
        raise AssertionError("host sync in the triton backend")

    q, k, v, pk, pv, index, kpm = _normalized_problem(2, 2, 1, 4, 5, 16, 3, 3, F32, slots=2, padding="holes")
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    args = PrefixAttentionArgs(q, k, v, pk, pv, index, 3, kpm, True, 0.25, 0.0, -1)
    out, lse, _ = TritonBackend.forward(args)
    delta = torch.zeros_like(lse)
    TritonBackend.backward(args, torch.ones_like(out), out, lse, delta, None)


# ---------------------------------------------------------------------------------------------------------------
# Tile sizes other than the interpreter's 16 x 16: the causal/window/padding tile ranges must not depend on them
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 64), (64, 32)])
def test_backend_with_other_tile_shapes(monkeypatch, block_m, block_n):
    from fastprompt.kernels import prefix_attention_common as common

    monkeypatch.setattr(common, "INTERPRETER_CONFIG", common.TileConfig(block_m, block_n, 1, 1, 1 << 30))
    _check_backend(batch=2, hq=2, hkv=1, lq=37, lk=70, dim=16, plen=17, mode=3, slots=2, padding="holes",
                   causal=True, window=23)
    _check_backend(batch=1, hq=2, hkv=2, lq=45, lk=33, dim=16, plen=5, mode=1, padding="left", causal=False,
                   window=11, softcap=4.0)


def test_op_triton_with_no_sequence_keys():
    # Lk = 0: only the prefix is attended to; dk/dv are empty.
    check_against_reference(Case(mode="pool_slots", lk=0, causal=True), _triton_op, tol=1e-4)
