"""Run the compared pairs, check they agree, collect the figures; print the table, write the JSON and the chart."""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from ..integrations.seq2seq import check_seq2seq_transformers

from . import metrics
from .cases import Case, attention_case, compared_sides, gather_case, generate_case, mix_case, train_case
from .cases_dropout import dropout_cases
from .cases_hoisting import hoisting_cases
from .cases_seed import seed_cases
from .cases_seq2seq import seq2seq_cases  # encoder-decoder rows (T5 prefix tuning), own module
from .cases_vision import VISION_GROUP, vision_cases
from .chart import chart
from .oracle import verdict
from .report import (diff_text, fmt_bytes, fmt_ratio, fmt_time, format_table, format_targets, legend,
                     markdown_report, progress_label, short_params, summary_line)
from .models import ModelShape

__all__ = ["suite", "run_case", "run_suite", "format_table", "legend", "summary_line", "write_outputs",
           "compare_outputs", "machine_info", "REFERENCE_SHAPE", "FIGURES"]

REFERENCE_SHAPE = ModelShape(layers=8, hidden=512, heads=8, kv_heads=2, intermediate=1024, vocab=1024)
FIGURES = ("time_s", "new_bytes", "saved_bytes", "flops", "peak_bytes")


# ------------------------------------------------------------------------------------------------------------------
# which cases


