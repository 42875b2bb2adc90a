"""`fastprompt bench --smoke` end to end (tiny shapes): table, JSON and PNG written, every compared pair equal;
`fastprompt info` prints versions and the backend choice."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# generous: on a loaded 2-core machine the smoke bench ran 3-7x slower than alone (its time is not what is tested)
def _run(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fastprompt", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_bench_smoke_writes_json_png_and_all_pairs_agree(tmp_path):
    out = tmp_path / "bench"
    proc = _run("bench", "--smoke", "--out", str(out), "--no-progress", "--strict")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "bench.json").read_text())
    results = payload["results"]
    assert {r["group"] for r in results} == {"attention", "prompts op", "train step", "generate"}
    for r in results:
        assert "error" not in r, r
        # every pair is equal, or the baseline is wrong and fastprompt matches the oracle (PEFT generate on
        # transformers 5.24); a pair where fastprompt is wrong would have made the command exit 1
        assert r["verdict"] in ("equal", "baseline wrong"), r
        if r["verdict"] == "baseline wrong":
            assert r["oracle"]["fastprompt_ok"] and not r["oracle"]["baseline_ok"]
            assert r["reason"].startswith("baseline wrong: PEFT generate on transformers "), r["reason"]
        else:
            assert r["equal"], f"{r['name']} {r['params']}: max rel diff {r['max_rel_diff']}"
    for r in results:  # generation and op pairs are checked against an oracle, each side separately
        if r["group"] != "train step":
            assert r["oracle"]["fastprompt_ok"], r

    # the printed table fits 120 columns, with a legend for every column and every verdict of the equal column
    table = proc.stdout.split("\n\n")[1]
    assert table.splitlines()[0].split()[:3] == ["#", "case", "vs"]
    assert len(table.splitlines()) == len(results) + 2
    assert max(len(line) for line in proc.stdout.splitlines() if not line.startswith(("wrote", "fastprompt bench"))
               and "compared pairs" not in line) <= 120
    for column in ("#", "case", "vs", "fp ms", "base ms", "time", "±", "new", "peak", "saved", "FLOPs", "equal"):
        assert any(line.startswith(f"  {column} ") for line in proc.stdout.splitlines()), column
    for verdict in ("yes", "BASE WRONG", "FP WRONG", "NO", "ERROR"):
        assert any(line.startswith(f"  {verdict} ") for line in proc.stdout.splitlines()), verdict
    assert "compared pairs gave equal outputs" in proc.stdout

    # bench.md: headed by machine, versions, threads and date, then the full table
    md = (out / "bench.md").read_text()
    assert md.startswith("# fastprompt bench (smoke)")
    header = md.split("| # | group |")[0]
    for row in ("| date | 20", "| machine | ", "| threads | torch 1 thread", "| versions | fastprompt ",
                "transformers ", "peft ", "| command | "):
        assert row in header, row
    assert "| # | group | case | shape |" in md and "columns:" in md
    for r in results:
        for side in ("fastprompt", "baseline"):
            fig = r["figures"][side]
            assert fig["time_s"] > 0 and fig["new_bytes"] > 0
        assert r["ratios"]["new_bytes"] is not None
    assert payload["meta"]["versions"]["torch"]
    assert any("prefix_overhead" in r for r in results)
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


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


def _sabotaged_gather(pool, index, **kwargs):
    return pool[index] * 1.01  # a wrong fastprompt result


def test_bench_exits_nonzero_when_fastprompt_disagrees_with_the_oracle(tmp_path, monkeypatch, capsys):
    from fastprompt import cli
    from fastprompt.bench import cases

    monkeypatch.setattr(cases, "gather_prompts", _sabotaged_gather)  # the function the gather case calls
    code = cli.main(["bench", "--smoke", "--filter", "gather", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FP WRONG" in out and "fastprompt wrong: differs from the oracle" in out
    assert json.loads((tmp_path / "bench.json").read_text())["results"][0]["verdict"] == "fastprompt wrong"


def test_baseline_wrong_is_named_flagged_and_does_not_fail(tmp_path):
    """A pair whose baseline contradicts the oracle while fastprompt matches it: verdict "baseline wrong" with the
    reason, BASE WRONG in the table, flagged in the summary line, bench.md and the chart; not an exit-1 failure."""
    import torch

    from fastprompt.bench import runner
    from fastprompt.bench.cases import Case, Side
    from fastprompt.bench.oracle import Oracle

    x = torch.randn(7, 5)

    def build(device):
        right = Side(lambda: x * 2, lambda: {"out": x * 2})
        wrong = Side(lambda: x * 2 + 1, lambda: {"out": x * 2 + 1})
        return {"fastprompt": right, "baseline": wrong,
                "oracle": Oracle(lambda: {"out": (x * 2).double()}, "x times two", "PEFT generate", 1e-6)}

    record = runner.run_case(Case("generate", "generate", {"model": "L2 h64 4q/2kv", "B": 7, "S": 5, "P": 1,
                                                           "new": 1}, build, reps=2), "cpu")
    assert record["verdict"] == "baseline wrong" and not record["equal"]
    assert record["reason"].startswith("baseline wrong: PEFT generate on transformers ")
    assert "BASE WRONG" in runner.format_table([record])
    assert "1 baseline wrong (PEFT generate on transformers" in runner.summary_line([record])
    meta = {"mode": "test", "date": runner.now_utc(), "threads": 1, "machine": runner.machine_info(),
            "versions": runner.versions(), "runtime_s": 1.0}
    paths = runner.write_outputs([record], str(tmp_path), meta)
    assert "BASE WRONG" in open(paths["table"]).read()
    assert open(paths["png"], "rb").read()[:4] == b"\x89PNG"
