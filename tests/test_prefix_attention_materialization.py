"""What the fast paths must never build: the concatenated [prefix; sequence] K/V, a B-fold copy of a shared
prefix, repeat_kv'd K/V, or a [B, 1, Lq, P + Lk] mask. Every tensor produced during forward + backward is
recorded with a TorchDispatchMode and its shape checked."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastprompt as fp
from attention_cases import Case, make_inputs, op_kwargs


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def forbidden_shapes(case: Case, slots: int = 1):
    b, hq, hkv, lq, lk, d, p = case.batch, case.hq, case.hkv, case.lq, case.lk, case.dim, case.plen * slots
    shapes = {(b, h, p + lk, d) for h in (hq, hkv)}  # concatenated keys/values
    shapes |= {(b, 1, lq, p + lk), (b, hq, lq, p + lk), (b, hkv, lq, p + lk)}  # a prefix-wide mask
    shapes.add((b, hq, lk, d))  # repeat_kv of the sequence keys/values
    if case.mode == "shared":
        shapes |= {(b, hkv, case.plen, d), (b, hq, case.plen, d)}  # the shared prefix copied per row
    return shapes


def record(case, backend):
    inputs = make_inputs(case)
    for n in ("q", "k", "v", "prefix_k", "prefix_v"):
        inputs[n].requires_grad_()
    recorder = ShapeRecorder()
    with recorder:
        out = fp.ops.prefix_attention(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                                      backend=backend, **op_kwargs(case, inputs))
        out.backward(torch.ones_like(out))
    return recorder.shapes


@pytest.mark.parametrize("mode", ["shared", "per_sample", "pool_slots"])
def test_torch_backend_builds_no_concat_no_copies_no_mask(mode):
    # sizes chosen so that no legitimate tensor shares a forbidden shape by accident
    case = Case(batch=3, hq=6, hkv=2, lq=11, lk=13, dim=8, plen=5, mode=mode, padding="holes", pool_size=7)
    slots = 3 if mode == "pool_slots" else 1
    bad = [(f, s) for f, s in record(case, "torch") if s in forbidden_shapes(case, slots)]
    assert not bad, f"materialized forbidden tensors: {bad}"


def test_the_recorder_catches_the_reference_path():
    case = Case(batch=3, hq=6, hkv=2, lq=11, lk=13, dim=8, plen=5, mode="shared", padding="holes")
    bad = [(f, s) for f, s in record(case, "reference") if s in forbidden_shapes(case)]
    assert bad, "the reference concatenates and repeats; the recorder should have seen it"


def test_triton_backend_builds_no_concat_no_copies_no_mask():
    pytest.importorskip("triton")
    from fastprompt.ops.prefix_attention_dispatch import backend_class

    try:
        backend_class("triton")
    except ImportError as exc:
        pytest.skip(f"triton backend unavailable: {exc}")
    case = Case(batch=3, hq=6, hkv=2, lq=11, lk=13, dim=16, plen=5, mode="shared", padding="holes")
    bad = [(f, s) for f, s in record(case, "triton") if s in forbidden_shapes(case)]
    assert not bad, f"materialized forbidden tensors: {bad}"
