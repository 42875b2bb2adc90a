"""`fastprompt bench` and `fastprompt info` (console script `fastprompt`, or `python -m fastprompt`)."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from typing import Optional, Sequence


def _bench(args) -> int:
    import warnings

    import torch

    # transformers/peft deprecation notices would interleave with the progress bar; they are not results
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from .bench import runner

    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("fastprompt bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    mode = ("smoke" if args.smoke else "quick" if args.quick else "full" if args.full else "vision" if args.vision
            else "default")
    threads = args.threads if args.threads else (1 if torch.device(device).type == "cpu" else 0)
    if threads:
        # One thread by default on the CPU: on a shared machine, OpenMP teams spin-wait on busy cores and turn
        # timings into noise (a tiny attention call: 1 ms on one thread, ~90 ms on two under load).
        torch.set_num_threads(threads)
    cases = runner.suite(mode, device)
    if args.filter:
        cases = [c for c in cases if args.filter.lower() in f"{c.group} {c.name}".lower()]
    start = time.perf_counter()
    meta = {"command": "fastprompt " + " ".join(sys.argv[1:]) if sys.argv[1:] else "fastprompt bench",
            "mode": mode, "date": runner.now_utc(), "threads": threads, "machine": runner.machine_info(device),
            "versions": runner.versions()}
    budget = args.budget if args.budget is not None else {"default": 140.0, "quick": 60.0}.get(mode)
    results = runner.run_suite(cases, device, progress=not args.no_progress, budget_s=budget or None)
    meta["runtime_s"] = time.perf_counter() - start
    meta["loadavg_end"] = runner.machine_info(device).get("loadavg")
    paths = runner.write_outputs(results, args.out, meta)

    m = meta["machine"]
    v = meta["versions"]
    print(f"fastprompt bench ({mode}) on {m.get('gpu') or m['cpu']} ({m['cpu_count']} cores, "
          f"{m['torch_threads']} torch threads), {meta['date']}")
    print(f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, triton {v['triton']}")
    print("ratios are fastprompt / baseline (below 1.00x: fastprompt better); times are medians\n")
    print(runner.format_table(results))
    print()
    print(runner.legend(results))
    rows = runner.targets(results)
    if rows:
        print("\ntargets (benchmark goals):")
        print(runner.format_targets(rows))
    print()
    print(textwrap.fill(f"{runner.summary_line(results)}; runtime {meta['runtime_s']:.0f} s", width=120,
                        subsequent_indent="  "))
    print(f"wrote {paths['json']}, {paths['png']}, {paths['table']} (full shapes and figures)")
    verdicts = [r.get("verdict", "error") for r in results if "skipped" not in r]
    if "fastprompt wrong" in verdicts:  # a wrong result is a bug, whatever the speed
        print("fastprompt bench: fastprompt disagrees with the oracle (rows marked FP WRONG)", file=sys.stderr)
        return 1
    failed = [v for v in verdicts if v not in ("equal", "baseline wrong", "different method")]
    return 1 if failed and args.strict else 0


def _info(args) -> int:
    # Versions come from package metadata: importing transformers and peft alone would take seconds.
    from . import __version__
    from ._versions import TESTED_RANGES, installed_versions, range_status

    rows = [("fastprompt", __version__, "")]
    for name, version in installed_versions().items():
        low, high = TESTED_RANGES[name]
        status = range_status(name, version)
        note = f"tested {low} - {high}" + ("" if status == "tested" else f"  <- {status.upper()}")
        rows.append((name, version or "not installed", note))

    import torch

    rows.append(("CUDA (torch)", torch.version.cuda or "none (CPU build)", ""))
    rows.append(("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", ""))
    try:
        from ._cuda_build_info import cuda_info, cuda_info_text

        info = cuda_info()
        ext = "built for " + ", ".join(f"sm_{a}" for a in info.get("archs", [])) if info.get("built") else "not built"
        rows.append(("fastprompt._C", ext, ""))
        detail = cuda_info_text()
    except Exception as exc:  # the build-info module may be absent or broken: say so, do not fail
        rows.append(("fastprompt._C", f"unknown ({type(exc).__name__}: {exc})", ""))
        detail = None
    rows.append(("CPU", f"{_cpu_name()} ({os.cpu_count()} cores)", ""))
    width = max(len(k) for k, _, _ in rows)
    vwidth = max(len(v) for _, v, _ in rows)
    for key, value, note in rows:
        print(f"{key:<{width}}  {value:<{vwidth}}  {note}".rstrip())
    if detail:
        print(detail)
    print()
    print(_backend_table(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    return 0


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _backend_cases(device):
    import torch

    def t(*shape, dtype=torch.float32):
        return torch.zeros(*shape, device=device, dtype=dtype)

    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    b, hq, hkv, s, p, d = 2, 8, 2, 16, 4, 64
    yield "training, shared prefix", dict(q=t(b, hq, s, d, dtype=dtype), k=t(b, hkv, s, d, dtype=dtype),
                                          v=t(b, hkv, s, d, dtype=dtype), prefix_k=t(hkv, p, d, dtype=dtype),
                                          prefix_v=t(hkv, p, d, dtype=dtype)), True
    yield "inference, per-sample prefix, padding", dict(
        q=t(b, hq, s, d, dtype=dtype), k=t(b, hkv, s, d, dtype=dtype), v=t(b, hkv, s, d, dtype=dtype),
        prefix_k=t(b, hkv, p, d, dtype=dtype), prefix_v=t(b, hkv, p, d, dtype=dtype),
        key_padding_mask=torch.ones(b, s, dtype=torch.bool, device=device)), False
    yield "decode (Lq=1), prefix pool + index", dict(
        q=t(b, hq, 1, d, dtype=dtype), k=t(b, hkv, s, d, dtype=dtype), v=t(b, hkv, s, d, dtype=dtype),
        prefix_k=t(5, hkv, p, d, dtype=dtype), prefix_v=t(5, hkv, p, d, dtype=dtype),
        prefix_index=torch.tensor([0, 3], device=device)), False
    yield "training, softcap (Gemma 2)", dict(q=t(b, hq, s, d, dtype=dtype), k=t(b, hkv, s, d, dtype=dtype),
                                              v=t(b, hkv, s, d, dtype=dtype), prefix_k=t(hkv, p, d, dtype=dtype),
                                              prefix_v=t(hkv, p, d, dtype=dtype), softcap=50.0), True
    yield "training, head dim 256", dict(q=t(b, hq, s, 256, dtype=dtype), k=t(b, hkv, s, 256, dtype=dtype),
                                         v=t(b, hkv, s, 256, dtype=dtype), prefix_k=t(hkv, p, 256, dtype=dtype),
                                         prefix_v=t(hkv, p, 256, dtype=dtype)), True


def _backend_table(device: str) -> str:
    """Which backend `auto` picks for a few typical calls on `device`."""
    import torch

    from .ops.prefix_attention import resolve_backend
    from .ops.prefix_attention_inputs import check_prefix_attention_args

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return f"backend 'auto' on {device}: no CUDA device available"
    lines = [f"backend chosen by backend='auto' on {device}:"]
    rows = []
    for label, kw, needs_grad in _backend_cases(device):
        try:
            args = check_prefix_attention_args(kw["q"], kw["k"], kw["v"], kw.get("prefix_k"), kw.get("prefix_v"),
                                               kw.get("prefix_index"), kw.get("key_padding_mask"), True, None,
                                               kw.get("softcap"), None)
            q = kw["q"]
            shape = f"{kw['prefix_k'].dim()}D prefix, q {list(q.shape)} {str(q.dtype).replace('torch.', '')}"
            rows.append((label, shape, resolve_backend("auto", args, needs_grad)))
        except Exception as exc:
            rows.append((label, "", f"error: {exc}"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines.append(f"  {'case':<{w0}}  {'inputs':<{w1}}  backend")
    lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastprompt", description="fastprompt: fused prefix attention for "
                                     "prompt learning")
    parser.add_argument("--version", action="version", version=f"fastprompt {_own_version()}")
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="compare fastprompt with the PEFT + transformers path (time, memory, "
                           "FLOPs, equal outputs); writes a table, JSON and a chart")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer and smaller cases (about a minute on a CPU)")
    size.add_argument("--full", action="store_true", help="every sweep and the reference training shape "
                      "(8 layers, hidden 512, B=8, S=256, P=32), and the vision rows (slow on a CPU)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, for tests (seconds)")
    size.add_argument("--vision", action="store_true", help="only the vision continual-learning rows: DualPrompt "
                      "and CODA-Prompt on ViT-B/16 vs their reference implementations' attention (several "
                      "minutes on a CPU; also part of --full)")
    bench.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    bench.add_argument("--out", default="bench_out", help="output folder for bench.json, bench.png, bench.md "
                       "(default ./bench_out)")
    bench.add_argument("--filter", default=None, help="only cases whose group/name contains this text")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 1 on the CPU: steady timings on a shared machine)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                       help="past this many seconds, skip the remaining sweep cases and time the rest once "
                       "(default 140 for the default run, 60 with --quick, none otherwise; 0 = none)")
    bench.add_argument("--strict", action="store_true", help="also exit 1 when a pair is unequal without an oracle verdict or raised an error (a pair "
                       "where fastprompt disagrees with the oracle always exits 1; one where only the baseline does "
                       "never does)")
    info = sub.add_parser("info", help="versions, CUDA extension, and the backend 'auto' picks")
    info.add_argument("--device", default=None, help="device of the backend table (default: cuda when available)")
    return parser


def _own_version() -> str:
    from . import __version__

    return __version__


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "info":
        return _info(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
