"""Selected `fastprompt bench` / pytest-benchmark rows of two checkouts, timed in one sitting, turn about.

    python benchmarks/turn_about_rows.py --before OLD_CHECKOUT --after . --rounds 3 [--only NAME ...]

Each round runs every row once per checkout, in a fresh process per checkout (order before, after / after,
before alternating), each row through fastprompt.bench.runner.run_case (both sides of a pair timed turn about).
Prints one markdown row per pair: each checkout's fastprompt / baseline time ratio, median over the rounds with
their min-max, the per-turn ratio IQR of the after runs, and the new-bytes ratio. On a shared machine the spread,
not a single ratio, says whether a row is above parity.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def rows():
    from fastprompt.bench.cases import attention_case, gather_case, generate_case, mix_case, train_case
    from fastprompt.bench.models import ModelShape

    small = ModelShape(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512, vocab=512)
    medium = ModelShape(layers=4, hidden=512, heads=8, kv_heads=2, intermediate=1024, vocab=1024)
    return {
        "gather_prompts fwd+bwd B=8 N=16 L=8 d=512": lambda: gather_case(8, 16, 8, 512),
        "mix_prompts fwd+bwd B=8 N=16 L=8 d=512": lambda: mix_case(8, 16, 8, 512),
        "train prefix tuning L4 h256 B=4 S=128 P=16": lambda: train_case("prefix", small, 4, 128, 16, reps=3),
        "attn fwd+bwd B=8 S=256 P=32 Hq=4 Hkv=1 D=128": lambda: attention_case("fwd+bwd", 8, 256, 32, hq=4, hkv=1,
                                                                               dim=128),
        "attn fwd+bwd B=8 S=64 P=32": lambda: attention_case("fwd+bwd", 8, 64, 32),
        "attn fwd+bwd B=8 S=128 P=32": lambda: attention_case("fwd+bwd", 8, 128, 32),
        "attn fwd+bwd B=8 S=256 P=8": lambda: attention_case("fwd+bwd", 8, 256, 8),
        "attn fwd+bwd B=8 S=256 P=32": lambda: attention_case("fwd+bwd", 8, 256, 32),
        "attn decode B=8 S=512 P=32": lambda: attention_case("decode", 8, 512, 32, reps=10),
        "generate L4 h512 B=8 S=64 P=32 new=8": lambda: generate_case(medium, 8, 64, 32, 8, reps=2),
    }


def _child(names, out):
    import torch

    from fastprompt.bench.runner import run_case

    torch.set_num_threads(1)
    table = rows()
    result = {}
    for name in names:
        rec = run_case(table[name]())
        if "error" in rec:
            result[name] = {"error": rec["error"]}
            continue
        result[name] = {"ratio": rec["ratios"]["time_s"], "turns": rec["time_ratio_reps"],
                        "bytes": rec["ratios"]["new_bytes"], "verdict": rec["verdict"],
                        "fp_s": rec["figures"]["fastprompt"]["time_s"], "base_s": rec["figures"]["baseline"]["time_s"]}
    with open(out, "w") as fh:
        json.dump(result, fh)


def _fmt(values):
    return f"{statistics.median(values):.3f}x ({min(values):.2f}-{max(values):.2f})" if values else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.only or list(rows())
    if args.child:
        _child(names, args.child)
        return 0
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for tree in (("before", "after") if i % 2 == 0 else ("after", "before")):
                path = os.path.abspath(getattr(args, tree))
                out = os.path.join(tmp, f"{tree}{i}.json")
                env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
                subprocess.run([sys.executable, os.path.abspath(__file__), "--before", ".", "--after", ".",
                                "--child", out, "--only", *names], cwd=path, env=env, check=True,
                               stderr=subprocess.DEVNULL)
                with open(out) as fh:
                    runs[tree].append(json.load(fh))
                print(f"round {i + 1}/{args.rounds}: {tree} done", file=sys.stderr, flush=True)
    print("| pair | time before | time after | after per-turn IQR | after ms (fp / base) | new bytes after | verdict |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        before = [r[name]["ratio"] for r in runs["before"] if "ratio" in r[name]]
        after = [r[name] for r in runs["after"] if "ratio" in r[name]]
        if not after:
            print(f"| {name} | {_fmt(before)} | error: {runs['after'][0][name].get('error')} | | | | |")
            continue
        turns = sorted(t for r in after for t in r["turns"])
        q = statistics.quantiles(turns, n=4) if len(turns) > 1 else [turns[0]] * 3
        ms = (f"{1e3 * statistics.median(r['fp_s'] for r in after):.2f} / "
              f"{1e3 * statistics.median(r['base_s'] for r in after):.2f}")
        print(f"| {name} | {_fmt(before)} | {_fmt([r['ratio'] for r in after])} | {q[0]:.2f}-{q[2]:.2f} "
              f"({len(turns)} turns) | {ms} | {after[0]['bytes']:.2f}x | {after[0]['verdict']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
