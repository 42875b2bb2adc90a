"""bench.png: every compared pair's ratios on one log-scale panel (so a 4x bar does not flatten a 0.9x one), the
sequence / prefix-length sweeps of the attention layer beside it, and every pair whose outputs are not plainly
equal flagged in its label."""
from __future__ import annotations

from .report import short_case, verdict_of

__all__ = ["chart"]

_BARS = (("time_s", "time", "#1f77b4"), ("new_bytes", "new bytes", "#ff7f0e"), ("peak_bytes", "peak live bytes",
                                                                                 "#2ca02c"))
_LINES = (("time_s", "time", "o-"), ("new_bytes", "new bytes", "s-"), ("peak_bytes", "peak live bytes", "^-"),
          ("saved_bytes", "saved for backward", "d-"))
_FLAG = {"baseline wrong": ("baseline wrong", "#d68100"), "fastprompt wrong": ("FASTPROMPT WRONG", "#c00000"),
         "unequal": ("UNEQUAL", "#c00000"), "error": ("ERROR", "#c00000")}
_RATIO_TICKS = (0.125, 0.25, 0.5, 1, 2, 4, 8)


def _sweep(results, tag, axis):
    """fwd+bwd attention rows of one sweep plus the reference row when it lies on the same line."""
    rows = [r for r in results if "error" not in r and "skipped" not in r and r["group"] == "attention"
            and r["params"]["kind"] == "fwd+bwd" and tag in r["tags"]]
    if not rows:
        return []
    fixed = {k: v for k, v in rows[0]["params"].items() if k != axis}
    for r in results:
        if ("reference" in r.get("tags", ()) and r["group"] == "attention" and "error" not in r
                and "skipped" not in r and r not in rows
                and {k: v for k, v in r["params"].items() if k != axis} == fixed):
            rows.append(r)
    return sorted(rows, key=lambda r: r["params"][axis])


def _log_ratio_axis(values):
    """log2 scale with plain ratio tick labels, spanning the plotted values and 1."""
    finite = [v for v in values if v and v > 0]
    lo, hi = min(finite + [1.0]), max(finite + [1.0])
    ticks = [t for t in _RATIO_TICKS if lo / 1.5 <= t <= hi * 1.5] or [1]
    return lo / 1.3, hi * 1.3, ticks


def chart(results: list[dict], path: str, meta: dict) -> None:
    import matplotlib  # optional dependency (the bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional dependency, imported after choosing the Agg backend

    pairs = [r for r in results if "skipped" not in r]
    numbered = list(enumerate(pairs, 1))
    shown = [(n, r) for n, r in numbered if "error" not in r]
    height = max(5.0, 0.42 * len(pairs) + 1.6)
    fig = plt.figure(figsize=(16, height))
    grid = fig.add_gridspec(2, 2, width_ratios=(1.45, 1.0))
    bars = fig.add_subplot(grid[:, 0])

    # every pair: one group of horizontal bars, log scale
    width = 0.26
    values = []
    for k, (key, label, color) in enumerate(_BARS):
        ys, xs = [], []
        for i, (n, r) in enumerate(shown):
            ratios = r["ratios"]
            x = (ratios.get("cuda_peak_bytes") or ratios.get(key)) if key == "peak_bytes" else ratios.get(key)
            if x is not None and x > 0:
                ys.append(i + (k - 1) * width)
                xs.append(x)
        values += xs
        bars.barh(ys, xs, height=width, color=color, label=label, left=0)
        for y, x in zip(ys, xs):
            bars.text(x * 1.03, y, f"{x:.2f}", va="center", fontsize=6)
    lo, hi, ticks = _log_ratio_axis(values)
    bars.set_xscale("log", base=2)
    bars.set_xlim(lo, hi * 1.45)  # room for the value labels
    bars.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    bars.axvline(1.0, color="black", lw=0.9, ls="--")
    labels = []
    for n, r in shown:
        flag = _FLAG.get(verdict_of(r))
        labels.append(f"#{n} {short_case(r)}" + (f"  [{flag[0]}]" if flag else ""))
    bars.set_yticks(range(len(shown)), labels, fontsize=7.5)
    for tick, (n, r) in zip(bars.get_yticklabels(), shown):
        flag = _FLAG.get(verdict_of(r))
        if flag:
            tick.set_color(flag[1])
            tick.set_fontweight("bold")
    bars.invert_yaxis()
    bars.set_xlabel("fastprompt / baseline (log scale; left of the dashed 1x line: fastprompt better)")
    bars.set_ylabel("compared pair (row number as in the table)")
    bars.set_title("every compared pair: time and memory ratios", fontsize=10, pad=24)
    bars.grid(alpha=0.3, axis="x")
    bars.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)

    # the sweeps: lines on a log scale
    for row, (axis, tag, what) in enumerate((("S", "sweep_seq", "sequence length S"),
                                             ("P", "sweep_prefix", "prefix length P"))):
        ax = fig.add_subplot(grid[row, 1])
        rows = _sweep(results, tag, axis)
        xs = [r["params"][axis] for r in rows]
        plotted = []
        for key, label, style in _LINES:
            ys = [r["ratios"].get(key) for r in rows]
            if any(y for y in ys):
                ax.plot(xs, [float("nan") if not y else y for y in ys], style, label=label)
                plotted += [y for y in ys if y]
        for r in rows:
            flag = _FLAG.get(verdict_of(r))
            if flag:
                ax.annotate(flag[0], (r["params"][axis], 1.0), color=flag[1], fontsize=7, ha="center")
        fixed = ", ".join(f"{k}={v}" for k, v in rows[0]["params"].items() if k not in (axis, "kind")) if rows else ""
        ax.axhline(1.0, color="black", lw=0.9, ls="--")
        if xs:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        else:
            ax.set_xticks([])
        lo, hi, ticks = _log_ratio_axis(plotted)
        ax.set_yscale("log", base=2)
        ax.set_ylim(lo, hi)
        ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
        ax.set_xlabel(what)
        ax.set_ylabel("fastprompt / baseline (log)")
        ax.set_title(f"prefix attention fwd+bwd vs the PEFT path, over {what}\n{fixed}" if rows else
                     f"prefix attention fwd+bwd over {what}: no sweep in this run", fontsize=9)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize=7)
    machine = meta.get("machine", {})
    v = meta.get("versions", {})
    fig.suptitle(f"fastprompt vs PEFT + transformers on {machine.get('gpu') or machine.get('cpu', '?')}, "
                 f"{machine.get('torch_threads', '?')} thread(s); torch {v.get('torch')}, transformers "
                 f"{v.get('transformers')}, peft {v.get('peft')} ({meta.get('mode', '')}, "
                 f"{meta.get('date', '')[:16]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
