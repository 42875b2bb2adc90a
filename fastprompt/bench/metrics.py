"""Machine-independent figures of one step: newly allocated bytes, peak live bytes, bytes saved for backward, FLOPs.

- `AllocationTracker` (a TorchDispatchMode) sees every op's outputs; an output whose storage is neither one of the
  op's inputs' storages nor already tracked is a new allocation. It sums their sizes (`new_bytes`) and, with a
  weakref finalizer on each new storage, keeps the live total and its maximum (`peak_bytes`): the CPU stand-in for
  the CUDA allocator's peak, counted above whatever was alive when the step began. fastprompt's own custom ops
  are opened up (their implementation runs under the tracker too), so their internal temporaries count.
- `saved_bytes`: `torch.autograd.graph.saved_tensors_hooks`, unique storages, excluding storages that existed
  before the step (parameters, inputs): the activation memory a step keeps between forward and backward.
- `flops`: `torch.utils.flop_counter.FlopCounterMode`, with this module's formulas for the SDPA ATen ops (the CPU
  flash kernel has no PyTorch formula; PyTorch's refuse grouped-query shapes before torch 2.13), so both sides are
  counted alike on every torch.
On CUDA, `measure_step` also reports the allocator's peak (`cuda_peak_bytes`, above the memory in use at the start).
"""
from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_flatten

__all__ = ["AllocationTracker", "SavedTensorsCounter", "StepFigures", "measure_allocations", "saved_bytes",
           "count_step", "flops", "time_step", "measure_step", "synchronize", "attention_flops", "attention_backward_flops",
           "attention_flop_formulas"]


def _tensors(obj) -> list:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / meta-less wrappers: nothing to count
        return None


def _storage_key(storage) -> Optional[int]:
    if storage is None or storage.nbytes() == 0:
        return None
    return storage.data_ptr()


_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


class AllocationTracker(TorchDispatchMode):
    """Sums the bytes of new storages created by ops run under it, and tracks their live total and peak."""

    def __init__(self, open_namespaces: Iterable[str] = ("fastprompt",)):
        super().__init__()
        self.open_namespaces = set(open_namespaces)
        self.new_bytes = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocations = 0
        self._live: dict[int, int] = {}  # data_ptr -> nbytes of storages allocated under the tracker, still alive
        self.by_op: dict[str, int] = {}  # op name -> new bytes (where the bytes go)

    def _freed(self, key: int) -> None:
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self.live_bytes -= nbytes

    def _record(self, func, outputs, inputs) -> None:
        input_keys = {_storage_key(_storage(t)) for t in inputs}
        for t in outputs:
            storage = _storage(t)
            key = _storage_key(storage)
            if key is None or key in input_keys or key in self._live:
                continue
            nbytes = storage.nbytes()
            self._live[key] = nbytes
            self.new_bytes += nbytes
            self.allocations += 1
            name = str(func)
            self.by_op[name] = self.by_op.get(name, 0) + nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._freed, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        out = None
        if func.namespace in self.open_namespaces and inputs:
            # Run the op's own implementation under this mode, so its internal temporaries are seen.
            key = _DISPATCH_KEY.get(inputs[0].device.type)
            if key is not None:
                with self:
                    out = func.redispatch(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key)), *args,
                                          **kwargs)
        if out is None:
            out = func(*args, **kwargs)
        self._record(func, _tensors(out), inputs)
        return out


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_allocations(step: Callable[[], object]) -> tuple[int, int, int]:
    """(new bytes, peak live bytes, number of new storages) of one call of `step`."""
    tracker = AllocationTracker()
    with tracker:
        result = step()
        del result
    return tracker.new_bytes, tracker.peak_bytes, tracker.allocations


class SavedTensorsCounter:
    """Context manager: unique storages saved for backward inside it, minus the storages of `exclude`."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {_storage_key(_storage(t)) for t in exclude}
        self.seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = _storage(t)
        key = _storage_key(storage)
        if key is not None and key not in self.excluded and key not in self.seen:
            self.seen[key] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def saved_bytes(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages saved for backward during `step`, excluding storages of `exclude` (parameters,
    inputs: they are alive anyway)."""
    with SavedTensorsCounter(exclude) as counter:
        result = step()
        del result
    return counter.nbytes


