"""Gradient comparisons measured against the whole gradient's scale: the one check every test uses for gradients.

A gradient that is zero in exact arithmetic (a QA head's bias: softmax minus one-hot sums to zero; an attention key
bias: softmax is shift-invariant) holds only rounding noise. That noise follows the scale of the whole gradient and the
order in which the CPU (its vector width, the thread count) sums the terms, not the tensor's own near-zero norm, so a
check relative to the tensor alone passes on one machine and fails on another. Here every tensor is compared to `rel`
of its own scale, floored at a rounding-noise level of the whole gradient: NOISE_ULPS units of the compared dtype's
epsilon times the scale of all compared gradients together. A tensor whose own scale is above floor / rel keeps
exactly the tolerance of a per-tensor check; only near-zero tensors are measured against the whole.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

# The rounding noise of an analytically zero float32 gradient (the QA heads' biases of tests/test_tasks_token_qa.py)
# measured up to 0.69 eps x (largest gradient entry) on a 2-core AMD EPYC with 1 and 2 threads, and 1.2 eps where
# issue 18's run failed; 64 leaves a wide margin for other CPUs' summation orders and lies far below any real error.
NOISE_ULPS = 64


def _eps(*tensors) -> float:
    """Epsilon of the least precise floating dtype among `tensors` (float32 vs a float64 reference: float32's)."""
    return max(torch.finfo(t.dtype).eps for t in tensors if t.dtype.is_floating_point)


def _as_dict(grads) -> dict:
    if isinstance(grads, Mapping):
        return dict(grads)
    return {str(i): g for i, g in enumerate(grads)}


def assert_grads_close(got, want, rel: float, what: str = "", norm: bool = False) -> None:
    """`got` equals `want` (dicts name -> gradient, or sequences in the same order) to `rel`, on the whole gradient's
    scale (see the module docstring).

    norm=False (elementwise): |a - e| <= rel * |e| + max(rel * max|e|, floor), floor = NOISE_ULPS * eps * max over all
        compared tensors of max|e|.
    norm=True (normwise): ||a - e|| <= max(rel * ||e||, floor), floor = NOISE_ULPS * eps * ||all compared tensors||.
    """
    got, want = _as_dict(got), _as_dict(want)
    assert want and got.keys() == want.keys(), f"{what}: gradients of {sorted(got)} vs {sorted(want)}"
    eps = _eps(*got.values(), *want.values())
    expected = {name: w.detach().double() for name, w in want.items()}
    actual = {name: got[name].detach().double() for name in want}
    for name in want:
        assert actual[name].shape == expected[name].shape, \
            f"{what} grad {name}: shape {tuple(actual[name].shape)} vs {tuple(expected[name].shape)}"
    if norm:
        whole = math.sqrt(sum(float(e.square().sum()) for e in expected.values()))
        floor = NOISE_ULPS * eps * whole
        for name, e in expected.items():
            err, own = float((actual[name] - e).norm()), float(e.norm())
            allowed = max(rel * own, floor)
            assert err <= allowed, (f"{what} grad {name}: ||got - want|| = {err:.3g} > {allowed:.3g} "
                                    f"(rel {rel} x ||want|| = {own:.3g}, noise floor {floor:.3g} of the whole)")
        return
    whole = max(float(e.abs().max()) if e.numel() else 0.0 for e in expected.values())
    floor = NOISE_ULPS * eps * whole
    for name, e in expected.items():
        own = float(e.abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(actual[name], e, rtol=rel, atol=max(rel * own, floor),
                                   msg=lambda m, name=name: f"{what} grad {name}: {m} (noise floor {floor:.3g} of "
                                                            f"the whole gradient)")
