"""Prompt hoisting on a Llama-like model (8 query / 2 KV heads): a prompt-tuning training step (unpatched PEFT vs
the same PEFT model patched: the virtual tokens run once, not once per row) and greedy generation (32-token prompt,
32 new tokens; the baseline is PEFT's semantics with its cache written by hand, since PEFT's own prompt-tuning
generate() is wrong on transformers >= 5.24), for P in {20, 100, 200} at B=8, S=128.

extra_info also carries the ratios predicted by counting tokens (fastprompt.bench.cases_hoisting.predicted_ratios)
and, for generation, the bytes the KV cache holds at the end (hoisted: real tokens only)."""
import pytest

from _pairs import run_benchmark
from fastprompt.bench.cases_hoisting import (
    REFERENCE,
    hoist_generate_case,
    hoist_train_case,
    measured_cache_bytes,
    predicted_ratios,
)
from fastprompt.bench.models import ModelShape

SMALL = ModelShape(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512, vocab=512)
PLENS = [20, 100, 200]


def _shape(device, size):
    return REFERENCE if (size == "full" or device.startswith("cuda")) else SMALL


@pytest.mark.parametrize("provider", ["fastprompt", "peft"])
@pytest.mark.parametrize("plen", PLENS)
def test_train_step_prompt_tuning_hoisted(benchmark, device, bench_size, provider, plen):
    shape = _shape(device, bench_size)
    benchmark.extra_info["predicted"] = predicted_ratios(shape, 8, 128, plen)
    run_benchmark(benchmark, hoist_train_case(shape, 8, 128, plen), provider, device)


@pytest.mark.parametrize("provider", ["fastprompt", "peft"])
@pytest.mark.parametrize("plen", PLENS)
def test_generate_prompt_tuning_hoisted(benchmark, device, bench_size, provider, plen):
    shape = _shape(device, bench_size)
    benchmark.extra_info["predicted"] = predicted_ratios(shape, 8, 32, plen, new=32)
    if provider == "fastprompt":
        benchmark.extra_info["cache"] = measured_cache_bytes(shape, 8, 32, plen, 32, device)
    run_benchmark(benchmark, hoist_generate_case(shape, 8, 32, plen, 32), provider, device)
