"""Run every command README.md gives, from the repository root, as a user would (a CI step of .ci/run).

Commands are read from README.md itself: each line of a ```bash block, and each inline `code span` that starts
like a command (fastprompt, python, pytest, bash, OUT=...). A command runs with the lane's virtual environment
first on PATH, in the repository root. A command is skipped only for a reason written in SKIP below (a GPU, several
nodes, a user's own script); a README command that is neither run nor skipped for a reason fails the step, so a new
command cannot go untested by omission. The two install-and-run commands at the top of the README are the locked
lane's own (.ci/run runs the test command verbatim and the main job's after it, and this script checks that they
are there); commands that use the `.venv` those create run in the locked lane (`--lane locked`), every other one in
the newest lane (`--lane newest`).

    python .ci/readme_commands.py --lane newest --venv .venv-newest [--list]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (pattern matched against the whole command, reason it is not run here)
SKIP = [
    (r"^torchrun |^accelerate launch ", "launches the user's own train.py on GPUs / several nodes; the same "
                                         "patch-then-wrap runs in tests/test_distributed.py (2 gloo processes)"),
    (r"--device cuda", "needs a CUDA GPU (none on CI machines); benchmarks/gpu_session.sh runs it on a lent GPU"),
    (r"gpu_session\.sh", "needs a CUDA GPU; its install step is rehearsed by .ci/gpu_image_lane.sh"),
    (r"^pip -v$", "a flag to add to the install command, not a command"),
    (r"^fastprompt bench --vision$", "ViT-B/16 training steps on the CPU, about 15 minutes on 2 cores, past CI's "
                                     "time; the same cases run at a tiny ViT in tests/test_bench_vision.py"),
    (r"^fastprompt bench --full$", "the default run's cases plus every sweep and the reference training shape: "
                                   "more than 15 minutes on 2 cores, past CI's time; the same harness and cases "
                                   "run here as `fastprompt bench` and `--quick`"),
]
# Commands the locked lane of .ci/run runs verbatim itself (they create .venv from requirements-lock.txt).
VERBATIM_IN_CI_RUN = [r"^python3 -m venv \.venv && "]
# Commands that use that .venv: run by this script in the locked lane.
USES_LOCKED_VENV = r"^\.venv/bin/"
COMMAND_START = re.compile(r"^(fastprompt|python3?|pytest|bash|OUT=\S+ bash|HF_HUB_OFFLINE=1 python|\.venv/bin/)(\s|$)")


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()  # a trailing "   # comment"
            if line and not line.startswith("#"):
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        span = span.strip()
        if COMMAND_START.match(span) or span == "pip -v":
            commands.extend(_expand_optional(span))
    seen, unique = set(), []
    for c in commands:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def _expand_optional(command: str) -> list[str]:
    """`pytest benchmarks/ --benchmark-only [--device cuda]` is two commands: without and with the bracket."""
    match = re.search(r"\s*\[([^\]]+)\]", command)
    if not match:
        return [command]
    without = (command[: match.start()] + command[match.end():]).strip()
    return [without, (command[: match.start()] + " " + match.group(1) + command[match.end():]).strip()]


def _program(command: str) -> str:
    """What a command runs, without the install before its last `&&`, leading VAR=value settings or the locked
    venv's `.venv/bin/` prefix: `python3 -m venv .venv && ... && .venv/bin/fastprompt bench` -> `fastprompt bench`."""
    last = command.split("&&")[-1].strip()
    last = re.sub(r"^(\w+=\S+\s+)+", "", last)
    return re.sub(r"^\.venv/bin/", "", last)


def _run_by_locked_lane(command: str) -> bool:
    return any(re.search(p, command) for p in VERBATIM_IN_CI_RUN) or bool(re.search(USES_LOCKED_VENV, command))


def decision(command: str, lane: str, commands: list[str] = ()):
    # The README shows some programs twice, once inside the locked install line and once bare (`fastprompt bench`,
    # an example script): CI runs each program once, in the locked lane, and the bare spelling says where.
    if not _run_by_locked_lane(command):
        for other in commands:
            if other != command and _run_by_locked_lane(other) and _program(other) == _program(command):
                return "locked", f"the same program as `{other}`, run by the locked lane"
    for pattern in VERBATIM_IN_CI_RUN:
        if re.search(pattern, command):
            if command not in (ROOT / ".ci" / "run").read_text():
                return "unknown", "an install command the locked lane of .ci/run must run verbatim, and does not"
            return "locked", "run verbatim by the locked lane of .ci/run"
    for pattern, reason in SKIP:
        if re.search(pattern, command):
            return "skip", reason
    if re.search(USES_LOCKED_VENV, command):
        return ("run", "") if lane == "locked" else ("locked", "uses the locked lane's .venv: run there")
    if COMMAND_START.match(command):
        return ("run", "") if lane == "newest" else ("newest", "run in the newest lane")
    return "unknown", "neither run nor skipped for a reason: add it to SKIP with the reason, or make it runnable"


def _start_rank(command: str) -> int:
    """Which commands start first when several run at a time: the examples and the pytest suites (minutes), then
    the bench runs (about a minute), then the rest (seconds), so that the two workers finish together."""
    if re.search(r"\bexamples/|\bpytest\b", command):
        return 0
    return 1 if re.search(r"\bfastprompt bench\b", command) else 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lane", choices=("locked", "newest"), required=True)
    parser.add_argument("--venv", required=True, help="the lane's virtual environment (its bin/ goes first on PATH)")
    parser.add_argument("--list", action="store_true", help="only say what would run")
    parser.add_argument("--logs", default=str(ROOT / ".ci-cache" / "readme_commands"))
    parser.add_argument("--jobs", type=int, default=2, help="commands run at a time (default 2: CI's cores)")
    args = parser.parse_args(argv)
    venv = Path(args.venv).resolve()
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    env.pop("PYTHONPATH", None)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    commands = readme_commands((ROOT / "README.md").read_text())
    to_run = []
    for i, command in enumerate(commands):
        kind, reason = decision(command, args.lane, commands)
        if kind != "run" or args.list:
            print(f"[{kind}] {command}" + (f"  -- {reason}" if reason else ""), flush=True)
            if kind == "unknown":
                failed.append(command)
            continue
        to_run.append((i, command))
    to_run.sort(key=lambda item: _start_rank(item[1]))

    def run(item):
        i, command = item
        log = logs / f"{i:02d}.log"
        start = time.time()
        with open(log, "w") as out:
            rc = subprocess.run(command, shell=True, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL).returncode
        return command, rc, time.time() - start, log

    # The commands run `--jobs` at a time: each is single-threaded (the bench, its pytest suites and the newest
    # lane's examples default to one torch thread), so on CI's 2 cores two at a time take about half the wall time
    # and change nothing a command checks. Lines come in the order the commands start (_start_rank).
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for command, rc, seconds, log in pool.map(run, to_run):
            print(f"[run] {command}  -> exit {rc} in {seconds:.0f} s", flush=True)
            if rc != 0:
                failed.append(command)
                print("".join(log.read_text().splitlines(keepends=True)[-30:]), flush=True)
    if failed:
        print(f"README commands failed or unclassified: {failed}")
        return 1
    print(f"README commands ({args.lane} lane): {len(commands)} read, each run here, in the other lane, or "
          "skipped for the reason shown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
