import os

# Triton kernels run on the CPU through the interpreter; it is read when kernels are decorated, so it must be set
# before anything imports triton. Tests that compile for a real GPU target run in a subprocess without it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist each worker takes one core: intra-op threads of two workers would only contend.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: fresh random inputs every case, never all-zeros.
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield
