"""Before/after table of `fastprompt bench` for two checkouts, from runs taken turn about.

    python benchmarks/before_after.py --before /path/to/old/checkout --after . --runs 3 --out ba_out [-- bench args]

Runs `python -m fastprompt bench` from each checkout in alternation (before, after, after, before, ...), so a
change of machine load hits both alike, then prints one markdown row per compared pair: each checkout's
fastprompt / baseline time ratio (median over the runs, with the min-max over the runs) and new-bytes / peak ratios
(deterministic counts). Extra arguments after `--` go to every bench run (default: `--budget 0`, so no sweep is
skipped and both checkouts run the same rows). `--json PATH` also writes the runs' metadata and the rows
(benchmarks/results/before_after_*.json, rendered into RESULTS.md by benchmarks/render_figures.py); `--collect`
tabulates the runs already in --out.

Each checkout is imported as it installs, not from its root: see _installed_layout.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from typing import Optional


def _installed_layout(tree: str, into: str) -> str:
    """A folder that imports `fastprompt` from `tree` as the package installs it, and nothing else from the tree.

    A tree's root is not an import root: older trees keep the Triton kernels in a top-level `kernels/` folder that
    installs as `fastprompt.kernels` (pyproject's package-dir), and that folder on the path would shadow the
    unrelated `kernels` distribution transformers imports. So the folder holds a `fastprompt/` of links to the
    tree's package entries (plus `kernels` -> the top-level folder where the tree has one) and links to the tree's
    other top-level entries (csrc/ and the like, which the package finds relative to itself)."""
    os.makedirs(os.path.join(into, "fastprompt"), exist_ok=True)
    for name in os.listdir(tree):
        if name not in ("fastprompt", "kernels", ".git") and not os.path.lexists(os.path.join(into, name)):
            os.symlink(os.path.join(tree, name), os.path.join(into, name))
    package = os.path.join(tree, "fastprompt")
    links = {name: os.path.join(package, name) for name in os.listdir(package)}
    if os.path.isdir(os.path.join(tree, "kernels")) and "kernels" not in links:
        links["kernels"] = os.path.join(tree, "kernels")
    for name, target in links.items():
        if not os.path.lexists(os.path.join(into, "fastprompt", name)):
            os.symlink(target, os.path.join(into, "fastprompt", name))
    return into


def _run(tree: str, out: str, bench_args: list) -> dict:
    root = _installed_layout(tree, os.path.join(out, "import_root"))
    env = dict(os.environ, PYTHONPATH=root, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "fastprompt", "bench", "--out", out, "--no-progress", *bench_args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if not os.path.exists(os.path.join(out, "bench.json")):
        raise SystemExit(f"bench failed in {tree}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "bench.json")) as fh:
        return json.load(fh)


def _key(r: dict) -> tuple:
    # the baseline too: a case compared with two baselines (the vision rows: eager and SDPA concat) is two pairs
    return r["group"], r["name"], r["baseline"], tuple(sorted((k, str(v)) for k, v in r["params"].items()))


def _fmt(values: list, digits: int = 2) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1 or max(values) - min(values) < 10 ** -digits:
        return f"{med:.{digits}f}x"
    return f"{med:.{digits}f}x ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _git(tree: str, *args: str) -> Optional[str]:
    proc = subprocess.run(["git", "-C", tree, *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _tree_meta(tree: str) -> dict:
    """Which code a checkout ran: its commit, and the git tree hash of its fastprompt/ folder (equal hashes: the
    same package source, whatever else the commits changed), with whether that folder had uncommitted changes."""
    return {"path": tree, "commit": _git(tree, "rev-parse", "HEAD"),
            "subject": _git(tree, "log", "-1", "--format=%s"),
            "fastprompt_tree": _git(tree, "rev-parse", "HEAD:fastprompt"),
            "fastprompt_uncommitted": bool(_git(tree, "status", "--porcelain", "--", "fastprompt"))}


def compare(runs: dict) -> list[dict]:
    """One record per compared pair, in the order the bench ran them: each checkout's ratios over its runs (the
    fastprompt / baseline figures of `ratios`), and the after checkout's verdicts. A pair only one checkout ran
    (a renamed or new case) has an empty list on the other side."""
    rows = {}
    for name in ("before", "after"):
        for payload in runs[name]:
            for r in payload["results"]:
                if "ratios" not in r:
                    continue
                row = rows.setdefault(_key(r), {"group": r["group"], "name": r["name"], "params": r["params"],
                                                "baseline": r["baseline"], "before": [], "after": [],
                                                "verdicts_after": []})
                row[name].append(r["ratios"])
                if name == "after":
                    row["verdicts_after"].append(r.get("verdict") or ("equal" if r.get("equal") else "unequal"))
    return list(rows.values())


def _values(row: dict, name: str, figure: str) -> list:
    return [x[figure] for x in row[name] if x.get(figure) is not None]


def spread(values: list) -> float:
    """The run-to-run spread of one checkout's figure: max - min over its runs."""
    return max(values) - min(values) if values else 0.0


