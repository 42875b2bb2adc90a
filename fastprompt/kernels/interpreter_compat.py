"""Triton < 3.8's interpreter (TRITON_INTERPRET=1) under numpy >= 2.5: the one-line fix that triton 3.8 made.

The interpreter holds every scalar as a shape-(1,) numpy array and turns it into a Python int with `int(array)`
when Python needs an index, e.g. for `range(lo, hi, BLOCK)` with bounds computed in the kernel. numpy 2.5 refuses
that conversion for arrays of one dimension or more ("only 0-dimensional arrays can be converted to Python
scalars"), so on triton 3.6 every kernel with such a loop fails to run. Triton 3.8's interpreter squeezes the
array first (`int(self.handle.data.squeeze())`); `apply()` gives the older interpreters that same `__index__`.

Only released, frozen triton versions (< 3.8) are touched, and only their private `_patch_lang_tensor` hook, which
the interpreter calls on every launch to give `tl.tensor` its Python protocol methods; the replacement keeps every
method it sets and only changes `__index__`, so a kernel that ran before computes exactly the same thing. Compiled
kernels (GPU) never go through this code.
"""
from __future__ import annotations

import os

from fastprompt._versions import release

FIXED_IN = (3, 8)


def needs_patch(triton_version: str) -> bool:
    """True for the triton releases whose interpreter converts scalars with a bare `int(array)`."""
    return release(triton_version)[:2] < FIXED_IN


def _squeezing_index(self):
    return int(self.handle.data.squeeze())


def apply() -> bool:
    """Give triton < 3.8's interpreter the squeezing `__index__` when TRITON_INTERPRET=1 (read, as triton reads it,
    when the kernel modules load). Idempotent; True when the hook is in place."""
    import triton  # optional dependency

    if os.environ.get("TRITON_INTERPRET", "0") != "1" or not needs_patch(triton.__version__):
        return False
    try:
        from triton.runtime import interpreter  # optional dependency
    except ImportError:  # no interpreter in this build: nothing runs through it
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "_fastprompt_squeezing_index", False):
        return True

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _squeezing_index)

    _patch_lang_tensor._fastprompt_squeezing_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
