"""Write the README's and RESULTS.md's figures from the checked-in results, so no figure can go stale by hand.

Each figure lives in a marked region of README.md or benchmarks/RESULTS.md:

    <!-- figures:NAME -->
    ...text this script writes...
    <!-- /figures -->

and every region is rendered here from the JSON files in benchmarks/results/ (`fastprompt bench` runs and the
examples' --json output), with the command, date, machine, load and versions each figure came from taken from the
files' metadata. tests/test_readme_figures.py fails when the text in a region and what this script renders from
the checked-in files disagree.

    python benchmarks/render_figures.py            # rewrite the regions
    python benchmarks/render_figures.py --check    # exit 1 and name the stale regions

To refresh the figures: re-run the bench (`fastprompt bench --budget 0 --out /tmp/b`, and `--quick`) and the
examples with `--json`, copy the outputs over benchmarks/results/ (see RESULTS.md), then run this script.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
DOCUMENTS = ("README.md", os.path.join("benchmarks", "RESULTS.md"))
# a region's text takes the indentation of its markers (a region inside a list item is indented with it)
REGION = re.compile(r"^(?P<indent>[ ]*)(?P<open><!-- figures:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)"
                    r"^(?P=indent)(?P<close><!-- /figures -->)", re.S | re.M)

# the checked-in runs the regions are rendered from
SOURCES = {"default": "cpu_default.json", "quick": "cpu_quick.json", "vision": "cpu_vision.json", "pool example": "example_prompt_pool.json",
           "multitask example": "example_multitask.json", "continual example": "example_continual_digits.json",
           "issue 20 before/after": "before_after_issue20.json",
           "issue 20 before/after, attention": "before_after_issue20_attention.json",
           "h100 quick": "h100_quick.json", "h100 vision": "h100_vision.json",
           "prompt-free sdpa before/after": "before_after_prompt_free_sdpa.json"}


def load_sources(results_dir: str = RESULTS_DIR) -> dict:
    out = {}
    for key, name in SOURCES.items():
        with open(os.path.join(results_dir, name)) as fh:
            out[key] = json.load(fh)
            out[key]["file"] = f"benchmarks/results/{name}"
    return out


# ---- reading one run --------------------------------------------------------------------------------------------


def find(run: dict, group: str, name: str, **params) -> dict:
    """The one record of `run` with this group, name and (a subset of) params; an error names what is missing, so
    a renamed bench case cannot silently drop a figure."""
    hits = [r for r in run["results"] if r["group"] == group and r["name"] == name and "skipped" not in r
            and all(r["params"].get(k) == v for k, v in params.items())]
    if len(hits) != 1:
        raise LookupError(f"{len(hits)} records of {group!r} {name!r} {params} in the run of {run['meta']['date']}")
    if "error" in hits[0]:
        raise LookupError(f"{group!r} {name!r} {params} raised in that run: {hits[0]['error']}")
    return hits[0]


def x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratio(r: dict, figure: str) -> str:
    return x(r["ratios"][figure])


def iqr(r: dict) -> str:
    """The interquartile range of the per-turn time ratios (the spread a reader compares 1.00x with)."""
    reps = r.get("time_ratio_reps") or []
    if len(reps) < 4:
        return "per turn " + ", ".join(f"{r:.2f}x" for r in reps) if reps else "not timed"
    q1, _, q3 = statistics.quantiles(reps, n=4)
    return f"IQR {q1:.2f}-{q3:.2f}x"


def _and(names: list) -> str:
    return "no task" if not names else names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def model_label(params: dict) -> str:
    return params["model"]


def provenance(run: dict) -> str:
    """`command`, date, machine, threads, load, versions: where a run's figures come from."""
    m, v = run["meta"]["machine"], run["meta"]["versions"]
    load, end = m.get("loadavg"), run["meta"].get("loadavg_end")
    load_text = f", load average {load[0]:.1f}" if load else ""
    if load and end:
        load_text += f" at the start, {end[0]:.1f} at the end"
    # the command that made the run is in RESULTS.md's run table, not here: every command the README gives is run
    # in CI (.ci/readme_commands.py), and the README cites the checked-in result instead of re-running it
    return (f"{run['meta']['date']}, {m['cpu']} {m['cpu_count']} cores, "
            f"{m['torch_threads']} torch thread{_s(m['torch_threads'])}{load_text}; torch "
            f"{v['torch']}, transformers {v['transformers']}, peft {v['peft']}; `{run['file']}`")


