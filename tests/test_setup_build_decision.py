"""setup.py decides whether to compile fastprompt._C: never by surprise on a machine without a GPU.

`python setup.py --version` runs the same decision as an install and prints it, without building anything.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _decision(**env_overrides) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTPROMPT_CUDA_BUILD", "FASTPROMPT_SKIP_CUDA_BUILD")}
    env.update(env_overrides)
    # --version: setup() parses the command line but builds nothing; the decision is printed while importing setup.py
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the default build is wanted here")
def test_no_gpu_means_no_cuda_build_by_default_and_says_how_to_ask():
    text = _decision()
    assert "installing pure Python" in text
    assert "FASTPROMPT_CUDA_BUILD=1" in text


def test_opting_out_is_respected():
    assert "installing pure Python" in _decision(FASTPROMPT_CUDA_BUILD="0")
    assert "installing pure Python" in _decision(FASTPROMPT_SKIP_CUDA_BUILD="1")


@pytest.mark.skipif(not torch.version.cuda, reason="a CPU build of torch never builds the extension")
def test_asking_for_the_build_plans_it_with_a_time_estimate():
    text = _decision(FASTPROMPT_CUDA_BUILD="1", TORCH_CUDA_ARCH_LIST="9.0")
    if "nvcc not found" in text:
        pytest.skip("nvcc is not installed here")
    assert "building fastprompt._C for archs 90" in text and "minutes" in text
