"""Distributed training is a tested feature: 2-process DDP and FSDP2 (`fully_shard`) on gloo.

A patched PEFT prefix-tuning model and a fastprompt PromptPool train a few steps on 2 processes, each on half of a
batch; their prompt parameters must equal a single-process run on the full batch (tests/distributed_worker.py).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
SCENARIOS = ("peft_prefix_tuning", "prompt_pool")


def _run(mode: str, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    for attempt in range(2):
        result = subprocess.run([sys.executable, str(WORKER), "--mode", mode, "--out", str(out)], env=env,
                                capture_output=True, text=True, timeout=900)
        # torch 2.13's gloo can abort a rank at process-group teardown ("terminate called without an active
        # exception", seen once in CI): a rank killed by a signal is run again once; any other failure fails.
        if result.returncode == 0 or "terminated with signal" not in result.stderr:
            break
    assert result.returncode == 0, f"{mode} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    for mode in ("single", "ddp", "fsdp2"):
        _run(mode, out)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes_equal_one_process_on_the_full_batch(runs, scenario, mode):
    single = torch.load(runs / f"{scenario}-single.pt")
    multi = torch.load(runs / f"{scenario}-{mode}.pt")
    assert single and set(single) == set(multi), (sorted(single), sorted(multi))
    initial = torch.load(runs / f"{scenario}-initial.pt")
    assert any((single[n] - initial[n]).abs().max() > 1e-3 for n in single), "training did not move the prompt"
    for name, expected in single.items():
        got = multi[name]
        assert got.shape == expected.shape, name
        rel = (got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{scenario} {mode}: {name} differs from the single-process run (rel {rel:.2e})"