def wrap(text: str, width: int = 118) -> str:
    """Markdown prose wrapped like the rest of the documents (a line is never split inside a `code` span)."""
    words, lines, line = re.findall(r"`[^`]*`\S*|\S+", text), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)


# ---- the regions --------------------------------------------------------------------------------------------------


def attention_reference(run: dict) -> dict:
    return next(r for r in run["results"] if r["group"] == "attention" and "reference" in r.get("tags", ())
                and "skipped" not in r)


def bench_summary(src: dict) -> str:
    run = src["default"]
    att = attention_reference(run)
    p = att["params"]
    fig = att["figures"]
    decode = find(run, "attention", "prefix attention decode")
    prefix = find(run, "train step", "prefix tuning")
    hoisted = find(run, "train step", "prompt tuning, hoisted")
    mixed = find(run, "generate", "generate, mixed-task batch")
    t5_train = find(run, "train step", "T5 prefix tuning (seq2seq)")
    t5_gen = find(run, "generate", "T5 prefix tuning, summarization (seq2seq)")
    bert = find(run, "train step", "P-tuning v2 (BERT, train mode, attention dropout)")
    gather = find(run, "prompts op", "gather_prompts fwd+bwd")
    mix = find(run, "prompts op", "mix_prompts fwd+bwd")
    target = next(t for t in run["targets"] if t["target"].startswith("attention layer"))
    text = (f"On the CPU ({provenance(run)}): per attention layer (GQA, {p['Hq']} query / {p['Hkv']} KV heads, "
            f"B={p['B']}, S={p['S']}, P={p['P']}, D={p['D']}) fastprompt allocates {ratio(att, 'new_bytes')} the bytes "
            f"of the PEFT path "
            f"({mib(fig['fastprompt']['new_bytes'])} vs {mib(fig['baseline']['new_bytes'])}; the target, <= "
            f"{target['limit']}x, is {'met' if target['met'] else 'MISSED'}) and peaks at {ratio(att, 'peak_bytes')}, "
            f"at {ratio(att, 'time_s')} its time ({iqr(att)}); decode {ratio(decode, 'time_s')}; a prefix-tuning "
            f"training step ({model_label(prefix['params'])}) {ratio(prefix, 'time_s')} the time ({iqr(prefix)}) "
            f"with {ratio(prefix, 'peak_bytes')} the peak; prompt tuning with hoisting {ratio(hoisted, 'time_s')} "
            f"the time and {ratio(hoisted, 'new_bytes')} the bytes; a mixed-task batch generates in "
            f"{ratio(mixed, 'time_s')} the time of one PEFT batch per task; T5 prefix tuning "
            f"{ratio(t5_train, 'time_s')} (train) / {ratio(t5_gen, 'time_s')} (generate); BERT P-tuning v2 with "
            f"fused attention dropout {ratio(bert, 'time_s')} ({iqr(bert)}) at {ratio(bert, 'new_bytes')} the new "
            f"bytes and {ratio(bert, 'peak_bytes')} the peak; gather / mix {ratio(gather, 'time_s')} / "
            f"{ratio(mix, 'time_s')} plain torch.")
    return wrap(text)


def main_job_runtime(src: dict) -> str:
    run = src["default"]
    meta = run["meta"]
    return wrap(f"The checked-in default run (`{run['file']}`, {meta['date']}; its command in RESULTS.md) took {meta['runtime_s'] / 60:.1f} "
                f"minutes on {meta['machine']['cpu_count']} CPU cores at load average "
                f"{meta['machine']['loadavg'][0]:.1f}; the plain command stops timing the sweep cases after 140 s "
                f"(`--budget`), so on a loaded machine it ends sooner with fewer rows.")


