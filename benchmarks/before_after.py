"""Before/after table of `fastprompt bench` for two checkouts, from runs taken turn about.

    python benchmarks/before_after.py --before /path/to/old/checkout --after . --runs 3 --out ba_out [-- bench args]

Runs `python -m fastprompt bench` from each checkout in alternation (before, after, after, before, ...), so a
change of machine load hits both alike, then prints one markdown row per compared pair: each checkout's
fastprompt / baseline time ratio (median over the runs, with the min-max over the runs) and new-bytes / peak ratios
(deterministic counts). Extra arguments after `--` go to every bench run (default: `--budget 0`, so no sweep is
skipped and both checkouts run the same rows).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _run(tree: str, out: str, bench_args: list) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "fastprompt", "bench", "--out", out, "--no-progress", *bench_args]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if not os.path.exists(os.path.join(out, "bench.json")):
        raise SystemExit(f"bench failed in {tree}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "bench.json")) as fh:
        return json.load(fh)


def _key(r: dict) -> tuple:
    return r["group"], r["name"], tuple(sorted((k, str(v)) for k, v in r["params"].items()))


def _fmt(values: list, digits: int = 2) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1 or max(values) - min(values) < 10 ** -digits:
        return f"{med:.{digits}f}x"
    return f"{med:.{digits}f}x ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="before_after_out")
    parser.add_argument("--collect", action="store_true", help="only tabulate the runs already in --out")
    parser.add_argument("bench_args", nargs="*")
    args = parser.parse_args(argv)
    bench_args = args.bench_args or ["--budget", "0"]
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    runs = {"before": [], "after": []}
    for i in range(args.runs):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        for name in order:
            out = os.path.join(args.out, f"{name}_{i}")
            if args.collect:
                if os.path.exists(os.path.join(out, "bench.json")):
                    with open(os.path.join(out, "bench.json")) as fh:
                        runs[name].append(json.load(fh))
                continue
            runs[name].append(_run(trees[name], out, bench_args))
            print(f"run {i} {name}: {runs[name][-1]['meta']['runtime_s']:.0f} s", file=sys.stderr)
    rows = {}
    for name, payloads in runs.items():
        for payload in payloads:
            for r in payload["results"]:
                if "ratios" in r:
                    rows.setdefault(_key(r), {"r": r, "before": [], "after": []})[name].append(r["ratios"])
    head = ["case", "shape", "vs", "time before", "time after", "new bytes before", "new bytes after", "peak after",
            "equal after"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    verdicts = {}
    for payload in runs["after"]:
        for r in payload["results"]:
            verdicts.setdefault(_key(r), []).append(r.get("verdict") or ("equal" if r.get("equal") else "unequal"))
    for key, row in rows.items():
        r = row["r"]
        shape = " ".join(f"{k}={v}" for k, v in r["params"].items() if k != "kind")

        def vals(name, fig):
            return [x[fig] for x in row[name] if x.get(fig) is not None]
        print("| " + " | ".join([
            r["name"], shape, r["baseline"], _fmt(vals("before", "time_s")), _fmt(vals("after", "time_s")),
            _fmt(vals("before", "new_bytes")), _fmt(vals("after", "new_bytes")), _fmt(vals("after", "peak_bytes")),
            "/".join(sorted(set(verdicts.get(key, ["-"]))))]) + " |")
    meta = runs["after"][-1]["meta"]
    print(f"\n{len(runs['after'])} runs per checkout, turn about; {meta['machine']['cpu']}, "
          f"{meta['machine']['torch_threads']} torch thread(s); versions {meta['versions']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
