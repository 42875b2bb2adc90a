"""The CUDA extension must build and import wherever a CUDA torch and nvcc are present - no GPU needed.

A kernel that fails to compile fails the install, and an extension that compiled but cannot load (missing symbol,
ABI mismatch) fails here, so CI on a GPU-less machine still catches broken CUDA code.
"""
import os
import shutil

import pytest
import torch


def _why_no_build():
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU build: fastprompt._C is not built"
    if os.environ.get("FASTPROMPT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "FASTPROMPT_SKIP_CUDA_BUILD is set: fastprompt._C is not built"
    if os.environ.get("FASTPROMPT_CUDA_BUILD", "").lower() not in ("1", "true", "yes", "on") \
            and not torch.cuda.is_available():
        return "no GPU and FASTPROMPT_CUDA_BUILD is not 1: fastprompt._C is not built by default"
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ""
    if not (shutil.which("nvcc") or os.path.isfile(os.path.join(cuda_home, "bin", "nvcc"))
            or os.path.isfile("/usr/local/cuda/bin/nvcc")):
        return "nvcc not found: fastprompt._C is not built"
    return None


pytestmark = pytest.mark.skipif(_why_no_build() is not None, reason=_why_no_build() or "")


def _expected_archs():
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return {int("".join(ch for ch in a.replace("+PTX", "") if ch.isdigit())) for a in spec.replace(" ", ";").split(";")
            if a.strip()}


def test_extension_imports_and_reports_archs():
    from fastprompt import _C

    info = _C.build_info()
    assert _expected_archs() <= set(info["archs"]), info
    assert {80, 90} <= set(info["archs"]) or "TORCH_CUDA_ARCH_LIST" in os.environ, info
    assert info["nvcc_version"] != "unknown"
    assert set(info["head_dims"]) == {64, 128, 256}
    for name in ("prefix_attention_fwd", "prefix_attention_plan", "gather_fwd", "gather_bwd", "mix_fwd", "mix_bwd"):
        assert callable(getattr(_C, name)), name


def test_cuda_info_reports_the_build():
    from fastprompt._cuda_build_info import cuda_info, cuda_info_text

    info = cuda_info()
    assert info["built"], info
    assert "sm_80" in cuda_info_text() or "TORCH_CUDA_ARCH_LIST" in os.environ


def test_bindings_reject_cpu_tensors_with_a_clear_message():
    from fastprompt import _C

    q = torch.zeros(1, 1, 1, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _C.prefix_attention_fwd(q, q, q, None, None, None, None, True, 1.0, 0.0, -1)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _C.gather_fwd(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def test_cuda_backend_declines_cpu_tensors():
    from fastprompt.ops.prefix_attention_cuda import CudaBackend
    from fastprompt.ops.prefix_attention_inputs import check_prefix_attention_args

    q = torch.zeros(1, 2, 3, 64, dtype=torch.float16)
    args = check_prefix_attention_args(q, q, q, None, None, None, None, True, None, None, None)
    assert any("CUDA tensors" in reason for reason in CudaBackend.not_supported_reasons(args, False))


def test_split_kv_plan():
    """Decode with few CTAs splits the key axis; prefill with a full grid does not; rows = G * Lq per kv head."""
    from fastprompt.ops.prefix_attention_cuda import plan

    config, splits, block_m, _ = plan(B=1, Hq=32, Hkv=8, Lq=1, Lk=4096, D=128, S=1, P=100, sm_count=132)
    assert config == 0 and block_m == 16 and splits > 1
    config, splits, block_m, _ = plan(B=8, Hq=32, Hkv=8, Lq=2048, Lk=2048, D=128, sm_count=132)
    assert config == 1 and block_m == 64 and splits == 1
    config, splits, _, _ = plan(B=1, Hq=8, Hkv=8, Lq=1, Lk=4096, D=64, num_splits=5, sm_count=132)
    assert splits == 5
    config, splits, _, _ = plan(B=1, Hq=8, Hkv=8, Lq=1, Lk=10, D=64, sm_count=132)
    assert splits == 1  # a single key tile is never split
