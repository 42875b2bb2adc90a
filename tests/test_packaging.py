"""The built wheel installs the Triton kernels as fastprompt.kernels and never as a top-level `kernels` module
(that name belongs to another package on the index)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_has_fastprompt_kernels_and_no_top_level_kernels(tmp_path):
    env = dict(os.environ, FASTPROMPT_SKIP_CUDA_BUILD="1")  # the layout, not the CUDA build, is under test here
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(tmp_path), str(ROOT)], check=True, env=env, cwd=tmp_path)
    wheel = next(tmp_path.glob("fastprompt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastprompt/kernels/__init__.py" in names
    assert "fastprompt/kernels/prefix_attention_fwd.py" in names
    assert "fastprompt/ops/prefix_attention.py" in names
    top_level = {n.split("/")[0] for n in names if not n.startswith("fastprompt-")}
    assert top_level == {"fastprompt"}, f"unexpected top-level entries in the wheel: {sorted(top_level)}"