def count_step(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, int, int]:
    """(new bytes, peak live bytes, saved-for-backward bytes) of one call of `step`, in one run. Tensors are freed
    by reference counting; no gc.collect here (it costs ~1 s once transformers is loaded)."""
    tracker = AllocationTracker()
    with SavedTensorsCounter(exclude) as counter, tracker:
        result = step()
        del result
    return tracker.new_bytes, tracker.peak_bytes, counter.nbytes


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """The two matmuls of SDPA over (batch, heads, length, dim) shapes, counted dense: 2*b*hq*sq*sk*(dq + dv).
    Grouped-query attention (fewer key/value heads) counts every query head, as the kernel broadcasts key/value
    heads. PyTorch's own `sdpa_flop_count` refuses GQA shapes before torch 2.13 (the oldest lane's torch 2.11
    raised on every GQA model), so the bench counts with this formula on every torch."""
    b, h_q, s_q, d_q = query_shape
    b_k, h_kv, s_k, d_k = key_shape
    b_v, h_v, s_v, d_v = value_shape
    if not (b == b_k == b_v and h_kv == h_v and d_q == d_k and s_k == s_v and h_kv and h_q % h_kv == 0):
        raise ValueError(f"attention_flops: incompatible shapes q={tuple(query_shape)}, k={tuple(key_shape)}, "
                         f"v={tuple(value_shape)} (expected (b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, dv) "
                         "with hq a multiple of hkv)")
    return 2 * b * h_q * s_q * s_k * (d_q + d_v)


def attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape) -> int:
    """SDPA's backward as PyTorch counts it, one term per matmul (scores recomputed, dP, dV, dQ, dK):
    2*b*hq*sq*sk*(3*dq + 2*dv), GQA-aware like `attention_flops`."""
    attention_flops(query_shape, key_shape, value_shape)  # the same shape checks
    b, h_q, s_q, d_q = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    if tuple(grad_out_shape) != (b, h_q, s_q, d_v):
        raise ValueError(f"attention_backward_flops: grad_out shape {tuple(grad_out_shape)} is not "
                         f"{(b, h_q, s_q, d_v)}")
    per_head = s_q * s_k * d_q + s_q * s_k * d_v + s_k * s_q * d_v + s_q * s_k * d_q + d_q * s_q * s_k
    return 2 * b * h_q * per_head


def _forward_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _backward_formula(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape)


def attention_flop_formulas() -> dict:
    """FlopCounterMode `custom_mapping` for every SDPA ATen op taking (batch, heads, length, dim) tensors: the CPU
    flash kernel (forward and backward), which PyTorch has no formula for, and the CUDA flash / efficient / cuDNN
    kernels, whose PyTorch formulas refuse GQA before torch 2.13. Both sides of a pair are counted alike."""
    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        forward = getattr(aten, name, None)
        backward = getattr(aten, name + "_backward", None)
        if forward is not None:
            mapping[forward] = _forward_formula
        if backward is not None:
            mapping[backward] = _backward_formula
    return mapping


def flops(step: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as counter:
        result = step()
        del result
    return int(counter.get_total_flops())


def time_step(step: Callable[[], object], device="cpu", *, warmup: int = 1, reps: int = 5,
              min_seconds: float = 0.0, max_reps: int = 50) -> list[float]:
    """Wall-clock seconds of `reps` calls after `warmup` calls (more calls, up to max_reps, until min_seconds
    of timed work). Median of the list is the figure to report: robust to a busy machine."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times: list[float] = []
    total = 0.0
    while len(times) < reps or (total < min_seconds and len(times) < max_reps):
        start = time.perf_counter()
        step()
        synchronize(device)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
    return times


@dataclass
class StepFigures:
    times_s: list = field(default_factory=list)
    new_bytes: int = 0
    peak_bytes: int = 0
    saved_bytes: int = 0
    flops: int = 0
    cuda_peak_bytes: Optional[int] = None

    @property
    def time_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else float("nan")

    def as_dict(self) -> dict:
        return {"time_s": self.time_s, "times_s": list(self.times_s), "new_bytes": self.new_bytes,
                "peak_bytes": self.peak_bytes, "saved_bytes": self.saved_bytes, "flops": self.flops,
                "cuda_peak_bytes": self.cuda_peak_bytes}


def measure_step(step: Callable[[], object], device="cpu", *, exclude: Iterable[torch.Tensor] = (),
                 warmup: int = 1, reps: int = 5, min_seconds: float = 0.0, timing: bool = True) -> StepFigures:
    """All figures of one step. The counting runs happen after the timed ones (they are slower)."""
    fig = StepFigures()
    if timing:
        fig.times_s = time_step(step, device, warmup=warmup, reps=reps, min_seconds=min_seconds)
    else:
        step()  # warm up (lazy init, caches) so the counts are those of a steady-state step
    fig.new_bytes, fig.peak_bytes, fig.saved_bytes = count_step(step, exclude)
    fig.flops = flops(step)
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        synchronize(device)
        fig.cuda_peak_bytes = torch.cuda.max_memory_allocated() - base
    return fig
