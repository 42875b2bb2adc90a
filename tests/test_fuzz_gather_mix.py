"""Property-based search over gather_prompts / mix_prompts, against the reference run in float64.

Each example draws a pool [N, *entry] (entries of 1-3 dims, sometimes wider than one Triton tile), an index [B] or
[B, S] with -1 slots and duplicate entries (B = 0 included), dense or sparse mixing weights, a dtype and a memory
layout for the pool and the weights (contiguous, transposed, last-dim strided); it checks the gathered rows
exactly, the mixture and the gradients of pool and weights by relative error. Deterministic and bounded: the
example counts per backend and dtype are in EXAMPLES (they appear in the test ids).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest.py sets it too)

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastprompt import reference_prompts as ref  # noqa: E402
from fastprompt.ops import gather_prompts, mix_prompts  # noqa: E402
from attention_cases import relative_error  # noqa: E402
from layouts import relayout  # noqa: E402

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
HAS_TRITON = importlib.util.find_spec("triton") is not None

EXAMPLES = {
    ("torch", F64): 25, ("torch", F32): 25, ("torch", BF16): 12, ("torch", F16): 12,
    ("reference", F64): 8, ("reference", F32): 8, ("reference", BF16): 4, ("reference", F16): 4,
    ("triton", F64): 8, ("triton", F32): 8, ("triton", BF16): 4, ("triton", F16): 4,
}
COMPILED_EXAMPLES = 2
# Gathered rows are copies: exact. Mixtures and gradients: rounding of the dtype (sums accumulate in fp32 or more).
TOL = {F64: 1e-12, F32: 1e-5, BF16: 2e-2, F16: 4e-3}


@st.composite
def selections(draw):
    pool_size = draw(st.integers(1, 6))
    entry = draw(st.one_of(st.lists(st.integers(1, 12), min_size=1, max_size=3), st.just([1100])))
    batch = draw(st.integers(0, 4))
    slots = draw(st.one_of(st.none(), st.integers(1, 4)))
    return dict(pool_size=pool_size, entry=entry, batch=batch, slots=slots, dense=draw(st.booleans()),
                pool_layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
                weights_layout=draw(st.sampled_from(["contiguous", "strided"])), seed=draw(st.integers(0, 2**31 - 1)))


def check_selection(s, dtype, backend, compiled=False):
    gen = torch.Generator().manual_seed(s["seed"])
    n, b = s["pool_size"], s["batch"]
    pool = torch.randn(n, *s["entry"], generator=gen, dtype=F64).to(dtype).requires_grad_()
    index_shape = (b,) if s["slots"] is None else (b, s["slots"])
    index = torch.randint(-1, n, index_shape, generator=gen)  # -1 = empty slot; duplicates likely
    mix_index = index.reshape(b, s["slots"] or 1)
    width = n if s["dense"] else mix_index.shape[1]
    weights = torch.randn(b, width, generator=gen, dtype=F64).to(dtype).requires_grad_()

    def select(pool, weights):
        if s["pool_layout"] != "transposed" or pool.dim() >= 3:
            pool = relayout(pool, s["pool_layout"])
        weights = relayout(weights, s["weights_layout"])
        hard = gather_prompts(pool, index, backend=backend)
        soft = mix_prompts(pool, weights, None if s["dense"] else mix_index, backend=backend)
        return hard, soft

    fn = torch.compile(select, backend="aot_eager", fullgraph=True) if compiled else select
    hard, soft = fn(pool, weights)
    pool64, weights64 = pool.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    ref_hard = ref.gather_prompts(pool64, index)
    ref_soft = ref.mix_prompts(pool64, weights64, None if s["dense"] else mix_index)
    assert hard.shape == ref_hard.shape and hard.dtype == dtype and soft.shape == ref_soft.shape
    assert torch.equal(hard.double(), ref_hard.detach()), "gathered rows must be exact copies"
    assert torch.all(hard[index < 0] == 0)

    # output gradients exact in the dtype (the op receives them rounded to it): the error measured is the op's own
    g_hard = torch.randn(ref_hard.shape, generator=gen, dtype=F64).to(dtype).double()
    g_soft = torch.randn(ref_soft.shape, generator=gen, dtype=F64).to(dtype).double()
    loss = (hard.double() * g_hard).sum() + (soft.double() * g_soft).sum()
    ref_loss = (ref_hard * g_hard).sum() + (ref_soft * g_soft).sum()
    dpool, dweights = torch.autograd.grad(loss, (pool, weights), allow_unused=True)
    ref_dpool, ref_dweights = torch.autograd.grad(ref_loss, (pool64, weights64), allow_unused=True)
    errors = {"mix": relative_error(soft, ref_soft)}
    for name, g, rg, x in (("dpool", dpool, ref_dpool, pool), ("dweights", dweights, ref_dweights, weights)):
        if rg is None:  # B = 0: no output, no gradient
            assert g is None or not g.any(), name
            continue
        assert g.shape == x.shape and g.dtype == x.dtype, name
        errors[name] = relative_error(g, rg)
    bad = {k: e for k, e in errors.items() if e > TOL[dtype]}
    assert not bad, f"{backend} {dtype} {s}: relative errors above tolerance: {bad} (all: {errors})"


def _fuzz_test(backend, dtype, examples, compiled=False):
    @pytest.mark.skipif(backend == "triton" and not HAS_TRITON, reason="triton is not installed")
    @settings(derandomize=True, max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(s=selections())
    def test(s):
        if compiled:
            torch._dynamo.reset()
        check_selection(s, dtype, backend, compiled)
    return test


for (_backend, _dtype), _count in EXAMPLES.items():
    _name = f"test_fuzz_{_backend}_{str(_dtype).split('.')[-1]}_{_count}_examples"
    globals()[_name] = _fuzz_test(_backend, _dtype, _count)
test_fuzz_torch_compiled_float32_2_examples = _fuzz_test("torch", F32, COMPILED_EXAMPLES, compiled=True)
