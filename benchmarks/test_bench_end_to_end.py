"""End to end on a Llama-like model (8 query / 2 KV heads): one training step (forward + backward + AdamW) of
prefix tuning and prompt tuning (PEFT vs the same PEFT model after fastprompt.patch_model), a prompt pool
(fastprompt vs per-row prefixes in a DynamicCache, the PEFT way), and greedy batched generation, including a
mixed-task batch (fastprompt: one batch, per-row task prefixes; PEFT: one batch per task adapter).

Default sizes are small enough for a CPU; --bench-size full runs the reference shape (8 layers, hidden 512,
B=8, S=256, P=32), --device cuda a larger one."""
import pytest

from _pairs import run_benchmark
from fastprompt.bench.cases import generate_case, train_case
from fastprompt.bench.models import ModelShape

SMALL = ModelShape(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512, vocab=512)
REFERENCE = ModelShape(layers=8, hidden=512, heads=8, kv_heads=2, intermediate=1024, vocab=1024)


def _train_shape(device, size):
    if device.startswith("cuda"):
        return REFERENCE, 8, 1024
    return (REFERENCE, 8, 256) if size == "full" else (SMALL, 4, 128)


@pytest.mark.parametrize("provider", ["fastprompt", "peft"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_train_step_peft(benchmark, device, bench_size, provider, method):
    shape, batch, seq = _train_shape(device, bench_size)
    run_benchmark(benchmark, train_case(method, shape, batch, seq, 32 if bench_size == "full" else 16), provider,
                  device)


@pytest.mark.parametrize("provider", ["fastprompt", "explicit"])
def test_train_step_prompt_pool(benchmark, device, bench_size, provider):
    shape, batch, seq = _train_shape(device, bench_size)
    run_benchmark(benchmark, train_case("pool", shape, batch, seq, 32 if bench_size == "full" else 16), provider,
                  device)


@pytest.mark.parametrize("provider", ["fastprompt", "peft"])
@pytest.mark.parametrize("tasks", [1, 4])
def test_generate(benchmark, device, bench_size, provider, tasks):
    shape = REFERENCE if (bench_size == "full" or device.startswith("cuda")) else SMALL
    run_benchmark(benchmark, generate_case(shape, 8, 32, 16, 8, tasks=tasks), provider, device)
