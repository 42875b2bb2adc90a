"""`fastprompt bench --smoke` end to end (tiny shapes): table, JSON and PNG written, every compared pair equal;
`fastprompt info` prints versions and the backend choice."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=170):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fastprompt", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_bench_smoke_writes_json_png_and_all_pairs_agree(tmp_path):
    out = tmp_path / "bench"
    proc = _run("bench", "--smoke", "--out", str(out), "--no-progress", "--strict")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "equal (max rel diff)" in proc.stdout
    payload = json.loads((out / "bench.json").read_text())
    results = payload["results"]
    assert {r["group"] for r in results} == {"attention", "prompts op", "train step", "generate"}
    for r in results:
        assert "error" not in r, r
        assert r["equal"], f"{r['name']} {r['params']}: max rel diff {r['max_rel_diff']}"
        for side in ("fastprompt", "baseline"):
            fig = r["figures"][side]
            assert fig["time_s"] > 0 and fig["new_bytes"] > 0
        assert r["ratios"]["new_bytes"] is not None
    assert payload["meta"]["versions"]["torch"]
    assert any("prefix_overhead" in r for r in results)
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "bench.md").read_text().startswith("| group |")


def test_info_prints_versions_and_backends():
    proc = _run("info", "--device", "cpu", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for word in ("torch", "transformers", "peft", "fastprompt._C", "backend chosen by backend='auto' on cpu"):
        assert word in proc.stdout
    assert "torch" in proc.stdout.split("backend chosen")[1]


def test_bench_help():
    proc = _run("bench", "--help", timeout=60)
    assert proc.returncode == 0
    for flag in ("--quick", "--full", "--device", "--out", "--smoke"):
        assert flag in proc.stdout
