"""A smoke run of examples/train_continual_digits.py (--quick: 1 pretraining epoch, 2 steps per task, a tenth of the
test images): every method runs through the five tasks and reports its metrics. The full run is the README's."""
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("sklearn")


def test_the_continual_example_runs_quickly(monkeypatch, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("train_continual_digits",
                                                  os.path.join(ROOT, "examples", "train_continual_digits.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))  # example_results, for --json
    out = tmp_path / "run.json"
    monkeypatch.setattr(sys, "argv", ["train_continual_digits.py", "--quick", "--epochs", "1", "--json", str(out)])
    example.main()
    printed = capsys.readouterr().out
    for name in example.METHODS:
        assert name in printed
    results = json.loads(out.read_text())["results"]
    assert set(results) == set(example.METHODS)
    for r in results.values():
        (run,) = r["seeds"]
        assert [len(row) for row in run["accuracy"]] == [1, 2, 3, 4, 5]
        assert 0.0 <= r["average_accuracy"] <= 1.0 and -1.0 <= r["forgetting"] <= 1.0