def hoisting(src: dict) -> str:
    run = src["default"]
    train = find(run, "train step", "prompt tuning, hoisted")
    gen = find(run, "generate", "prompt tuning, hoisted")
    t, g = train["params"], gen["params"]
    b, s, p = t["B"], t["S"], t["P"]
    train_pred = (b * s + p) / (b * (p + s))
    gb, gs, gp, new = g["B"], g["S"], g["P"], g["new"]
    steps = new - 1
    gen_pred = (gp + gb * gs + gb * steps) / (gb * (gp + gs) + gb * steps)
    cache_pred = (gs + steps) / (gp + gs + steps)
    text = (f"Measured on the CPU (Llama-like {model_label(t)}, B={b}, S={s}, P={p}; {provenance(run)}): training "
            f"step {ratio(train, 'flops')} the FLOPs (predicted (B·S+P)/(B·(P+S)) = {train_pred:.3f}) and "
            f"{ratio(train, 'time_s')} the time of PEFT ({iqr(train)}); generation ({gs}-token prompts, {new} new "
            f"tokens, B={gb}, P={gp}) {ratio(gen, 'flops')} the FLOPs (predicted "
            f"(P+B·S+B·{steps})/(B·(P+S)+B·{steps}) = {gen_pred:.3f}), {ratio(gen, 'new_bytes')} the new bytes "
            f"(the generation cache alone: predicted (S+new−1)/(P+S+new−1) = {cache_pred:.3f}) and "
            f"{ratio(gen, 'time_s')} the time ({iqr(gen)}) against {gen['baseline']}. Each decode step reads the "
            f"prompt K/V through a lean CPU decode path (`ops/prefix_attention_torch/decode.py`) and costs what PEFT's "
            f"costs; the {steps} steps are transformers' own per-step work on both sides, so time ≈ (prompt pass + "
            f"prefill(B·S) + {steps}·step) / (prefill(B·(P+S)) + {steps}·step).")
    return wrap(text)


def t5(src: dict) -> str:
    run = src["default"]
    train = find(run, "train step", "T5 prefix tuning (seq2seq)")
    gen = find(run, "generate", "T5 prefix tuning, summarization (seq2seq)")
    p = train["params"]
    return wrap(f"On the CPU T5 prefix tuning ({p['model']}, B={p['B']}, source {p['S']}, target {p['T']}, P={p['P']}) "
                f"trains at {ratio(train, 'time_s')} ({iqr(train)}) and generates at {ratio(gen, 'time_s')} "
                f"({iqr(gen)}) PEFT's time ({provenance(run)}).")


def query_pass(src: dict) -> str:
    run = src["default"]
    full = find(run, "train step", "pool query pass (full first pass)")
    f, base = full["figures"]["fastprompt"]["flops"], full["figures"]["baseline"]["flops"]
    p = full["params"]
    return wrap(f"A full first pass instead costs {100 * (f / base - 1):+.0f}% FLOPs over the query-given step "
                f"({f / 1e9:.2f} G vs {base / 1e9:.2f} G, Llama {model_label(p)}, B={p['B']}, S={p['S']}; "
                f"`{run['file']}`).", width=116)


def pool_example(src: dict) -> str:
    ex = src["pool example"]
    res, settings = ex["results"], ex["meta"]["settings"]
    prompts = [v["after"] for k, v in res.items() if k != "head only"]
    return wrap(f"Example: `python examples/train_prompt_pool_minilm.py` trains a PromptPool and a PTuningV2 prompt "
                f"on the real all-MiniLM-L6-v2 on the CPU; on its generated 4-topic task ({settings['steps']} steps "
                f"of {settings['batch_size']} rows, {settings['threads']} thread{_s(settings['threads'])}, "
                f"{ex['meta']['date']}, `{ex['file']}`) a linear head alone reaches {res['head only']['after']:.2f}, "
                f"with the prompts {min(prompts):.2f}–{max(prompts):.2f}.")


