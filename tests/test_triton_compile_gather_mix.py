"""Ahead-of-time compile of the gather/mix Triton kernels for sm_80 and sm_90, without a GPU.

These kernels are gathers, weighted sums and scatter-adds over feature tiles (no matrix product, so no tensor-core
instruction is expected): the check is that every kernel compiles for both targets at the largest feature tile
the launchers use and fits the target's shared memory. Like tests/test_triton_compile.py, the compiles run in a
subprocess with TRITON_INTERPRET unset (this file run as a script prints one JSON line per compile).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHS = {80: 166912, 90: 232448}
KERNELS = ["_select_mix_fwd_kernel", "_scatter_pool_grad_kernel", "_dense_pool_grad_kernel", "_weights_grad_kernel"]
BLOCK_F = 1024  # the launchers' largest tile (fastprompt/kernels/gather_mix.py: _block_f)


def _compile(name: str, arch: int, dtype: str) -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, str(REPO))
    import fastprompt.kernels.gather_mix as gather_mix

    kernel = getattr(gather_mix, name)
    constexprs = {"BLOCK_F": BLOCK_F, "ACC_DTYPE": tl.float32}
    for flag in ("HAS_WEIGHTS", "DENSE"):
        if flag in kernel.arg_names:
            constexprs[flag] = True
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.startswith("stride_") or arg in ("F", "K", "B"):
            signature[arg] = "i32"
        elif arg == "index_ptr":
            signature[arg] = "*i64"
        elif arg in ("dpool_ptr", "dweights_ptr"):
            signature[arg] = "*fp32"  # gradients accumulate in fp32 buffers
        else:
            signature[arg] = f"*{dtype}"
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    return {"shared": compiled.metadata.shared, "ptx_lines": compiled.asm["ptx"].count("\n")}


def _worker() -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "AOT compiles need TRITON_INTERPRET unset"
    for name in KERNELS:
        for arch in ARCHS:
            for dtype in ("fp16", "bf16", "fp32"):
                record = {"id": f"{name}-sm{arch}-{dtype}"}
                try:
                    record.update(_compile(name, arch, dtype))
                except Exception as exc:  # one failure must not hide the others
                    record["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
                print("COMPILE " + json.dumps(record), flush=True)


@pytest.fixture(scope="module")
def compile_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = env.get("FASTPROMPT_TRITON_AOT_CACHE", str(REPO / ".pytest_cache" / "triton_aot"))
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("COMPILE "):
            record = json.loads(line[len("COMPILE "):])
            results[record["id"]] = record
    if not results:
        pytest.fail(f"compile worker failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return results


pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name", KERNELS)
def test_gather_mix_kernel_compiles_for_target(compile_results, name, arch, dtype):
    record = compile_results.get(f"{name}-sm{arch}-{dtype}")
    assert record is not None
    assert "error" not in record, record["error"]
    assert record["shared"] <= ARCHS[arch]
    assert record["ptx_lines"] > 0


if __name__ == "__main__":
    _worker()
