"""Glue between fastprompt.bench cases and pytest-benchmark: build each compared pair once, check equality and
count both sides once, then let each provider's benchmark time its own side."""
from __future__ import annotations

import gc

import pytest
import torch

from fastprompt.bench import metrics
from fastprompt.bench.runner import compare_outputs

_CACHE: dict = {}


def _counts(side, device):
    new, peak, saved = metrics.count_step(side.step, side.exclude)
    figures = {"new_bytes": new, "peak_bytes": peak, "saved_bytes": saved, "flops": metrics.flops(side.step)}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        side.step()
        torch.cuda.synchronize()
        figures["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base
    return figures


def prepared(case, device):
    """(sides, info) for `case`, built once per session; info has per-side figures, ratios and the check."""
    key = (case.group, case.name, tuple(sorted(case.params.items())), device)
    if key not in _CACHE:
        _CACHE.clear()  # one pair's models at a time
        gc.collect()
        sides = case.build(device)
        equal, diff = compare_outputs(sides["fastprompt"].check(), sides["baseline"].check(), case.tol)
        for side in sides.values():
            side.step()  # warm
        figures = {name: _counts(side, device) for name, side in sides.items()}
        ratios = {k: (figures["fastprompt"][k] / figures["baseline"][k]) if figures["baseline"].get(k) else None
                  for k in figures["fastprompt"]}
        _CACHE[key] = (sides, {"equal": equal, "max_rel_diff": diff, "figures": figures, "ratios": ratios})
    return _CACHE[key]


def run_benchmark(benchmark, case, provider, device, rounds=None):
    sides, info = prepared(case, device)
    name = "fastprompt" if provider == "fastprompt" else "baseline"
    side = sides[name]
    benchmark.group = f"{case.group}: {case.name} [{case.label()}]"
    benchmark.extra_info.update({
        "provider": provider if provider == "fastprompt" else case.baseline,
        "params": case.params,
        **{k: v for k, v in info["figures"][name].items()},
        "ratio_fastprompt_over_baseline": info["ratios"],
        "equal_outputs": info["equal"],
        "max_rel_diff": info["max_rel_diff"],
    })
    if torch.device(device).type == "cuda":
        def step():
            side.step()
            torch.cuda.synchronize()
    else:
        step = side.step
    benchmark.pedantic(step, rounds=rounds or case.reps, warmup_rounds=1, iterations=1)
    assert info["equal"], f"fastprompt and {case.baseline} disagree: max relative difference {info['max_rel_diff']}"


PROVIDERS = pytest.mark.parametrize("provider", ["fastprompt", "peft"])
