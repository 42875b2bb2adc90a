"""What `fastprompt bench` prints and writes: a console table that fits 120 columns with a legend for every column
and verdict, and bench.md with the machine / versions / threads / date header, the full table and the details."""
from __future__ import annotations

import math
import statistics
from typing import Optional

from .oracle import VERDICTS

__all__ = ["WIDTH", "format_table", "legend", "markdown_report", "short_case", "time_spread", "summary_line",
           "verdict_of", "fmt_ratio", "fmt_bytes", "fmt_time", "short_params", "progress_label", "diff_text",
           "format_targets"]

WIDTH = 120  # the console table and legend fit this many columns

_VERDICT_CELL = {"equal": "yes", "baseline wrong": "BASE WRONG", "fastprompt wrong": "FP WRONG", "unequal": "NO",
                 "error": "ERROR", "different method": "n/a method"}

# (header, what it means); the console table has these columns in this order
COLUMNS = (
    ("#", "row number (the same in bench.md and the chart)"),
    ("case", "the compared pair (bench.md has the full shape): attn = prefix attention op (q heads q, KV heads kv, "
             "head dim D), gather / mix = prompt-pool ops, train = one training step (forward + backward + AdamW), "
             "qpass = a prompt-pool step with its own query pass (full first pass, or the layers below k reused), "
             "hoisted = prompt tuning with the virtual tokens run once per step, "
             "generate = greedy batched generation (new = new tokens; tasks = a mixed-task batch); "
             "vit = continual learning on a Vision Transformer (DualPrompt / CODA-Prompt at their published "
             "settings; train step, inference batch, qpass = the frozen query forward alone, 1-stage = OS-Prompt's "
             "one-stage query); B batch, S sequence, P prefix length, L layers, h hidden size"),
    ("vs", "the baseline: peft = the PEFT + transformers path (real PEFT models end to end); torch = plain torch "
           "indexing / einsum; explicit = the same prompt pool run the PEFT way (per-row prefixes in a "
           "DynamicCache); peft/task = one PEFT generate per task adapter; query given = the same prompt-pool step "
           "with its query given (no query pass); PEFT semantics = PEFT's prompt tuning written out through the base "
           "model's generate (the hoisting cases; PEFT's own generate is wrong on transformers 5.24); eager concat = "
           "the reference implementations of L2P / DualPrompt / CODA-Prompt (prefix K/V concatenated, scores "
           "materialized, plain softmax; their second frozen forward for the query); SDPA concat = the same with "
           "PyTorch's fused attention; two-pass query = the same fastprompt step with the exact two-pass query"),
    ("fp ms", "fastprompt's median step time, milliseconds (sides timed turn about: A, B, A, B, ...)"),
    ("base ms", "the baseline's median step time, milliseconds"),
    ("time", "fp ms / base ms (below 1.00x: fastprompt faster)"),
    ("±", "run-to-run spread of the time ratio: half the interquartile range of the per-turn ratios (half the "
          "range below 4 turns); a time ratio within 1.00x ± this is a tie"),
    ("new", "bytes newly allocated during the step, fastprompt / baseline (below 1.00x: fastprompt allocates less)"),
    ("peak", "peak bytes alive at once during the step, fastprompt / baseline"),
    ("saved", "bytes saved for backward, fastprompt / baseline (- for steps without backward)"),
    ("FLOPs", "floating-point operations, fastprompt / baseline (1.00x: same work; - where not counted)"),
    ("equal", "the verdict on the outputs, with the max relative difference between the sides"),
)


