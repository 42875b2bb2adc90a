"""benchmarks/before_after.py: the rows it compares, the slowdown it reports, and the import layout it runs a
checkout under (an old tree's top-level kernels/ folder must not shadow the `kernels` distribution)."""
import os
import subprocess
import sys

from script_modules import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ba = load_script("benchmarks/before_after.py")


def _payload(times: dict) -> dict:
    return {"results": [{"group": "g", "name": name, "params": {"B": 2}, "baseline": "peft", "verdict": "equal",
                         "ratios": {"time_s": t, "new_bytes": 0.5, "peak_bytes": 0.4}}
                        for name, t in times.items()]}


def test_rows_pair_by_label_and_a_case_one_side_lacks_stays_one_sided():
    runs = {"before": [_payload({"a": 1.0, "old name": 0.9})], "after": [_payload({"a": 1.1, "new name": 0.8})]}
    rows = {r["name"]: r for r in ba.compare(runs)}
    assert [x["time_s"] for x in rows["a"]["before"]] == [1.0] and [x["time_s"] for x in rows["a"]["after"]] == [1.1]
    assert rows["old name"]["after"] == [] and rows["new name"]["before"] == []
    assert ba.slower(rows["old name"]) is None and ba.slower(rows["new name"]) is None


def test_one_case_against_two_baselines_is_two_rows():
    """The vision rows compare one case with the eager and the SDPA reference: two pairs, never averaged."""
    def payload(eager, sdpa):
        return {"results": [dict(r, group="vision CL", name="query pass", params={"B": 2}, verdict="equal")
                            for r in ({"baseline": "eager concat", "ratios": {"time_s": eager, "new_bytes": 0.58}},
                                      {"baseline": "SDPA concat", "ratios": {"time_s": sdpa, "new_bytes": 1.0}})]}

    rows = ba.compare({"before": [payload(0.9, 1.1)], "after": [payload(0.8, 1.2)]})
    assert [(r["baseline"], [x["new_bytes"] for x in r["after"]]) for r in rows] == [("eager concat", [0.58]),
                                                                                     ("SDPA concat", [1.0])]


def test_slower_only_beyond_the_larger_spread():
    runs = {"before": [_payload({"tie": t, "slow": s}) for t, s in ((1.0, 1.0), (1.2, 1.02), (1.1, 1.01))],
            "after": [_payload({"tie": t, "slow": s}) for t, s in ((1.25, 1.2), (1.05, 1.22), (1.15, 1.21))]}
    rows = {r["name"]: r for r in ba.compare(runs)}
    # tie: medians 1.10 / 1.15, gap 0.05 within the spreads (0.20); slow: gap 0.20 beyond both spreads (0.02)
    assert ba.slower(rows["tie"]) is None
    assert abs(ba.slower(rows["slow"]) - 0.20) < 1e-9
    table = ba.table(list(rows.values()))
    assert table[2].startswith("| tie | B=2 | peft | 1.10x (1.00-1.20) | 1.15x (1.05-1.25) |")


def test_a_checkout_is_imported_as_installed(tmp_path):
    tree = tmp_path / "tree"
    (tree / "fastprompt").mkdir(parents=True)
    (tree / "fastprompt" / "__init__.py").write_text("")
    (tree / "kernels").mkdir()
    (tree / "kernels" / "__init__.py").write_text("WHERE = 'the tree'\n")
    root = ba._installed_layout(str(tree), str(tmp_path / "root"))
    code = ("import importlib.util, sys, fastprompt.kernels as k; print(k.WHERE); "
            "spec = importlib.util.find_spec('kernels'); "
            "print(spec is None or not spec.origin.startswith((sys.argv[1], sys.argv[2])))")
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code, str(tree), root], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["the", "tree", "True"]