def multitask_example(src: dict) -> str:
    ex = src["multitask example"]
    res, settings, metrics = ex["results"], ex["meta"]["settings"], ex["metrics"]
    tasks = list(metrics)
    head = {"sentiment": "sentiment", "ner": "NER", "qa": "QA"}
    lines = [wrap(f"`python examples/train_multitask_minilm.py` trains the seed documents' three tasks (sentiment, "
                  f"NER, extractive QA, generated data) together in mixed batches on the real all-MiniLM-L6-v2, on the "
                  f"CPU ({ex['total_s'] / 60:.0f} minutes on {settings['threads']} thread{_s(settings['threads'])} "
                  f"at load average {ex['meta']['machine']['loadavg'][0]:.1f} at the end; the times below are of that "
                  f"machine; {settings['steps']} steps × {settings['per_task']} "
                  f"rows "
                  f"per task). Its output ({ex['meta']['date']}, `{ex['file']}`):"), "",
             "| setup | " + " | ".join(f"{head.get(t, t)} {metrics[t]}" for t in tasks) + " | train s |",
             "|---|" + "---|" * (len(tasks) + 1)]
    names = {"multi-task prompt": "multi-task prompt (one pool, task heads, mixed batches)",
             "one prompt per task": "one prompt per task, trained alone"}
    for name, r in res.items():
        lines.append(f"| {names.get(name, name)} | "
                     + " | ".join(f"{r['before'][t]:.3f} → {r['after'][t]:.3f}" for t in tasks)
                     + f" | {r['train_s']:.0f} |")
    shared, alone = res["multi-task prompt"]["after"], res["one prompt per task"]["after"]
    heads = res["head only"]["after"]
    better = [head.get(t, t) for t in tasks if shared[t] > heads[t]]
    behind = [head.get(t, t) for t in tasks if shared[t] < alone[t]]
    lines += ["", wrap(f"In this run the shared prompt beats the heads alone on {_and(better)} and trails one prompt "
                       f"per task on {_and(behind)}.")]
    return "\n".join(lines)


def continual_example(src: dict) -> str:
    ex = src["continual example"]
    res, settings, pre = ex["results"], ex["meta"]["settings"], ex["pretrain"]
    m = ex["meta"]["machine"]
    lines = [wrap(f"`python examples/train_continual_digits.py` runs class-incremental learning on scikit-learn's "
                  f"digits (8x8 images, 5 tasks of 2 classes, logits outside the current task masked in training) "
                  f"with a 6-layer ViT (2x2 patches, hidden 64) pretrained inside the example ({pre['objective']}, "
                  f"{pre['epochs']} epochs, on {pre['images']} held-out images, {100 * pre['share']:.0f}% of each "
                  f"class, never seen again) and frozen; each method trains its prompt and the classifier "
                  f"({settings['epochs']} epochs per task, Adam lr {settings['lr']:g}). Its output, the mean of "
                  f"{settings['seeds']} seeds (each its own data split, backbone and heads; "
                  f"{ex['meta']['date']}, {settings['threads']} thread{_s(settings['threads'])}, "
                  f"{ex['total_s'] / 60:.1f} minutes in all at load average {m['loadavg'][0]:.1f}, "
                  f"`{ex['file']}`):"), "",
             "| method | average accuracy | forgetting | per seed (average accuracy) | train s |",
             "|---|---|---|---|---|"]
    for name, r in res.items():
        per_seed = ", ".join(f"{s['average_accuracy']:.2f}" for s in r["seeds"])
        lines.append(f"| {name} | {r['average_accuracy']:.3f} | {r['forgetting']:.3f} | {per_seed} | "
                     f"{r['train_s']:.0f} |")
    lines += ["", wrap("Average accuracy: after the last task, the mean over tasks of the accuracy on each (over the "
                       "classes seen); forgetting: the mean over the earlier tasks of the drop from their best "
                       "accuracy to their final one. \"one-stage\" is OS-Prompt's query (`query_pass=\"one_stage\"`), "
                       "one forward instead of two: a different method, not the two-pass one made faster.")]
    return "\n".join(lines)


