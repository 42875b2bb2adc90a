"""Benchmarks of fastprompt against the PEFT + transformers path: shared harness for `fastprompt bench` and the
pytest-benchmark suites in benchmarks/.

- metrics: time, newly allocated bytes, peak live bytes, bytes saved for backward, FLOPs of one step
- baselines: the PEFT-style prefix attention (per-row prefix, torch.cat, 4D mask, repeat_kv, SDPA)
- models: Llama-like builders, PEFT models, the explicit prompt-pool formulation
- cases: the compared pairs (fastprompt side vs baseline side, each with an equality check)
- runner: suites, table, targets, JSON and chart
"""
from .metrics import AllocationTracker, StepFigures, flops, measure_allocations, measure_step, saved_bytes, time_step

__all__ = ["AllocationTracker", "StepFigures", "flops", "measure_allocations", "measure_step", "saved_bytes",
           "time_step"]
