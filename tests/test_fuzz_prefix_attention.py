"""Property-based search over prefix_attention's whole contract, against the float64 reference.

Each example draws a problem: shapes (B, Hq/Hkv incl. GQA and MQA, Lq incl. 1 and > Lk, Lk incl. 0, P incl. 1
and odd, D 16-256), a prefix layout (none, shared, per sample, pool read through a [B] or [B, S] index with -1
slots), a key padding mask with holes, rows that see no key at all, causal / sliding window / softcap / scale, a
memory layout per tensor (contiguous, transposed, last-dim strided), return_lse with or without its gradient;
then compares out, lse and all five gradients by relative error with the reference run in float64 on the same
values. Deterministic (derandomize) and bounded: the example counts per backend and dtype are in EXAMPLES (they
appear in the test ids) and the whole file runs in about a minute on one core.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest.py sets it too)

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastprompt as fp  # noqa: E402
from attention_cases import relative_error as _relative_error  # noqa: E402
from layouts import LAYOUTS, relayout  # noqa: E402

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Examples per (backend, dtype): the case counts of the suite. Triton runs on the CPU interpreter, hence few and
# small. The compiled variant (torch.compile, aot_eager) adds COMPILED_EXAMPLES torch/float32 examples.
EXAMPLES = {
    ("torch", F32): 60, ("torch", BF16): 25, ("torch", F16): 25,
    ("reference", F32): 20, ("reference", BF16): 8, ("reference", F16): 8,
    ("triton", F32): 5, ("triton", BF16): 2, ("triton", F16): 2,
}
COMPILED_EXAMPLES = 2
# Relative-error bounds (||x - ref|| / ||ref||) for out/lse and for the gradients. Low precision: inputs are
# exact in the dtype; the error is the op's rounding (outputs, probabilities, gradients stored in 16 bits).
TOL = {F32: (2e-5, 1e-4), BF16: (2e-2, 5e-2), F16: (3e-3, 1e-2)}
# The reference backend computes in the inputs' dtype (scores and softmax in 16 bits): wider bounds there.
REFERENCE_TOL = {F32: (2e-5, 1e-4), BF16: (5e-2, 8e-2), F16: (1e-2, 2e-2)}

SMALL = dict(max_batch=2, max_kv_heads=2, max_group=2, max_lq=4, max_lk=5, max_plen=5, dims=(16, 32))
FULL = dict(max_batch=3, max_kv_heads=2, max_group=3, max_lq=7, max_lk=9, max_plen=7,
            dims=(16, 24, 40, 64, 96, 128, 256))
MODES = ("none", "shared", "per_sample", "pool_b", "pool_bs")


@st.composite
def problems(draw, max_batch, max_kv_heads, max_group, max_lq, max_lk, max_plen, dims):
    lq = draw(st.integers(1, max_lq))
    lk = draw(st.integers(0, max_lk))
    causal = draw(st.booleans())
    return dict(
        batch=draw(st.integers(1, max_batch)), hkv=draw(st.integers(1, max_kv_heads)),
        group=draw(st.integers(1, max_group)), lq=lq, lk=lk, plen=draw(st.integers(1, max_plen)),
        dim=draw(st.sampled_from(dims)), mode=draw(st.sampled_from(MODES)), pool_size=draw(st.integers(1, 4)),
        slots=draw(st.integers(1, 3)), padding=draw(st.sampled_from(["none", "holes", "holes"])),
        blank_row=draw(st.booleans()), causal=causal,
        window=draw(st.one_of(st.none(), st.integers(1, lq + lk + 1))),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 8.0))),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=5, max_size=5)),
        return_lse=draw(st.booleans()), lse_grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def relative_error(x, ref):
    """||x - ref|| / ||ref||, with ||ref|| floored at 1e-2 per entry: a gradient that vanishes exactly (a row's lone
    visible key gets no score gradient from the softmax) is met up to rounding, not to a relative 0."""
    floor = 1e-2 * max(ref.numel(), 1) ** 0.5
    norm = ref.double()[torch.isfinite(ref)].norm().item()
    return _relative_error(x, ref) * max(norm, 1e-30) / max(norm, floor)


def make_problem(p, dtype):
    """(tensors q, k, v, prefix_k, prefix_v in `dtype`, keyword arguments) with fresh random values."""
    gen = torch.Generator().manual_seed(p["seed"])
    b, hkv, dim = p["batch"], p["hkv"], p["dim"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q = randn(b, hkv * p["group"], p["lq"], dim)
    k, v = randn(b, hkv, p["lk"], dim), randn(b, hkv, p["lk"], dim)
    mode, index = p["mode"], None
    if mode == "none":
        prefix_shape = None
    elif mode == "shared":
        prefix_shape = (hkv, p["plen"], dim)
    elif mode == "per_sample":
        prefix_shape = (b, hkv, p["plen"], dim)
    else:
        prefix_shape = (p["pool_size"], hkv, p["plen"], dim)
        shape = (b,) if mode == "pool_b" else (b, p["slots"])
        index = torch.randint(-1, p["pool_size"], shape, generator=gen)  # -1 = empty slot, duplicates likely
    pk = pv = None
    if prefix_shape is not None:
        pk, pv = randn(*prefix_shape), randn(*prefix_shape)
    mask = None
    if p["padding"] == "holes" and p["lk"]:
        mask = torch.rand(b, p["lk"], generator=gen) < 0.7
    if p["blank_row"]:  # row 0 sees no sequence key, and no prefix key where the layout allows hiding it
        if p["lk"]:
            mask = torch.ones(b, p["lk"], dtype=torch.bool) if mask is None else mask
            mask[0] = False
        if index is not None:
            index[0] = -1
    kwargs = dict(prefix_index=index, key_padding_mask=mask, causal=p["causal"], window=p["window"],
                  softcap=p["softcap"], scale=p["scale"])
    return [q, k, v, pk, pv], kwargs


def check_problem(p, dtype, backend, compiled=False):
    tensors, kwargs = make_problem(p, dtype)
    names = [n for n, t in zip(("q", "k", "v", "prefix_k", "prefix_v"), tensors) if t is not None]
    leaves = [t.requires_grad_() if t is not None else None for t in tensors]
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    ref_out, ref_lse = fp.reference.prefix_attention(*ref_leaves, return_lse=True, **kwargs)

    def call(*args):
        viewed = [relayout(t, layout) for t, layout in zip(args, p["layouts"])]
        return fp.ops.prefix_attention(*viewed, backend=backend, return_lse=p["return_lse"], **kwargs)

    fn = torch.compile(call, backend="aot_eager", fullgraph=True) if compiled else call
    result = fn(*leaves)
    out, lse = result if p["return_lse"] else (result, None)
    assert out.shape == ref_out.shape and out.dtype == dtype
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    # exact in the dtype (the op receives the gradient rounded to it): the error measured is the op's own
    grad_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    ref_loss = (ref_out * grad_out).sum()
    loss = (out.double() * grad_out).sum()
    errors = {"out": relative_error(out, ref_out)}
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        errors["lse"] = relative_error(lse, ref_lse)
        if p["lse_grad"]:
            grad_lse = torch.randn(ref_lse.shape, generator=gen, dtype=torch.float64)
            ref_loss = ref_loss + (ref_lse.masked_fill(torch.isinf(ref_lse), 0.0) * grad_lse).sum()
            loss = loss + (lse.masked_fill(torch.isinf(lse), 0.0).double() * grad_lse).sum()
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, wrt)
    ref_grads = torch.autograd.grad(ref_loss, [t for t in ref_leaves if t is not None])
    for name, g, rg, x in zip(names, grads, ref_grads, wrt):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        errors["d" + name] = relative_error(g, rg)
    tol, grad_tol = (REFERENCE_TOL if backend == "reference" else TOL)[dtype]
    bad = {n: e for n, e in errors.items() if e > (tol if n in ("out", "lse") else grad_tol)}
    assert not bad, f"{backend} {dtype} {p}: relative errors above tolerance: {bad} (all: {errors})"


def _fuzz_test(backend, dtype, examples, shapes, compiled=False):
    @pytest.mark.skipif(backend == "triton" and not HAS_TRITON, reason="triton is not installed")
    @settings(derandomize=True, max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(p=problems(**shapes))
    def test(p):
        if compiled:
            torch._dynamo.reset()
        check_problem(p, dtype, backend, compiled)
    return test


for (_backend, _dtype), _count in EXAMPLES.items():
    _name = f"test_fuzz_{_backend}_{str(_dtype).split('.')[-1]}_{_count}_examples"
    globals()[_name] = _fuzz_test(_backend, _dtype, _count, SMALL if _backend == "triton" else FULL)
test_fuzz_torch_compiled_float32_2_examples = _fuzz_test("torch", F32, COMPILED_EXAMPLES, SMALL, compiled=True)
