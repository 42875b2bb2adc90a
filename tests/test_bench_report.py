"""What `fastprompt bench` prints fits 120 columns with the labels of every real case (not only the smoke shapes),
the progress bar names cases by whole words, and every difference it prints carries its unit."""
import pytest
import torch

from fastprompt.bench import report, runner


def _record(case):
    """A finished pair of `case` with the widest figures a CPU run gives (the full run's 8.4 s steps, ratios up to
    9.99x, the widest verdict)."""
    fig = {"time_s": 8.3712, "new_bytes": 10 ** 9, "peak_bytes": 10 ** 9, "saved_bytes": 10 ** 9,
           "flops": 10 ** 12}
    return {"group": case.group, "name": case.name, "params": case.params, "baseline": case.baseline,
            "tags": list(case.tags), "equal": False, "max_rel_diff": 1.2345e-07, "verdict": "baseline wrong",
            "reason": "baseline wrong: PEFT generate on transformers 5.25.0, peft 0.21.2 (differs ...)",
            "figures": {"fastprompt": fig, "baseline": dict(fig, time_s=0.1)},
            "ratios": {"time_s": 9.99, "new_bytes": 9.99, "peak_bytes": 9.99, "saved_bytes": 9.99, "flops": 9.99,
                       "cuda_peak_bytes": None},
            "time_ratio_reps": [0.5, 4.0, 8.0, 9.0]}


@pytest.mark.parametrize("mode", ["quick", "default", "full"])
def test_the_table_legend_and_targets_fit_120_columns(mode):
    results = [_record(c) for c in runner.suite(mode, "cpu")]
    text = "\n".join([runner.format_table(results), runner.legend(results)])
    wide = [line for line in text.splitlines() if len(line) > report.WIDTH]
    assert not wide, wide


def test_the_table_fits_120_columns_with_figures_of_a_loaded_machine():
    """Spreads past 10, 100-second steps, ratios past 10x: the case labels give way (cut between words)."""
    results = []
    for case in runner.suite("default", "cpu"):
        record = _record(case)
        record["figures"]["fastprompt"]["time_s"] = 123.4
        record["ratios"].update(time_s=83.7, new_bytes=12.5, peak_bytes=10.2)
        record["time_ratio_reps"] = [0.1, 5.0, 30.0, 40.0]
        results.append(record)
    lines = runner.format_table(results).splitlines()
    assert max(len(line) for line in lines) <= report.WIDTH
    start, stop = lines[0].index("case"), lines[0].index(" vs ")  # the case column, from the header
    cut = False
    for line, case in zip(lines[2:], runner.suite("default", "cpu")):
        label = report.short_case({"group": case.group, "name": case.name, "params": case.params})
        shown = line[start:stop].strip().removesuffix(" …")
        assert label.startswith(shown), (shown, label)
        cut |= shown != label
    # a label that had to give way says so (which labels must depends on the suite: seq2seq cases need 5.24)
    assert cut == any("…" in line for line in lines[2:])


def test_the_targets_lines_fit_120_columns_and_keep_every_word():
    rows = [{"target": "attention layer fwd+bwd new bytes <= 0.5x PEFT path", "case": "B=8 S=256 P=32 Hq=8 Hkv=2 D=64",
             "value": 0.4097, "limit": 0.5, "met": True, "detail": "15.5 MiB vs 37.8 MiB"},
            {"target": "prefix overhead (new bytes) <= 0.5x PEFT", "case": "model=L8 h512 8q/2kv B=8 S=256 P=32",
             "value": -0.41, "limit": 0.5, "met": False, "detail": "fastprompt -40.2 MiB vs PEFT 97.5 MiB"}]
    text = report.format_targets(rows)
    assert max(len(line) for line in text.splitlines()) <= report.WIDTH
    assert text.splitlines()[0].startswith("met     attention layer")
    assert "MISSED  prefix overhead" in text
    words = " ".join(text.split())
    for row in rows:
        assert f"{row['target']}: {row['value']:.2f}x ({row['detail']}; {row['case']})" in words


@pytest.mark.parametrize("mode", ["quick", "default", "full"])
def test_the_progress_bar_names_cases_by_whole_words(mode):
    for case in runner.suite(mode, "cpu"):
        label = report.progress_label(case.group, case.name, case.params)
        whole = report.short_case({"group": case.group, "name": case.name, "params": case.params})
        assert len(label) <= 48
        if label != whole:
            kept = label.removesuffix(" …")
            assert label.endswith(" …") and whole.startswith(kept + " "), (label, whole)


def test_progress_label_cuts_between_words():
    label = report.progress_label("train step", "a very long case name", {"model": "L4 h256 8q/2kv", "B": 4, "S": 8,
                                                                        "P": 2}, limit=20)
    assert label == "train a very long …"


def test_differences_name_their_unit():
    tokens = {"tokens": torch.zeros(2, 3, dtype=torch.long)}
    floats = {"out": torch.zeros(2), "dq": torch.zeros(2)}
    assert report.diff_text(tokens, 0.11) == "in 11% of the output token ids"
    assert report.diff_text(floats, 0.0021) == "by a max relative difference of 0.0021"
    assert "fraction" in report.diff_text({**tokens, **floats}, 0.5)