def _header_table(run: dict) -> list[str]:
    m, v, meta = run["meta"]["machine"], run["meta"]["versions"], run["meta"]
    end = meta.get("loadavg_end")
    return ["| | |", "|---|---|",
            f"| command | `{meta['command']}` (mode {meta['mode']}), `{run['file']}` |",
            f"| date | {meta['date']}, {meta['runtime_s']:.0f} s |",
            f"| machine | {m['gpu'] + ' (device cuda), host ' if m.get('gpu') else ''}"
            f"{m['cpu']}, {m['cpu_count']} cores, load average {m['loadavg'][0]:.1f} at the start"
            + (f", {end[0]:.1f} at the end" if end else "") + " |",
            f"| threads | torch {m['torch_threads']} |",
            "| versions | " + ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers", "peft",
                                                                 "fastprompt"))
            + f", Python {m['python']} |"]


def _run_section(run: dict) -> list[str]:
    from fastprompt.bench.report import format_table, summary_line
    from fastprompt.bench.runner import format_targets

    done = [r for r in run["results"] if "skipped" not in r]
    lines = _header_table(run) + ["", "```", format_table(run["results"]), "```", "",
                                  wrap(summary_line(run["results"]) + ".")]
    if run["targets"]:
        lines += ["", "Targets:", "", "```", format_targets(run["targets"]), "```"]
    pairs = [r for r in done if "error" not in r and r["baseline"] != "query given"]
    slower = [r for r in pairs if round(r["ratios"]["time_s"], 2) > 1.0]  # as printed: 1.004x is a 1.00x tie
    more = [r for r in pairs if round(r["ratios"]["new_bytes"], 2) > 1.0]
    from fastprompt.bench.report import short_case

    lines.append("")
    lines.append(wrap("Above 1.00x time: " + ("; ".join(f"{short_case(r)} {ratio(r, 'time_s')} ({iqr(r)})"
                                                          for r in slower) or "none") + "."))
    lines.append(wrap("More new bytes than the baseline: " + ("; ".join(f"{short_case(r)} {ratio(r, 'new_bytes')}"
                                                                         for r in more) or "none") + "."))
    sweep = [r for r in done if r["group"] == "attention" and r["params"]["kind"] == "fwd+bwd"]
    if sweep:
        news = [r["ratios"]["new_bytes"] for r in sweep]
        peaks = [r["ratios"]["peak_bytes"] for r in sweep]
        saved = [r["ratios"]["saved_bytes"] for r in sweep]
        lines.append(wrap(f"Attention layer fwd+bwd over the {len(sweep)} shapes of this run: new bytes "
                          f"{min(news):.2f}-{max(news):.2f}x, peak {min(peaks):.2f}-{max(peaks):.2f}x, saved for "
                          f"backward {min(saved):.2f}-{max(saved):.2f}x of the PEFT path."))
    return lines