def suite(mode: str = "default", device: str = "cpu") -> list[Case]:
    """mode: "smoke" (tests, seconds), "quick", "default" (under 3 minutes on a 2-core CPU), "full", "vision" (the
    vision continual-learning rows only: DualPrompt / CODA-Prompt on ViT-B/16, fastprompt.bench.cases_vision)."""
    gpu = torch.device(device).type == "cuda"
    cases: list[Case] = []
    if mode == "vision":
        return vision_cases(mode, gpu)
    if mode == "smoke":
        tiny = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=128)
        return [
            attention_case("fwd+bwd", 2, 32, 8, hq=4, hkv=2, dim=16, reps=2, tags=("sweep_seq",)),
            attention_case("fwd+bwd", 2, 64, 8, hq=4, hkv=2, dim=16, reps=2, tags=("sweep_seq",)),
            attention_case("fwd+bwd", 2, 32, 16, hq=4, hkv=2, dim=16, reps=2, tags=("sweep_prefix",)),
            attention_case("decode", 2, 32, 8, hq=4, hkv=2, dim=16, reps=2),
            gather_case(4, 6, 3, 16, reps=2),
            mix_case(4, 6, 3, 16, reps=2),
            train_case("prefix", tiny, 2, 16, 4, with_no_prefix=True, reps=1),
            train_case("prompt", tiny, 2, 16, 4, reps=1),
            train_case("pool", tiny, 2, 16, 4, reps=1),
            generate_case(tiny, 2, 8, 4, 3, reps=1),
            generate_case(tiny, 4, 8, 4, 3, tasks=2, reps=1),
        ] + seed_cases(mode) + _seq2seq_cases(mode, gpu) + dropout_cases(mode)

    seqs = (128, 512, 1024, 2048, 4096) if gpu else (64, 128, 256, 512)
    prefixes = (8, 32, 100, 200) if gpu else (8, 32, 128, 200)
    ref_seq = 1024 if gpu else 256
    small = ModelShape(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=512, vocab=512)
    medium = ModelShape(layers=4, hidden=512, heads=8, kv_heads=2, intermediate=1024, vocab=1024)
    op_reps = 5 if mode != "full" else 9

    # op level: the reference layer (B=8, 8q/2kv heads, D=64, S=256, P=32) and sweeps around it
    cases.append(attention_case("fwd+bwd", 8, 256, 32, reps=op_reps, tags=("reference",)))
    cases.append(attention_case("fwd", 8, 256, 32, reps=op_reps))
    cases.append(attention_case("decode", 8, 512, 32, reps=op_reps * 2))
    cases.append(gather_case(32, 16, 8, 512, reps=op_reps))
    cases.append(mix_case(32, 16, 8, 512, reps=op_reps))
    sweeps: list[Case] = []

    # end to end
    if mode == "quick":
        cases += [train_case("prefix", small, 4, 128, 16, with_no_prefix=True, reps=2),
                  train_case("prompt", small, 4, 128, 16, reps=2),
                  train_case("pool", small, 4, 128, 16, reps=2),
                  generate_case(small, 8, 32, 16, 4, reps=2),
                  generate_case(small, 8, 32, 16, 4, tasks=4, reps=2)]
    elif mode == "default":
        cases += [train_case("prefix", medium, 4, 256, 32, with_no_prefix=True, reps=2),
                  train_case("prompt", medium, 4, 256, 32, reps=2),
                  train_case("pool", medium, 4, 256, 32, reps=2),
                  generate_case(medium, 8, 64, 32, 8, reps=2),
                  generate_case(medium, 8, 64, 32, 8, tasks=4, reps=2)]
    else:  # full: the reference shape of the targets, and prefix-length / sequence sweeps of the training step
        ref = REFERENCE_SHAPE
        bsz = 8
        cases += [train_case("prefix", ref, bsz, ref_seq, 32, with_no_prefix=True, reps=5, tags=("reference",)),
                  train_case("prompt", ref, bsz, ref_seq, 32, reps=3),
                  train_case("pool", ref, bsz, ref_seq, 32, reps=3)]
        for p in (8, 128):
            cases.append(train_case("prefix", medium, 4, 256, p, with_no_prefix=True, reps=2,
                                    tags=("train_sweep_prefix",)))
        cases += [generate_case(ref, 8, 64, 32, 16, reps=3),
                  generate_case(ref, 8, 64, 32, 16, tasks=4, reps=3)]
    cases += hoisting_cases(mode)  # prompt hoisting vs PEFT (fastprompt.bench.cases_hoisting)
    sweep_seqs = seqs if mode != "quick" else seqs[:1] + seqs[-1:]
    sweep_prefixes = prefixes if mode != "quick" else prefixes[:1] + prefixes[-1:]
    for s in sweep_seqs:
        if s != 256:
            sweeps.append(attention_case("fwd+bwd", 8, s, 32, reps=op_reps, tags=("sweep_seq",)))
    for p in sweep_prefixes:
        if p != 32:
            sweeps.append(attention_case("fwd+bwd", 8, ref_seq, p, reps=op_reps, tags=("sweep_prefix",)))
    if mode == "full":
        for b in (1, 4, 16):
            sweeps.append(attention_case("fwd+bwd", b, ref_seq, 32, reps=op_reps, tags=("sweep_batch",)))
        for hkv in (8, 1):  # MHA and MQA around the 4:1 GQA reference
            sweeps.append(attention_case("fwd+bwd", 8, ref_seq, 32, hkv=hkv, reps=op_reps, tags=("sweep_gqa",)))
        sweeps.append(attention_case("fwd+bwd", 8, ref_seq, 32, hq=4, hkv=1, dim=128, reps=op_reps,
                                    tags=("sweep_dim",)))
        for s in (256, 1024):
            sweeps.append(attention_case("decode", 8, s, 32, reps=op_reps * 2))
    # vision rows: --full only (minutes on a CPU); sweeps last: under a time budget they are what gets skipped
    return (cases + seed_cases(mode) + _seq2seq_cases(mode, gpu) + dropout_cases(mode, gpu) + vision_cases(mode, gpu)
            + sweeps)


def _seq2seq_cases(mode, gpu):
    try:
        check_seq2seq_transformers()
    except ValueError:  # encoder-decoder prompt learning is refused on this transformers: no rows to compare
        return []

    return seq2seq_cases(mode, gpu)


# ------------------------------------------------------------------------------------------------------------------
# one case


