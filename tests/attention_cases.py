"""Random prefix-attention problems in the public layout, and the float64-reference comparison used by every
backend's tests."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fastprompt import reference


@dataclass
class Case:
    batch: int = 2
    hq: int = 4
    hkv: int = 2
    lq: int = 5
    lk: int = 7
    dim: int = 16
    plen: int = 3
    mode: str = "shared"  # none | shared | per_sample | pool | pool_slots
    pool_size: int = 4
    padding: str = "none"  # none | left | right | holes | empty_row
    causal: bool = True
    softcap: Optional[float] = None
    window: Optional[int] = None
    dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)

    def __str__(self):
        return (f"B{self.batch}-H{self.hq}/{self.hkv}-Lq{self.lq}-Lk{self.lk}-D{self.dim}-P{self.plen}-{self.mode}-"
                f"{self.padding}-{'causal' if self.causal else 'full'}-sc{self.softcap}-w{self.window}-"
                f"{str(self.dtype).split('.')[-1]}")


def _randn(*shape, dtype, device):
    return torch.randn(*shape, dtype=torch.float64, device=device).to(dtype)


def make_inputs(case: Case, device="cpu"):
    """Fresh random q, k, v, prefix and masks for `case` (the float64 master copy is cast to case.dtype)."""
    b, dt = case.batch, case.dtype
    inputs = {
        "q": _randn(b, case.hq, case.lq, case.dim, dtype=dt, device=device),
        "k": _randn(b, case.hkv, case.lk, case.dim, dtype=dt, device=device),
        "v": _randn(b, case.hkv, case.lk, case.dim, dtype=dt, device=device),
        "prefix_k": None, "prefix_v": None, "prefix_index": None, "key_padding_mask": None,
    }
    if case.mode == "shared":
        shape = (case.hkv, case.plen, case.dim)
    elif case.mode == "per_sample":
        shape = (b, case.hkv, case.plen, case.dim)
    elif case.mode in ("pool", "pool_slots"):
        shape = (case.pool_size, case.hkv, case.plen, case.dim)
        if case.mode == "pool":
            inputs["prefix_index"] = torch.randint(0, case.pool_size, (b,), device=device)
        else:  # three slots per row, some empty
            index = torch.randint(0, case.pool_size, (b, 3), device=device)
            index[0, 1] = -1
            if b > 1:
                index[1, 0] = index[1, 2]  # the same entry twice in one row
            inputs["prefix_index"] = index
    else:
        shape = None
    if shape is not None:
        inputs["prefix_k"] = _randn(*shape, dtype=dt, device=device)
        inputs["prefix_v"] = _randn(*shape, dtype=dt, device=device)
    if case.padding == "empty_row" and inputs["prefix_index"] is not None:
        inputs["prefix_index"][0] = -1  # and no pool entry either: row 0 sees no key at all
    inputs["key_padding_mask"] = make_padding(case, device)
    return inputs


def make_padding(case: Case, device="cpu"):
    b, lk = case.batch, case.lk
    if case.padding == "none":
        return None
    mask = torch.ones(b, lk, dtype=torch.bool, device=device)
    if case.padding == "left":
        mask[0, : lk // 2] = False
    elif case.padding == "right":
        mask[-1, lk - lk // 3 - 1:] = False
    elif case.padding == "holes":  # PEFT's test input pattern: [1, 0, 1, ...]
        mask[0, 1::3] = False
        mask[-1, 0] = False
    elif case.padding == "empty_row":  # row 0 sees no sequence key at all
        mask[0, :] = False
    else:
        raise ValueError(case.padding)
    return mask


def op_kwargs(case: Case, inputs):
    return dict(prefix_index=inputs["prefix_index"], key_padding_mask=inputs["key_padding_mask"],
                causal=case.causal, softcap=case.softcap, window=case.window)


def differentiable(inputs):
    return [name for name in ("q", "k", "v", "prefix_k", "prefix_v") if inputs[name] is not None]


def relative_error(x, ref):
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(x)), "non-finite entries differ from the reference"
    x, ref = x[finite], ref[finite]
    denom = ref.norm()
    return (x - ref).norm().item() / max(denom.item(), 1e-30)


def check_against_reference(case: Case, op, *, tol: float, grad_tol: Optional[float] = None, device="cpu",
                            check_grads=True, lse_grad=True, extra: Optional[dict] = None):
    """Run `op` (same signature as fastprompt.ops.prefix_attention minus backend) and the float64 reference on the
    same inputs; compare out, lse and every input gradient by relative error. With lse_grad the loss also uses
    lse (its gradient folds into the backward's row term); without, only out is differentiated. `extra`: more
    keyword arguments for both (e.g. attn_bias), floating tensors given to the reference in float64."""
    grad_tol = tol if grad_tol is None else grad_tol
    inputs = make_inputs(case, device)
    names = differentiable(inputs)
    ref_inputs = {n: (t.double() if n in names else t) for n, t in inputs.items()}
    for n in names:
        inputs[n].requires_grad_(check_grads)
        ref_inputs[n].requires_grad_(check_grads)

    extra = extra or {}
    ref_extra = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                 for n, t in extra.items()}
    out, lse = op(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                  return_lse=True, **op_kwargs(case, inputs), **extra)
    ref_out, ref_lse = reference.prefix_attention(ref_inputs["q"], ref_inputs["k"], ref_inputs["v"],
                                                  ref_inputs["prefix_k"], ref_inputs["prefix_v"], return_lse=True,
                                                  **op_kwargs(case, ref_inputs), **ref_extra)
    assert out.shape == ref_out.shape and out.dtype == case.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not torch.isnan(out).any()
    errors = {"out": relative_error(out, ref_out), "lse": relative_error(lse, ref_lse)}
    if check_grads:
        grad_out = torch.randn_like(ref_out)
        grad_lse = torch.randn_like(ref_lse).masked_fill(torch.isinf(ref_lse), 0.0)
        ref_loss = (ref_out * grad_out).sum()
        loss = (out.double() * grad_out).sum()
        if lse_grad:
            ref_loss = ref_loss + (ref_lse.masked_fill(torch.isinf(ref_lse), 0.0) * grad_lse).sum()
            loss = loss + (lse.masked_fill(torch.isinf(lse), 0.0).double() * grad_lse).sum()
        ref_grads = torch.autograd.grad(ref_loss, [ref_inputs[n] for n in names])
        grads = torch.autograd.grad(loss, [inputs[n] for n in names])
        for n, g, rg in zip(names, grads, ref_grads):
            assert g.shape == inputs[n].shape and g.dtype == inputs[n].dtype, n
            assert torch.isfinite(g).all(), n  # (a NaN would pass the tolerance check below: NaN > tol is False)
            errors["d" + n] = relative_error(g, rg)
    bad = {n: e for n, e in errors.items() if e > (tol if n in ("out", "lse") else grad_tol)}
    assert not bad, f"{case}: relative errors above tolerance: {bad} (all: {errors})"
    return errors


def assert_compiled_matches_eager(step, inputs, names=("q", "k", "v", "prefix_k", "prefix_v"), seed=11):
    """`step(*tensors) -> loss` eager and under torch.compile(fullgraph, aot_eager), each from the same
    torch.manual_seed (a dropout seed drawn inside the graph comes from the same generator): same loss and the
    same gradient for every tensor in `names`."""
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        tensors = [inputs[n].detach().clone().requires_grad_() for n in names]
        torch.manual_seed(seed)
        loss = fn(*tensors)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in tensors])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def opcheck_args(case: Case):
    """Inputs for `case` (the differentiable ones requiring grad), normalized as the op's front door does
    (check_prefix_attention_args, causal, no scale / softcap / window): what the registered custom ops receive."""
    from fastprompt.ops.prefix_attention_inputs import check_prefix_attention_args

    inputs = make_inputs(case)
    for n in differentiable(inputs):
        inputs[n].requires_grad_()
    return check_prefix_attention_args(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                                       inputs["prefix_index"], inputs["key_padding_mask"], True, None, None, None)