def _before_after_module():
    """benchmarks/before_after.py, whose table and slowdown test the region reuses (one format, one verdict)."""
    spec = importlib.util.spec_from_file_location("before_after", os.path.join(ROOT, "benchmarks",
                                                                               "before_after.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def before_after_region(key: str) -> Callable[[dict], str]:
    return lambda src: before_after(src[key])


def before_after(run: dict) -> str:
    """A `before_after.py --json` run: where it ran, the table, the rows slower beyond the spread."""
    ba = _before_after_module()
    meta, rows = run["meta"], run["rows"]
    m, v = meta["machine"], meta["versions"]
    loads = [r["loadavg"][0] for r in meta["runs"]] + [r["loadavg_end"][0] for r in meta["runs"]]
    turns = ", ".join(f"{r['checkout']} {r['runtime_s']:.0f} s" for r in meta["runs"])

    def tree(side: dict) -> str:
        return (f"`{side['commit'][:7]}` (fastprompt/ tree `{side['fastprompt_tree'][:7]}`"
                + (", with uncommitted changes" if side["fastprompt_uncommitted"] else "") + ")")

    lines = ["| | |", "|---|---|",
             f"| command | `{meta['command']}`, `{run['file']}` |",
             f"| bench runs | `{meta['runs'][0]['command']}` and the same for each run, in this order: {turns} |",
             f"| trees | before {tree(meta['before'])}, after {tree(meta['after'])} |",
             f"| date | {meta['runs'][0]['date']} to {meta['runs'][-1]['date']} (start of the last run) |",
             f"| machine | {m['cpu']}, {m['cpu_count']} cores shared with other sessions, load average "
             f"{min(loads):.1f}-{max(loads):.1f} over the runs |",
             f"| threads | torch {m['torch_threads']} |",
             "| versions | " + ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers", "peft"))
             + f", Python {m['python']} |", ""]
    lines += ba.table(rows)
    slow = [(r, ba.slower(r)) for r in rows if ba.slower(r) is not None]
    one_side = [r for r in rows if not r["before"] or not r["after"]]
    lines += ["", wrap(f"{meta['runs_per_checkout']} runs per checkout, taken turn about; each cell is the median "
                       "of the runs' fastprompt / baseline ratios (each run's ratio is itself a ratio of medians over "
                       "interleaved turns in one process) with the runs' min-max in brackets. Slower after than "
                       "before by more than the larger of the two checkouts' run-to-run spreads: "
                       + ("; ".join(f"{r['name']} ({' '.join(f'{k}={x}' for k, x in r['params'].items())}) "
                                    f"+{gap:.2f}" for r, gap in slow) or "none") + ". Pairs only one checkout "
                       "ran: " + ("; ".join(f"{r['name']} ({'after' if r['after'] else 'before'})"
                                            for r in one_side) or "none") + ".")]
    return "\n".join(lines)


def results_default(src: dict) -> str:
    return "\n".join(_run_section(src["default"]))


def results_quick(src: dict) -> str:
    return "\n".join(_run_section(src["quick"]))


def results_vision(src: dict) -> str:
    return "\n".join(_run_section(src["vision"]))


def _span(values: list) -> str:
    lo, hi = min(values), max(values)
    return x(lo) if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"


def eager_rows(run: dict) -> list:
    """The vision rows of `run` against the reference implementations' eager attention."""
    return [r for r in run["results"] if r["group"] == "vision CL" and r["baseline"] == "eager concat"
            and "skipped" not in r and "error" not in r]


def h100_findings(src: dict) -> str:
    """The H100 session's fp32 findings (RESULTS.md), read off its two runs."""
    vision, quick = src["h100 vision"], src["h100 quick"]
    layer = find(vision, "vision CL", "attention layer fwd+bwd (E-prompt layer)")
    methods = [r for r in vision["results"] if r["group"] == "vision CL" and "skipped" not in r
               and r["baseline"] in ("eager concat", "SDPA concat") and ("step" in r["name"] or "inference" in r["name"])
               and "one-stage" not in r["name"]]
    eager = [r for r in methods if r["baseline"] == "eager concat"]
    qpass, = [r for r in eager_rows(vision) if r["name"] == "query pass (frozen forward)"]
    fwd = find(quick, "attention", "prefix attention fwd", kind="fwd")
    decode = find(quick, "attention", "prefix attention decode", kind="decode")
    mixed = find(quick, "generate", "generate, mixed-task batch")
    steps = [r for r in quick["results"] if r["group"] == "train step" and r["baseline"] == "peft" and "skipped" not in r]
    return "\n".join([
        wrap(f"- **fp32 on this GPU.** At ViT-B/16's E-prompt layer (B={layer['params']['B']}) fastprompt's fp32 "
             f"attention takes {ratio(layer, 'time_s')} the time of the reference's eager fp32 attention (cuBLAS "
             f"matmuls), at {ratio(layer, 'new_bytes')} of its new bytes; whole DualPrompt / CODA-Prompt steps and "
             f"inference batches take {_span([r['ratios']['time_s'] for r in methods])} the time of the eager and SDPA "
             f"references, at {_span([r['ratios']['new_bytes'] for r in eager])} of the eager reference's new bytes. "
             f"Even the query pass, which has no prompts, takes {ratio(qpass, 'time_s')} the eager reference's time."),
        wrap(f"- **The text rows** (tiny fp32 models: 4 layers of hidden 256). The prefix-attention forward and "
             f"decode take {ratio(fwd, 'time_s')} and {ratio(decode, 'time_s')} of PEFT's time, at "
             f"{_span([fwd['ratios']['new_bytes'], decode['ratios']['new_bytes']])} of its new bytes; the mixed-task "
             f"generate {ratio(mixed, 'time_s')} of one PEFT generate per task; the training steps "
             f"{_span([r['ratios']['time_s'] for r in steps])} of PEFT's time."),
    ])


def run_region(key: str) -> Callable[[dict], str]:
    """The region of one checked-in `fastprompt bench` run (its header, table, targets and verdicts)."""
    return lambda src: "\n".join(_run_section(src[key]))


RENDERERS: dict[str, Callable[[dict], str]] = {
    "main-job-runtime": main_job_runtime, "bench-summary": bench_summary, "hoisting": hoisting, "t5": t5,
    "query-pass": query_pass, "pool-example": pool_example, "multitask-example": multitask_example,
    "continual-example": continual_example,
    "results-default": results_default, "results-quick": results_quick, "results-vision": results_vision,
    "issue20-before-after": before_after_region("issue 20 before/after"),
    "issue20-before-after-attention": before_after_region("issue 20 before/after, attention"),
    "results-h100-quick": run_region("h100 quick"), "results-h100-vision": run_region("h100 vision"),
    "h100-findings": h100_findings,
    "prompt-free-sdpa-before-after": before_after_region("prompt-free sdpa before/after"),
}


# ---- the documents ------------------------------------------------------------------------------------------------


def render_text(text: str, src: dict) -> str:
    """`text` with every marked region rewritten; an unknown region name is an error."""
    def one(match):
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"no renderer for the region figures:{name} (known: {', '.join(RENDERERS)})")
        indent = match["indent"]
        body = RENDERERS[name](src).rstrip("\n")
        if indent:
            body = "\n".join(indent + line if line else line for line in body.split("\n"))
        return indent + match["open"] + body + "\n" + indent + match["close"]

    return REGION.sub(one, text)


def regions(text: str) -> dict:
    return {m["name"]: m["body"] for m in REGION.finditer(text)}


def stale(root: str = ROOT, src: Optional[dict] = None) -> list[str]:
    """The regions whose text differs from what the checked-in results render, as "file: region"."""
    src = src or load_sources(os.path.join(root, "benchmarks", "results"))
    out = []
    for doc in DOCUMENTS:
        with open(os.path.join(root, doc)) as fh:
            text = fh.read()
        want = regions(render_text(text, src))
        out += [f"{doc}: figures:{name}" for name, body in regions(text).items() if want[name] != body]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a region differs from the results")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    src = load_sources()
    if args.check:
        bad = stale(ROOT, src)
        for item in bad:
            print(f"stale: {item}")
        return 1 if bad else 0
    for doc in DOCUMENTS:
        path = os.path.join(ROOT, doc)
        with open(path) as fh:
            text = fh.read()
        new = render_text(text, src)
        if new != text:
            with open(path, "w") as fh:
                fh.write(new)
            print(f"rewrote {doc}: " + ", ".join(n for n, b in regions(new).items() if regions(text).get(n) != b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