def compare_outputs(a: dict, b: dict, tol: float) -> tuple[bool, float]:
    """(equal within tol, max relative difference). Relative to the largest magnitude of each tensor; integer
    tensors (generated tokens) must match exactly (the figure is the fraction of differing entries)."""
    worst = 0.0
    if set(a) != set(b):
        return False, math.inf
    for key in a:
        x, y = a[key], b[key]
        if x is None or y is None:
            if (x is None) != (y is None):
                return False, math.inf
            continue
        if x.shape != y.shape:
            return False, math.inf
        if not x.is_floating_point():
            diff = float((x != y).float().mean()) if x.numel() else 0.0
        else:
            x64, y64 = x.detach().double(), y.detach().double()
            scale = max(float(y64.abs().max()) if y64.numel() else 0.0, 1e-30)
            diff = float((x64 - y64).abs().max()) / scale if x64.numel() else 0.0
            if not math.isfinite(diff):
                return False, math.inf
        worst = max(worst, diff)
    return worst <= tol, worst


MIN_TIMED_S = 1.5  # short steps are repeated (more turns) until the turns took this long, up to MAX_TURNS
MAX_TURNS = 400


def _interleaved_times(sides: dict, device: str, reps: int, warmup: int = 1, min_seconds: float = 0.0) -> dict:
    """Time the sides turn about (A, B, B, A, A, B, ...: the order flips every turn, so neither side always runs
    right after the other) so load changes on a shared machine hit both alike. At least `reps` turns, more for
    steps too short for a few turns to give a stable median on a loaded machine (until `min_seconds`)."""
    for side in sides.values():
        for _ in range(warmup):
            side.step()
    metrics.synchronize(device)
    times = {name: [] for name in sides}
    names = list(sides)
    begin = time.perf_counter()
    turn = 0
    while turn < reps or (time.perf_counter() - begin < min_seconds and turn < MAX_TURNS):
        for name in (names if turn % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            sides[name].step()
            metrics.synchronize(device)
            times[name].append(time.perf_counter() - start)
        turn += 1
    return times


def _ratio(a, b) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    return a / b


def run_case(case: Case, device: str = "cpu", reps: Optional[int] = None, timing: bool = True) -> dict:
    record = {"group": case.group, "name": case.name, "params": case.params, "baseline": case.baseline,
              "tags": list(case.tags), "tol": case.tol}
    try:
        built = case.build(device)
        sides = compared_sides(built)
        outputs = {name: sides[name].check() for name in ("fastprompt", "baseline")}
        if case.same_method:
            ok, diff = compare_outputs(outputs["fastprompt"], outputs["baseline"], case.tol)
            record["equal"], record["max_rel_diff"] = ok, diff
            _judge(record, built.get("oracle"), outputs)
        else:  # the check still ran both sides (each must run); their outputs differ by design
            record["equal"], record["max_rel_diff"], record["verdict"] = None, None, "different method"
            record["reason"] = (f"different method: {case.name} vs the {case.baseline} (outputs differ by design, "
                                "not compared; the row compares their cost)")
        outputs = built = None
        short = case.group in ("attention", "prompts op") or "op_level" in case.tags  # steps of milliseconds
        min_seconds = MIN_TIMED_S if short and reps is None else 0.0
        times = (_interleaved_times(sides, device, reps or case.reps, min_seconds=min_seconds) if timing
                 else {n: [] for n in sides})
        figures = {}
        for name, side in sides.items():
            fig = metrics.StepFigures(times_s=times[name])
            if not timing:
                side.step()
            fig.new_bytes, fig.peak_bytes, fig.saved_bytes = _counts(side)
            fig.flops = metrics.flops(side.step)
            if torch.device(device).type == "cuda":
                fig.cuda_peak_bytes = _cuda_peak(side.step)
            figures[name] = fig.as_dict()
        record["figures"] = figures
        fp, base = figures["fastprompt"], figures["baseline"]
        record["ratios"] = {k: _ratio(fp[k], base[k]) for k in FIGURES + ("cuda_peak_bytes",)}
        # run-to-run spread of the time ratio: fastprompt / baseline of each turn-about pair of steps
        record["time_ratio_reps"] = [a / b for a, b in zip(times["fastprompt"], times["baseline"]) if b > 0]
        if "no_prefix" in figures:
            none = figures["no_prefix"]
            over_fp = fp["new_bytes"] - none["new_bytes"]
            over_base = base["new_bytes"] - none["new_bytes"]
            record["prefix_overhead"] = {"fastprompt_bytes": over_fp, "baseline_bytes": over_base,
                                         "ratio": _ratio(over_fp, over_base),
                                         "fastprompt_time_s": fp["time_s"] - none["time_s"] if timing else None,
                                         "baseline_time_s": base["time_s"] - none["time_s"] if timing else None}
    except Exception as exc:  # one broken case must not sink the whole run: report it
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["equal"] = False
        record["verdict"] = "error"
    finally:
        sides = None
        if case.group in ("train step", "generate", VISION_GROUP):
            gc.collect()  # free the models (module graphs hold reference cycles) before the next case
    return record


def _judge(record: dict, oracle, outputs: dict) -> None:
    """Check each side against the pair's oracle (fastprompt.bench.oracle) and record the verdict; a baseline
    that the oracle contradicts is named with the versions it ran on."""
    fp_ok = base_ok = None
    if oracle is not None:
        truth = oracle.truth()
        tol = oracle.tol
        fp_ok, fp_diff = compare_outputs(outputs["fastprompt"], truth, tol)
        base_ok, base_diff = compare_outputs(outputs["baseline"], truth, tol)
        record["oracle"] = {"what": oracle.what, "tol": tol, "fastprompt_diff": fp_diff, "baseline_diff": base_diff,
                            "fastprompt_ok": fp_ok, "baseline_ok": base_ok}
    record["verdict"] = verdict(record["equal"], fp_ok, base_ok)
    if record["verdict"] == "baseline wrong":
        v = versions()
        record["reason"] = (f"baseline wrong: {oracle.baseline} on transformers {v['transformers']}"
                            + (f", peft {v['peft']}" if "PEFT" in oracle.baseline else "")
                            + f" (differs from the oracle, {oracle.what}, {diff_text(truth, base_diff)}; "
                              f"fastprompt {diff_text(truth, fp_diff)})")
    elif record["verdict"] == "fastprompt wrong":
        record["reason"] = (f"fastprompt wrong: differs from the oracle ({oracle.what}) "
                            f"{diff_text(truth, fp_diff)} (tolerance {tol:g})")


def _counts(side) -> tuple[int, int, int]:
    """new bytes, peak live bytes and saved-for-backward bytes of one step (one run under both instruments)."""
    return metrics.count_step(side.step, side.exclude)


def _cuda_peak(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_suite(cases: Iterable[Case], device: str = "cpu", progress: bool = True,
              budget_s: Optional[float] = None) -> list[dict]:
    """Run every case. With `budget_s`, once the time spent passes the budget the remaining sweep cases (tags
    "sweep_*") are skipped and the others are timed with one repetition, so a loaded machine still finishes
    about on time; skipped cases are recorded as such."""
    cases = list(cases)
    results = []
    bar = None
    start = time.perf_counter()
    if progress:
        bar = tqdm(total=len(cases), desc="fastprompt bench", unit="case", file=sys.stderr, dynamic_ncols=True)
    for case in cases:
        if bar is not None:
            bar.set_postfix_str(progress_label(case.group, case.name, case.params))
        late = budget_s is not None and time.perf_counter() - start > budget_s
        if late and any(t.startswith("sweep") for t in case.tags):
            results.append({"group": case.group, "name": case.name, "params": case.params,
                            "baseline": case.baseline, "tags": list(case.tags), "skipped": "time budget"})
        else:
            results.append(run_case(case, device, reps=1 if late else None))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


# ------------------------------------------------------------------------------------------------------------------
# reporting


_fmt_ratio, _fmt_bytes, _fmt_time, _short_params = fmt_ratio, fmt_bytes, fmt_time, short_params


def targets(results: list[dict]) -> list[dict]:
    """The benchmark goals (RESULTS.md): prefix overhead of the reference training step <= 0.5x PEFT's, its step
    time <= 1.0x PEFT's, and the reference attention layer's (fwd+bwd) new bytes <= 0.5x the PEFT path's; the
    vision rows' (_vision_targets)."""
    out = []
    for r in results:
        if "error" in r or "skipped" in r:
            continue
        out += _vision_targets(r)
        if "reference" not in r.get("tags", ()):
            continue
        if r["group"] == "train step" and "prefix_overhead" in r:
            po = r["prefix_overhead"]
            out.append({"target": "prefix overhead (new bytes) <= 0.5x PEFT", "case": _short_params(r["params"]),
                        "value": po["ratio"], "limit": 0.5, "met": po["ratio"] is not None and po["ratio"] <= 0.5,
                        "detail": f"fastprompt {_fmt_bytes(po['fastprompt_bytes'])} vs PEFT "
                                  f"{_fmt_bytes(po['baseline_bytes'])}"})
            t = r["ratios"]["time_s"]
            out.append({"target": "step time <= 1.0x PEFT", "case": _short_params(r["params"]), "value": t,
                        "limit": 1.0, "met": t is not None and t <= 1.0,
                        "detail": f"{_fmt_time(r['figures']['fastprompt']['time_s'])} ms vs "
                                  f"{_fmt_time(r['figures']['baseline']['time_s'])} ms (medians)"})
        elif r["group"] == "attention":
            v = r["ratios"]["new_bytes"]
            out.append({"target": "attention layer fwd+bwd new bytes <= 0.5x PEFT path",
                        "case": _short_params(r["params"]), "value": v, "limit": 0.5,
                        "met": v is not None and v <= 0.5,
                        "detail": f"{_fmt_bytes(r['figures']['fastprompt']['new_bytes'])} vs "
                                  f"{_fmt_bytes(r['figures']['baseline']['new_bytes'])}"})
    return out


def _vision_targets(r: dict) -> list[dict]:
    """Issue 21's goals for the vision rows: a DualPrompt / CODA-Prompt step or inference batch allocates <= 0.5x
    the new bytes of the reference implementations' eager attention and is never slower; the one-stage query's
    step takes <= 0.65x the time of the two-pass step."""
    tags = r.get("tags", ())
    case = f"{r['name']}, {_short_params(r['params'])}"
    fp, base = r["figures"]["fastprompt"], r["figures"]["baseline"]
    if "vision_reference" in tags:
        v, t = r["ratios"]["new_bytes"], r["ratios"]["time_s"]
        return [{"target": "vision new bytes <= 0.5x eager reference", "case": case, "value": v, "limit": 0.5,
                 "met": v is not None and v <= 0.5,
                 "detail": f"{_fmt_bytes(fp['new_bytes'])} vs {_fmt_bytes(base['new_bytes'])}"},
                {"target": "vision time <= 1.0x eager reference", "case": case, "value": t, "limit": 1.0,
                 "met": t is not None and t <= 1.0,
                 "detail": f"{_fmt_time(fp['time_s'])} ms vs {_fmt_time(base['time_s'])} ms (medians)"}]
    if "vision_one_stage" in tags:
        t = r["ratios"]["time_s"]
        return [{"target": "one-stage query step time <= 0.65x two-pass step", "case": case, "value": t,
                 "limit": 0.65, "met": t is not None and t <= 0.65,
                 "detail": f"{_fmt_time(fp['time_s'])} ms vs {_fmt_time(base['time_s'])} ms (medians)"}]
    return []


def machine_info(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "device": device}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("triton", "transformers", "peft", "fastprompt"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:
            out[name] = None
    return out


def write_outputs(results: list[dict], out_dir: str, meta: dict) -> dict:
    """bench.json (every figure), bench.png (every pair's ratios, and the sequence / prefix sweeps), bench.md (the
    header, the full table, the legend). Returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "bench.json"), "png": os.path.join(out_dir, "bench.png"),
             "table": os.path.join(out_dir, "bench.md")}
    payload = {"meta": meta, "targets": targets(results), "results": results}
    with open(paths["json"], "w") as fh:
        json.dump(payload, fh, indent=1, default=str)
    rows = targets(results)
    with open(paths["table"], "w") as fh:
        fh.write(markdown_report(results, meta, format_targets(rows) if rows else ""))
    chart(results, paths["png"], meta)
    return paths


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def median(xs):
    return statistics.median(xs) if xs else float("nan")