def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_time(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    return f"{s * 1e3:.1f}" if s < 1 else f"{s * 1e3:.0f}"  # at most 5 characters below 100 s


def short_params(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k != "kind")


def _model(label: str) -> str:
    layers, hidden = label.split()[:2]  # "L4 h512 8q/2kv" -> "L4h512"
    return layers + hidden


def short_case(r: dict) -> str:
    """A compact label of the pair, e.g. "attn fwd+bwd B8 S256 P32 8q2kv D64", "train prefix L4h512 B4 S256 P32"."""
    p = r["params"]
    if r["group"] == "attention":
        return f"attn {p['kind']} B{p['B']} S{p['S']} P{p['P']} {p['Hq']}q{p['Hkv']}kv D{p['D']}"
    if r["group"] == "prompts op":
        return f"{r['name'].split('_')[0]} fwd+bwd B{p['B']} N{p['N']} L{p['L']} d{p['d']}"
    if r["group"] == "vision CL":  # fastprompt/bench/cases_vision.py
        name = r["name"]
        method = "" if name.startswith("query pass") else ("DualPrompt " if name.startswith("DualPrompt") else "CODA ")
        if name.startswith("attention layer"):
            return f"vit attn fwd+bwd E-layer {p['model'].replace('ViT-', '')} B{p['B']}"
        kind = ("qpass" if name.startswith("query pass") else "train 1-stage" if "one-stage" in name
                else "train" if "train" in name else "infer")
        return f"vit {kind} {method}{p['model'].replace('ViT-', '')} B{p['B']}"
    shape = f"{_model(p['model'])} B{p['B']} S{p['S']} P{p['P']}"
    if r["group"] == "train step":
        name = r["name"]
        if name.startswith("pool query pass"):  # fastprompt/bench/cases_seed.py
            layer = p.get("prompts", "").split()[-1].split("-")[0] if "query_layer" in name else ""
            method = f"qpass reuse<{layer}" if layer else "qpass full"
        else:
            method = {"prefix tuning": "prefix", "prompt tuning": "prompt", "prompt pool (prefix, top-4)": "pool top4",
                      "prompt tuning, hoisted": "prompt hoisted"}.get(name, name.split(" (")[0][:16])
        return f"train {method} {shape}"
    if "hoisted" in r["name"]:
        return f"generate hoisted {shape} new{p['new']}"
    if "tasks" in p:
        return f"generate {p['tasks']} tasks {shape} new{p['new']}"
    return f"generate {shape} new{p['new']}"


def progress_label(group: str, name: str, params: dict, limit: int = 48) -> str:
    """The progress bar's name of the case being run: the table's label, cut only between words."""
    try:
        text = short_case({"group": group, "name": name, "params": params})
    except (KeyError, ValueError, IndexError):  # a case whose params the table's labels do not know
        text = f"{name} {short_params(params)}"
    if len(text) <= limit:
        return text
    words, kept = text.split(), ""
    for word in words:
        if len(kept) + len(word) + (1 if kept else 0) > limit - 2:
            break
        kept += (" " if kept else "") + word
    return (kept or words[0]) + " …"


def diff_text(outputs: dict, diff: float) -> str:
    """A difference from compare_outputs with its unit: for token ids the fraction of entries that differ, for
    floating-point outputs the max relative difference (max |a - b| / max |b|, per tensor)."""
    kinds = {t.is_floating_point() for t in outputs.values() if t is not None}
    if kinds == {False}:
        return f"in {diff:.0%} of the output token ids"
    if kinds == {True}:
        return f"by a max relative difference of {diff:.2g}"
    return f"by {diff:.2g} (token ids: the fraction that differ; floats: the max relative difference)"


def format_targets(rows: list[dict]) -> str:
    """One line per benchmark goal (met / MISSED, the ratio, the absolute figures, the shape), wrapped to WIDTH."""
    lines = []
    for t in rows:
        state = "met" if t["met"] else "MISSED"
        value = "-" if t["value"] is None else f"{t['value']:.2f}x"
        lines += _wrap(f"{t['target']}: {value} ({t['detail']}; {t['case']})", f"{state:6}  ")
    return "\n".join(lines)


def _short_baseline(name: str) -> str:
    """At most 14 characters (bench.md and the legend have the full name)."""
    if name.startswith("peft, 1 batch"):
        return "peft/task"
    return name.split(" (")[0].split(" via ")[0][:14]


def verdict_of(r: dict) -> str:
    if "error" in r:
        return "error"
    return r.get("verdict") or ("equal" if r.get("equal") else "unequal")


def time_spread(r: dict) -> Optional[float]:
    """Half the interquartile range of the per-turn time ratios (robust to the few turns a loaded machine
    preempts); half the range when there are fewer than 4 turns."""
    reps = sorted(r.get("time_ratio_reps") or [])
    if len(reps) < 2:
        return None
    if len(reps) < 4:
        return (reps[-1] - reps[0]) / 2
    q1, _, q3 = statistics.quantiles(reps, n=4)
    return (q3 - q1) / 2


def _equal_cell(r: dict) -> str:
    v = verdict_of(r)
    cell = _VERDICT_CELL[v]
    if v in ("equal", "unequal") and r.get("max_rel_diff") is not None and math.isfinite(r["max_rel_diff"]):
        cell += f" {r['max_rel_diff']:.0e}"
    return cell


def _rows(results: list[dict]):
    for n, r in enumerate((r for r in results if "skipped" not in r), 1):
        if "error" in r:
            yield n, r, [str(n), short_case(r), _short_baseline(r["baseline"])] + ["-"] * 8 + ["ERROR"]
            continue
        ratios, figs = r["ratios"], r["figures"]
        peak = ratios.get("cuda_peak_bytes") or ratios["peak_bytes"]
        spread = time_spread(r)
        yield n, r, [str(n), short_case(r), _short_baseline(r["baseline"]), fmt_time(figs["fastprompt"]["time_s"]),
                     fmt_time(figs["baseline"]["time_s"]), fmt_ratio(ratios["time_s"]),
                     _fmt_spread(spread), fmt_ratio(ratios["new_bytes"]), fmt_ratio(peak),
                     fmt_ratio(ratios["saved_bytes"]), fmt_ratio(ratios["flops"]), _equal_cell(r)]


def _fmt_spread(spread) -> str:
    return "-" if spread is None else f"{spread:.2f}" if spread < 10 else f"{spread:.0f}"


def _cut(text: str, width: int) -> str:
    """text within `width` characters, cut between words (marked with …)."""
    if len(text) <= width:
        return text
    kept = ""
    for word in text.split():
        if len(kept) + len(word) + (1 if kept else 0) > width - 2:
            break
        kept += (" " if kept else "") + word
    return (kept + " …") if kept else text[:width - 1] + "…"


def format_table(results: list[dict], markdown: bool = False) -> str:
    """One row per compared pair (fastprompt / baseline for each figure; below 1 = fastprompt better), at most
    WIDTH columns wide. markdown=True gives bench.md's table (full shapes, absolute figures, oracle)."""
    if markdown:
        return _markdown_table(results)
    head = [c for c, _ in COLUMNS]
    rows = [row for _, _, row in _rows(results)]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    over = sum(widths) + len(widths) - 1 - WIDTH
    if over > 0:  # figures wider than usual (a loaded machine's spreads, 100 s steps): the case labels give way
        widths[1] -= over
        rows = [row[:1] + [_cut(row[1], widths[1])] + row[2:] for row in rows]
    right = {0, 3, 4, 5, 6, 7, 8, 9, 10}
    gap = "  " if sum(widths) + 2 * (len(widths) - 1) <= WIDTH else " "

    def line(cells):
        return gap.join(f"{c:>{w}}" if i in right else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head).rstrip(), gap.join("-" * w for w in widths)] + [line(r).rstrip() for r in rows])