def slower(row: dict) -> Optional[float]:
    """How far the after checkout's median time ratio lies above the before one's, where that is more than the
    larger of the two run-to-run spreads (a slowdown the runs can tell from noise); None otherwise."""
    before, after = _values(row, "before", "time_s"), _values(row, "after", "time_s")
    if not before or not after:
        return None
    gap = statistics.median(after) - statistics.median(before)
    return gap if gap > max(spread(before), spread(after)) else None


HEAD = ["case", "shape", "vs", "time before", "time after", "new bytes before", "new bytes after", "peak after",
        "equal after"]


def table(rows: list[dict]) -> list[str]:
    """The markdown table: one row per compared pair; times are the median over the runs (min-max over the runs)."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for row in rows:
        shape = " ".join(f"{k}={v}" for k, v in row["params"].items() if k != "kind")
        lines.append("| " + " | ".join([
            row["name"], shape, row["baseline"], _fmt(_values(row, "before", "time_s")),
            _fmt(_values(row, "after", "time_s")), _fmt(_values(row, "before", "new_bytes")),
            _fmt(_values(row, "after", "new_bytes")), _fmt(_values(row, "after", "peak_bytes")),
            "/".join(sorted(set(row["verdicts_after"]))) or "-"]) + " |")
    return lines


def run_meta(name: str, index: int, payload: dict) -> dict:
    meta = payload["meta"]
    return {"checkout": name, "index": index, "date": meta["date"], "runtime_s": meta["runtime_s"],
            "loadavg": meta["machine"].get("loadavg"), "loadavg_end": meta.get("loadavg_end"),
            "command": meta["command"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="before_after_out")
    parser.add_argument("--collect", action="store_true", help="only tabulate the runs already in --out")
    parser.add_argument("--json", metavar="PATH", help="also write the runs' metadata and the compared rows here "
                                                       "(benchmarks/render_figures.py renders RESULTS.md from it)")
    parser.add_argument("bench_args", nargs="*")
    args = parser.parse_args(argv)
    bench_args = args.bench_args or ["--budget", "0"]
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    args.out = os.path.abspath(args.out)
    runs = {"before": [], "after": []}
    order = []
    for i in range(args.runs):
        turn = ("before", "after") if i % 2 == 0 else ("after", "before")
        for name in turn:
            out = os.path.join(args.out, f"{name}_{i}")
            if args.collect:
                if os.path.exists(os.path.join(out, "bench.json")):
                    with open(os.path.join(out, "bench.json")) as fh:
                        runs[name].append(json.load(fh))
                    order.append(run_meta(name, i, runs[name][-1]))
                continue
            runs[name].append(_run(trees[name], out, bench_args))
            order.append(run_meta(name, i, runs[name][-1]))
            print(f"run {i} {name}: {runs[name][-1]['meta']['runtime_s']:.0f} s", file=sys.stderr)
    rows = compare(runs)
    print("\n".join(table(rows)))
    meta = runs["after"][-1]["meta"]
    print(f"\n{len(runs['after'])} runs per checkout, turn about; {meta['machine']['cpu']}, "
          f"{meta['machine']['torch_threads']} torch thread(s); versions {meta['versions']}", file=sys.stderr)
    for row in rows:
        gap = slower(row)
        if gap is not None:
            print(f"slower after by {gap:.2f} (more than the run-to-run spread): {row['name']} {row['params']}",
                  file=sys.stderr)
    if args.json:
        payload = {"meta": {"command": shlex.join(["python", "benchmarks/before_after.py",
                                                   *(sys.argv[1:] if argv is None else argv)]),
                            "before": _tree_meta(trees["before"]), "after": _tree_meta(trees["after"]),
                            "bench_args": bench_args, "runs_per_checkout": len(runs["after"]), "runs": order,
                            "machine": meta["machine"], "versions": meta["versions"]},
                   "rows": rows}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
