"""Ahead-of-time compile of every Triton prefix-attention kernel for sm_80 and sm_90, without a GPU.

Checks that each kernel x tile config compiles, fits the target's shared memory, and lowers its matmuls to
tensor-core instructions (mma.sync on sm_80, wgmma or mma.sync on sm_90). TRITON_INTERPRET is read when kernels
are decorated and the test session sets it, so the compiles run in one subprocess with it unset; that process
(this file run as a script) prints one JSON line per compile, with the registers per thread ptxas reports.
Only the selected tests' kernels are compiled (`-k bias` compiles the biased variants alone).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARCHS = {80: 166912, 90: 232448}  # compute capability -> max dynamic shared memory per block (bytes)
REPO = Path(__file__).resolve().parents[1]

# kernel module, kernel name, config list name
KERNELS = [
    ("prefix_attention_fwd", "_prefix_attention_fwd_kernel", "FWD_CONFIGS"),
    ("prefix_attention_bwd", "_prefix_attention_bwd_dkdv_kernel", "BWD_DKDV_CONFIGS"),
    ("prefix_attention_bwd", "_prefix_attention_bwd_dq_kernel", "BWD_DQ_CONFIGS"),
    ("prefix_attention_bwd", "_prefix_attention_bwd_dprefix_kernel", "BWD_DPREFIX_CONFIGS"),
]
_FP32_POINTERS = {"Lse", "LSE", "DELTA"}
_BIAS_FLAGS = ("HAS_BIAS", "HAS_PBIAS")
_FLOAT_SCALARS = {"score_scale", "cap_scale", "sm_scale", "dropout_scale"}
# specialized to 1 at launch, as Triton does for int args equal to 1 (a bias's key stride is 1 unless transposed)
_UNIT_STRIDES = {"stride_is", "stride_mn", "stride_bn", "stride_pbn"}


def _import_kernels():
    """fastprompt.kernels from this checkout, however the checkout is (or is not) installed."""
    sys.path.insert(0, str(REPO))
    import fastprompt.kernels  # noqa: F401

    return sys.modules["fastprompt.kernels"]


def _signature(kernel, dtype: str, constexprs: dict):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride_") or name in ("Lq", "Lk", "P", "S", "G", "window", "num_p_tiles",
                                                    "prefix_keys", "dropout_threshold"):
            signature[name] = "i32"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        elif name in ("PIDX", "DROPOUT_SEED"):
            signature[name] = "*i64"
        elif name == "KPM":
            signature[name] = "*u8"
        elif name in _FP32_POINTERS or (name in ("DPK", "DPV") and constexprs.get("ATOMIC")):
            signature[name] = "*fp32"
        else:
            signature[name] = f"*{dtype}"
    return signature


# T5 with a prefix: prefix, padding mask, causal decoder, atomics for the shared prefix's gradient; no window or
# softcap. T5 training in train() mode adds attention dropout (_T5_TRAINING_FEATURES, with the biases).
_T5_FEATURES = {"HAS_PREFIX", "HAS_KPM", "CAUSAL", "ATOMIC"}
_T5_TRAINING_FEATURES = _T5_FEATURES | {"HAS_DROPOUT"}


def _compile_one(kernel, cfg, dtype: str, head_dim: int, arch: int, features, bias: bool = False):
    import triton
    from triton.backends.compiler import GPUTarget

    constexprs = dict(HEAD_D=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    # features=True: every feature on, the largest variant of each kernel (prefix, padding mask, causal + window,
    # softcap, atomics, attention dropout); False: the plain variant (no prefix, no mask, not causal, no dropout);
    # a set: those flags on. bias: also the additive score biases (attn_bias / prefix_bias, T5's position bias).
    for flag in ("HAS_PREFIX", "HAS_KPM", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "ATOMIC", "HAS_DROPOUT"):
        if flag in kernel.arg_names:
            constexprs[flag] = flag in features if isinstance(features, (set, frozenset)) else features
    for flag in _BIAS_FLAGS:
        if flag in kernel.arg_names:
            constexprs[flag] = bias
    for name in _UNIT_STRIDES & set(kernel.arg_names):
        constexprs[name] = 1
    signature = _signature(kernel, dtype, constexprs)
    # Pointers and (non-unit) strides get the 16-divisibility hint a real launch with aligned tensors gets.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name not in constexprs and (signature[name].startswith("*") or name.startswith("stride_"))}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    start = time.time()
    compiled = triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = compiled.asm["ptx"]
    return dict(shared=compiled.metadata.shared, mma_sync=ptx.count("mma.sync"), wgmma=ptx.count("wgmma.mma_async"),
                **_resource_usage(compiled.asm.get("cubin")), seconds=round(time.time() - start, 2))


def _resource_usage(cubin) -> dict:
    """Registers per thread and stack bytes per thread (spills live there) of the compiled kernel, from cuobjdump's
    resource usage (-1 when that tool is missing). Without a GPU the launcher never loads the binary, so Triton's
    own n_regs / n_spills stay unset."""
    import re
    import shutil
    import tempfile

    from triton.backends.nvidia import compiler as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")  # bundled next to ptxas
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump") or ""
    if not cubin or not tool:
        return dict(registers=-1, stack=-1)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {key: re.search(rf"{key}:(\d+)", usage) for key in ("REG", "STACK")}
    return dict(registers=int(found["REG"].group(1)) if found["REG"] else -1,
                stack=int(found["STACK"].group(1)) if found["STACK"] else -1)


def _jobs():
    """Job dicts. Every kernel x config once per arch with every feature on, at the head dim the config is meant
    for, fp16 and bf16 alternating (both dtypes compile for every kernel). Plus the forward's plain variant (no
    prefix, mask or causality), and the decode variant (Lq = 1 shrinks the query tile to 16 rows) of the query-tiled
    kernels on sm_90, where 16-row tiles cannot use wgmma. With FASTPROMPT_COMPILE_FULL=1 also, per kernel, fp32 at
    head dims 64 and 256 with the config the launcher picks (sm_80; no tensor cores expected: fp32 runs as exact
    FMA; slow, up to ~1.5 min per compile). Biased variants on sm_90: T5's feature set at every biased config, with
    and without attention dropout (T5 training), its decode step, and every feature. config -1 = the launcher's
    pick."""
    kernels = _import_kernels()
    jobs = []
    full = os.environ.get("FASTPROMPT_COMPILE_FULL") == "1"
    for ki, (module, name, configs) in enumerate(KERNELS):
        cfgs = getattr(kernels, configs)
        for ci, cfg in enumerate(cfgs):
            for ai, arch in enumerate(ARCHS):
                dtype = ("fp16", "bf16")[(ci + ai) % 2]
                jobs.append(dict(kernel=ki, config=ci, arch=arch, dtype=dtype, head_dim=cfg.max_head_dim))
        for head_dim in (64, 256) if full else ():
            jobs.append(dict(kernel=ki, config=-1, arch=80, dtype="fp32", head_dim=head_dim))
        if name in ("_prefix_attention_fwd_kernel", "_prefix_attention_bwd_dq_kernel"):
            jobs.append(dict(kernel=ki, config=-1, arch=90, dtype="bf16", head_dim=128, decode=True))
        if name == "_prefix_attention_fwd_kernel":
            jobs.append(dict(kernel=ki, config=1, arch=90, dtype="fp16", head_dim=128, plain=True))
        # With attn_bias / prefix_bias on sm_90: T5's feature set (_T5_FEATURES) at every config, bf16 and fp16
        # alternating, and its decode step (Lq = 1: T5's decoder generating, head dim 64) of the query-tiled
        # kernels; every feature plus the biases at the d128 config.
        for ci, cfg in enumerate(_configs(kernels, dict(kernel=ki, bias=True))):
            jobs.append(dict(kernel=ki, config=ci, arch=90, dtype=("bf16", "fp16")[ci % 2], head_dim=cfg.max_head_dim,
                             t5=True, bias=True))
            # T5 training: the same with attention dropout (mask regenerated per tile), dtypes the other way round
            jobs.append(dict(kernel=ki, config=ci, arch=90, dtype=("fp16", "bf16")[ci % 2], head_dim=cfg.max_head_dim,
                             t5=True, bias=True, dropout=True))
        if name in ("_prefix_attention_fwd_kernel", "_prefix_attention_bwd_dq_kernel"):
            jobs.append(dict(kernel=ki, config=-1, arch=90, dtype="bf16", head_dim=64, decode=True, t5=True,
                             bias=True))
        jobs.append(dict(kernel=ki, config=1, arch=90, dtype="fp16", head_dim=128, bias=True))
    if os.environ.get("FASTPROMPT_COMPILE_SUBSET") == "1":
        jobs = [job for job in jobs if _in_subset(kernels, job)]
    return jobs


def _in_subset(kernels, job) -> bool:
    """The jobs the version lanes of CI compile (FASTPROMPT_COMPILE_SUBSET=1; .ci/run's newest and oldest lanes):
    each kernel once per arch at its largest config with every feature, its decode and plain variants, and on sm_90
    the biased T5 training variant (biases + dropout) at the first biased config, the biased decode step and every
    feature plus the biases: each code path of each kernel on each arch, compiled by that lane's Triton and ptxas,
    about a third of the matrix. The locked lane (the README's command) compiles every job."""
    if job.get("decode") or job.get("plain"):
        return True
    if job.get("bias"):
        return (job.get("dropout", False) and job["config"] == 0) or not job.get("t5")
    return job["config"] == len(getattr(kernels, KERNELS[job["kernel"]][2])) - 1


def _configs(kernels, job):
    """The config list the launcher picks from: biased calls, and biased calls with dropout, have their own for
    some kernels."""
    name = KERNELS[job["kernel"]][2]
    prefixes = (["BIASED_DROPOUT_"] if job.get("dropout") else []) + ["BIASED_"] if job.get("bias") else []
    for prefix in prefixes:
        if hasattr(kernels, prefix + name):
            return getattr(kernels, prefix + name)
    return getattr(kernels, name)


def _job_config(kernels, job):
    cfgs = _configs(kernels, job)
    cfg = cfgs[job["config"]] if job["config"] >= 0 else kernels.pick_config(
        cfgs, job["head_dim"], 4 if job["dtype"] == "fp32" else 2)
    return kernels.fit_block_m(cfg, 1) if job.get("decode") else cfg


def _job_id(job) -> str:
    name = KERNELS[job["kernel"]][1].strip("_").replace("prefix_attention_", "")
    variant = "plain" if job.get("plain") else "decode" if job.get("decode") else "t5" if job.get("t5") else "all"
    if job.get("t5") and job.get("decode"):
        variant += "-t5"
    if job.get("dropout"):
        variant += "-dropout"
    if job.get("bias"):
        variant += "-bias"
    return f"{name}-cfg{job['config']}-sm{job['arch']}-{job['dtype']}-d{job['head_dim']}-{variant}"


def _worker(shard: int, shards: int) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "AOT compiles need TRITON_INTERPRET unset"
    kernels = _import_kernels()
    import importlib

    selected = os.environ.get("FASTPROMPT_COMPILE_IDS")
    jobs = [job for job in _jobs() if selected is None or _job_id(job) in selected.split(",")]
    for job in jobs[shard::shards]:
        module, name, configs = KERNELS[job["kernel"]]
        kernel = getattr(importlib.import_module(f"fastprompt.kernels.{module}"), name)
        cfg = _job_config(kernels, job)
        record = dict(id=_job_id(job), block_m=cfg.block_m, block_n=cfg.block_n, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
        try:
            features = ((_T5_TRAINING_FEATURES if job.get("dropout") else _T5_FEATURES) if job.get("t5")
                        else not job.get("plain"))
            record.update(_compile_one(kernel, cfg, job["dtype"], job["head_dim"], job["arch"], features,
                                       bool(job.get("bias"))))
        except Exception as exc:  # reported per compile so one failure does not hide the others
            causes, err = [], exc
            while err is not None:
                causes.append(f"{type(err).__name__}: {err}")
                err = err.__cause__
            record["error"] = " <- ".join(causes)[-3000:]
        print("COMPILE " + json.dumps(record), flush=True)


@pytest.fixture(scope="module")
def compile_results(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # only the jobs of the tests selected in this session (-k, node ids)
    env["FASTPROMPT_COMPILE_IDS"] = ",".join(
        _job_id(item.callspec.params["job"]) for item in request.session.items
        if item.module is sys.modules[__name__] and hasattr(item, "callspec") and "job" in item.callspec.params)
    env["TRITON_CACHE_DIR"] = env.get("FASTPROMPT_TRITON_AOT_CACHE", str(REPO / ".pytest_cache" / "triton_aot"))
    # Compiles are CPU-bound and independent: a few worker processes, each taking every n-th job.
    shards = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(shards)], env=env, cwd=str(REPO),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(shards)]
    results, failures = {}, []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        for line in out.splitlines():
            if line.startswith("COMPILE "):
                r = json.loads(line[len("COMPILE "):])
                results[r["id"]] = r
        if proc.returncode != 0:
            failures.append(f"rc={proc.returncode}: {err[-3000:]}")
    if failures and not results:
        pytest.fail("compile workers failed:\n" + "\n".join(failures))
    return results


def _cases():
    if importlib.util.find_spec("triton") is None:
        return []
    return [pytest.param(job, id=_job_id(job)) for job in _jobs()]


pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.mark.parametrize("job", _cases())
def test_kernel_compiles_for_target(compile_results, job):
    r = compile_results.get(_job_id(job))
    assert r is not None, f"no compile result for {_job_id(job)}"
    assert "error" not in r, r["error"]
    limit = ARCHS[job["arch"]]
    assert r["shared"] <= limit, f"{r['shared']} bytes of shared memory > sm_{job['arch']} limit {limit}"
    if job["dtype"] != "fp32":
        assert r["mma_sync"] + r["wgmma"] > 0, f"no tensor-core MMA instruction in the PTX: {r}"


if __name__ == "__main__":
    _worker(int(sys.argv[1]) if len(sys.argv) > 1 else 0, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