def _wrap(text: str, indent: str, width: int = WIDTH) -> list[str]:
    words, lines, current = text.split(), [], indent
    for word in words:
        if len(current) + len(word) + 1 > width and current.strip():
            lines.append(current.rstrip())
            current = " " * len(indent)
        current += word + " "
    lines.append(current.rstrip())
    return lines


def legend(results: Optional[list[dict]] = None) -> str:
    """What every column and every verdict in the equal column means (wrapped to WIDTH), then the reason of each
    pair that is not plainly equal."""
    name_width = max(len(c) for c, _ in COLUMNS)
    lines = ["columns:"]
    for name, text in COLUMNS:
        lines += _wrap(text, f"  {name:<{name_width}}  ")
    lines.append("equal column:")
    width = max(len(v) for v in _VERDICT_CELL.values())
    for v, cell in _VERDICT_CELL.items():
        lines += _wrap(VERDICTS[v], f"  {cell:<{width}}  ")
    lines += _wrap("oracles: generation = greedy argmax over the unpatched model's full forward, no cache; attention"
                   " and prompt ops = fastprompt.reference in float64; training steps: the two sides are compared "
                   "with each other (tolerance 2e-3; ops 1e-4, prompt ops 1e-5, tokens exact)", "")
    for n, r, _ in _rows(results or []):
        if verdict_of(r) != "equal":
            lines += _wrap(r.get("reason") or r.get("error") or verdict_of(r), f"  #{n}: ")
    return "\n".join(lines)


