"""The CUDA kernels' own source, run on the CPU through a host emulation of its warp primitives.

csrc/emulation/prefix_attention_emulation.cpp compiles the real kernel body (csrc/prefix_attention_fwd_kernel.cuh)
with g++ and replaces mma.sync / ldmatrix / shfl / cp.async by implementations built from the PTX ISA fragment
layouts, then checks decode and prefill tile shapes, split-KV and masking against a float64 reference; likewise
gather_mix_emulation.cpp for the gather/mix kernels (atomics, block reductions). This is the
check of the tensor-core index arithmetic that CI can run without a GPU; tests/test_cuda_kernels.py is the real one.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "csrc", "emulation")


def _compiler():
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None or not sys.platform.startswith("linux"):
        return None
    probe = subprocess.run([cxx, "-std=c++20", "-x", "c++", "-fsyntax-only", "-"], input="#include <barrier>\n",
                           capture_output=True, text=True)
    return cxx if probe.returncode == 0 else None


def _build_and_run(source, tmp_path):
    exe = tmp_path / os.path.splitext(source)[0]
    build = subprocess.run([_compiler(), "-std=c++20", "-O2", "-I", os.path.join(EMULATION, "fake_cuda"),
                            "-I", os.path.join(ROOT, "csrc"), os.path.join(EMULATION, source), "-o", str(exe),
                            "-lpthread"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "EMULATION OK" in run.stdout, run.stdout + run.stderr


needs_cxx20 = pytest.mark.skipif(_compiler() is None, reason="needs g++ with C++20 <barrier> on Linux")


@needs_cxx20
def test_prefix_attention_kernel_under_host_emulation(tmp_path):
    _build_and_run("prefix_attention_emulation.cpp", tmp_path)


@needs_cxx20
def test_gather_mix_kernels_under_host_emulation(tmp_path):
    _build_and_run("gather_mix_emulation.cpp", tmp_path)
