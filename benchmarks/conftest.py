"""pytest-benchmark suites: fastprompt vs the PEFT + transformers path, in the same run.

    pytest benchmarks/ --benchmark-only                      # CPU, small shapes (a few minutes)
    pytest benchmarks/ --benchmark-only --device cuda        # GPU sweeps (S 128-4096)
    pytest benchmarks/ --benchmark-only --bench-size full    # every sweep on the CPU (slow)

Each benchmark is one side (provider "fastprompt" or the baseline) of one compared pair; pytest-benchmark groups
the two sides of a pair together. extra_info holds the machine-independent figures of the step (new bytes,
peak live bytes, bytes saved for backward, FLOPs), the fastprompt/baseline ratios, and whether the two sides gave
equal outputs. The harness is fastprompt.bench (shared with `fastprompt bench`).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fastprompt bench")
    group.addoption("--device", default="cpu", help="cpu (default) or cuda")
    group.addoption("--bench-size", default="default", choices=("default", "full"),
                    help="default: small CPU shapes; full: every sweep")
    group.addoption("--bench-threads", type=int, default=1,
                    help="torch CPU threads (default 1: steady timings on a shared machine; 0 = torch's choice)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=1)
    if threads and config.getoption("--device", default="cpu") == "cpu":
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device(request):
    dev = request.config.getoption("--device")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda but no CUDA device")
    return dev


@pytest.fixture(scope="session")
def bench_size(request):
    return request.config.getoption("--bench-size")