def summary_line(results: list[dict]) -> str:
    run = [r for r in results if "skipped" not in r]
    counts = {}
    for r in run:
        counts[verdict_of(r)] = counts.get(verdict_of(r), 0) + 1
    line = f"{counts.get('equal', 0)}/{len(run)} compared pairs gave equal outputs"
    extra = []
    if counts.get("baseline wrong"):
        whys = sorted({r["reason"].split(" (")[0].replace("baseline wrong: ", "") for r in run
                       if verdict_of(r) == "baseline wrong"})
        extra.append(f"{counts['baseline wrong']} baseline wrong ({'; '.join(whys)}): fastprompt matches the oracle")
    for v in ("fastprompt wrong", "unequal", "error"):
        if counts.get(v):
            extra.append(f"{counts[v]} {v}")
    if counts.get("different method"):
        extra.append(f"{counts['different method']} comparing two methods (outputs not compared)")
    skipped = len(results) - len(run)
    if skipped:
        extra.append(f"{skipped} sweep cases skipped (time budget)")
    return line + ("; " + "; ".join(extra) if extra else "")


def _markdown_table(results: list[dict]) -> str:
    head = ["#", "group", "case", "shape", "vs", "ms fp", "ms base", "time", "time per turn", "new bytes",
            "new bytes fp", "peak", "saved", "FLOPs", "equal", "max rel diff", "vs oracle: fp / base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r, row in _rows(results):
        if "error" in r:
            cells = [str(n), r["group"], r["name"], short_params(r["params"]), r["baseline"]] + ["-"] * 9 + [
                "ERROR", "-", r["error"][:200].replace("|", "/")]
        else:
            reps = r.get("time_ratio_reps") or []
            quart = statistics.quantiles(reps, n=4) if len(reps) >= 4 else None
            spread = (f"{quart[0]:.2f}-{quart[2]:.2f}x (IQR, {len(reps)} turns)" if quart else
                      f"{min(reps):.2f}-{max(reps):.2f}x ({len(reps)} turns)" if reps else "-")
            oracle = r.get("oracle")
            odiff = f"{oracle['fastprompt_diff']:.1e} / {oracle['baseline_diff']:.1e}" if oracle else "no oracle"
            cells = [str(n), r["group"], r["name"], short_params(r["params"]), r["baseline"], row[3], row[4], row[5],
                     spread, row[7], fmt_bytes(r["figures"]["fastprompt"]["new_bytes"]), row[8], row[9], row[10],
                     _VERDICT_CELL[verdict_of(r)],
                     "-" if r.get("max_rel_diff") is None else f"{r['max_rel_diff']:.1e}", odiff]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _header(meta: dict) -> str:
    m, v = meta.get("machine", {}), meta.get("versions", {})
    load = m.get("loadavg")
    load_text = f"load average {load[0]:.1f} at the start" if load else ""
    end = meta.get("loadavg_end")
    if end:
        load_text += f", {end[0]:.1f} at the end"
    rows = [
        ("date", meta.get("date", "?")),
        ("machine", f"{m.get('gpu') or m.get('cpu', '?')}; {m.get('cpu_count', '?')} CPU cores"
                    + (f"; {load_text}" if load_text else "") + f"; {m.get('platform', '')}"),
        ("device", m.get("device", "cpu")),
        ("threads", f"torch {m.get('torch_threads', '?')} thread(s)" + (
            " (the CPU default: OpenMP teams spin-wait on a shared machine)" if meta.get("threads") == 1 else "")),
        ("versions", ", ".join(f"{k} {v.get(k) or 'not installed'}" for k in
                               ("fastprompt", "torch", "triton", "transformers", "peft"))
                     + f", Python {m.get('python', '?')}"),
        ("command", f"`{meta.get('command', 'fastprompt bench')}` (mode {meta.get('mode', '?')})"),
        ("runtime", f"{meta['runtime_s']:.0f} s" if "runtime_s" in meta else "?"),
    ]
    return "\n".join([f"# fastprompt bench ({meta.get('mode', '')})", "", "| | |", "|---|---|"]
                     + [f"| {k} | {val} |" for k, val in rows])


def markdown_report(results: list[dict], meta: dict, targets_text: str = "") -> str:
    """bench.md: header (machine, versions, threads, date), the full table, the legend, disagreements, targets."""
    parts = [_header(meta), "", "Ratios are fastprompt / baseline (below 1.00x: fastprompt better); times are "
             "medians of turn-about runs.", "", _markdown_table(results), "", "```", legend(results), "```"]
    skipped = [r for r in results if "skipped" in r]
    if skipped:
        parts += ["", "Skipped (" + skipped[0]["skipped"] + "): "
                  + "; ".join(f"{r['name']} {short_params(r['params'])}" for r in skipped)]
    if targets_text:
        parts += ["", "Targets (benchmark goals):", "", "```", targets_text, "```"]
    parts += ["", summary_line(results)]
    return "\n".join(parts) + "\n"
