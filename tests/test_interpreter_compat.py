"""Triton's interpreter with loop bounds computed inside a kernel: triton < 3.8 under numpy >= 2.5 needs
fastprompt/kernels/interpreter_compat.py (the GPU image's triton 3.6 and numpy 2.5 are such a pair)."""
import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (conftest.py sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

from fastprompt.kernels.interpreter_compat import needs_patch  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.mark.parametrize("version, patched", [("3.5.1", True), ("3.6.0", True), ("3.7.0", True),
                                              ("3.8.0", False), ("3.9.0", False), ("3.10.0", False),
                                              ("4.0.0", False)])
def test_only_releases_before_the_upstream_fix_are_patched(version, patched):
    assert needs_patch(version) is patched


def test_kernel_loop_bounds_computed_in_the_kernel():
    import triton
    import triton.language as tl

    import fastprompt.kernels.gather_mix  # noqa: F401  (loading a kernel module applies the compat hook)

    @triton.jit
    def running_sums(X, Out, n, BLOCK: tl.constexpr):
        # Out[p] = sum of X[0 : n - p], tile by tile: the bound is a kernel-side scalar, as in the attention loops.
        p = tl.program_id(0)
        hi = n - p
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < hi, other=0.0)
        tl.store(Out + p, tl.sum(acc, 0))

    n = 37
    x = torch.randn(n)
    out = torch.empty(5)
    running_sums[(5,)](x, out, n, BLOCK=16)
    expected = torch.stack([x[: n - p].double().sum() for p in range(5)]).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
