"""gather_prompts / mix_prompts (forward + backward) vs their plain torch formulations (pool[index], einsum)."""
import pytest

from _pairs import run_benchmark
from fastprompt.bench.cases import gather_case, mix_case

TORCH_VS = pytest.mark.parametrize("provider", ["fastprompt", "torch"])


@TORCH_VS
@pytest.mark.parametrize("batch", [8, 64])
def test_gather_prompts(benchmark, device, provider, batch):
    run_benchmark(benchmark, gather_case(batch, 16, 8, 512), provider, device)


@TORCH_VS
@pytest.mark.parametrize("batch", [8, 64])
def test_mix_prompts(benchmark, device, provider, batch):
    run_benchmark(benchmark, mix_case(batch, 16, 8, 512), provider, device)
