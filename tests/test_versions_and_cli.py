"""`fastprompt --version`, `fastprompt info` against the tested version ranges, and the once-per-process warning."""
import subprocess
import sys
import warnings

import pytest

from fastprompt import _versions


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fastprompt", *args], capture_output=True, text=True, timeout=300)


def test_version_flag():
    import fastprompt

    out = _run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"fastprompt {fastprompt.__version__}"


def test_info_shows_each_version_against_its_tested_range_without_importing_transformers_or_peft():
    code = ("import sys; from fastprompt.cli import main; main(['info']); "
            "print('IMPORTED', sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name, (low, high) in _versions.TESTED_RANGES.items():
        line = next(line for line in out.stdout.splitlines() if line.startswith(name + " "))
        version = _versions.installed_version(name)
        assert (version or "not installed") in line
        if version is not None:
            assert f"tested {low} - {high}" in line
    assert "IMPORTED []" in out.stdout  # metadata only: info stays fast


@pytest.mark.parametrize("version, status", [
    ("5.19.3", "older than tested"), ("5.20.0", "tested"), ("5.24.0", "tested"), ("5.24.7", "tested"),
    ("5.25.0", "newer than tested"), ("6.0.0.dev0", "newer than tested"), (None, "not installed")])
def test_range_status(monkeypatch, version, status):
    monkeypatch.setitem(_versions.TESTED_RANGES, "transformers", ("5.20.0", "5.24.0"))
    assert _versions.range_status("transformers", version) == status


def test_local_version_tags_are_ignored():
    low, high = _versions.TESTED_RANGES["torch"]
    assert _versions.range_status("torch", high + "+cu130") == "tested"


def test_patch_model_warns_once_outside_the_tested_ranges(monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastprompt as fp

    monkeypatch.setattr(_versions, "_warned", False)
    monkeypatch.setitem(_versions.TESTED_RANGES, "transformers", ("0.0.1", "0.0.2"))
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model = LlamaForCausalLM(cfg)
            fp.patch_model(model, fp.PromptTuning(cfg, num_virtual_tokens=2))
    messages = [str(w.message) for w in caught if "not tested with" in str(w.message)]
    assert len(messages) == 1 and "transformers" in messages[0] and "newer than tested" in messages[0]
    model(torch.randint(0, 64, (1, 3)))


def test_no_warning_inside_the_tested_ranges(monkeypatch):
    monkeypatch.setattr(_versions, "_warned", False)
    for name in _versions.TESTED_RANGES:
        monkeypatch.setitem(_versions.TESTED_RANGES, name, ("0.0.0", "999.0.0"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _versions.warn_untested_versions_once()
    assert not [w for w in caught if "not tested with" in str(w.message)]


def _declared_floor(requirement_lines, name):
    """The `>=` floor of `name` in a list of requirement strings (pyproject's dependencies and extras)."""
    import re

    for line in requirement_lines:
        match = re.match(rf"\s*{re.escape(name)}\s*>=\s*([0-9][0-9.]*)", line)
        if match:
            return match.group(1)
    raise AssertionError(f"no floor for {name} in {requirement_lines}")


def _pins(path):
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_every_place_that_states_the_tested_versions_says_the_same():
    """The tested ranges are stated in five places: fastprompt/_versions.py (what `fastprompt info` and patch_model's
    warning use), the README's versions table, pyproject.toml's floors, .ci/oldest.txt (the oldest lane) and
    requirements-lock.txt (the locked lane). They must agree, so no claim goes stale by hand."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parent.parent
    readme_rows = {m.group(1): (m.group(2), m.group(3), m.group(4)) for m in re.finditer(
        r"^\| (\w+) \| ([0-9.]+) - ([0-9.]+) \| ([0-9.]+) \|$", (root / "README.md").read_text(), re.M)}
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    oldest, locked = _pins(root / ".ci" / "oldest.txt"), _pins(root / "requirements-lock.txt")
    for name, (low, high) in _versions.TESTED_RANGES.items():
        assert readme_rows.get(name) == (low, high, locked[name]), f"README's versions table row for {name}"
        assert _versions.release(_declared_floor(requirements, name)) == _versions.release(low), name
        assert oldest[name] == low, f".ci/oldest.txt pins {name} {oldest[name]}, the tested floor is {low}"
        assert _versions.range_status(name, locked[name]) == "tested", f"the locked {name} {locked[name]}"
    assert set(readme_rows) == set(_versions.TESTED_RANGES)


def test_a_gpu_session_stops_on_a_package_below_its_floor_or_a_missing_required_one_not_on_missing_timm():
    from fastprompt._versions import below_floors

    image = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.25.0", "peft": "0.21.2", "timm": None}
    assert below_floors(image) == []  # the GPU image after the wheels: no timm, and that is fine
    assert below_floors(dict(image, transformers="5.17.0")) == ["transformers 5.17.0 (fastprompt needs >= 5.23.0)"]
    assert below_floors(dict(image, peft=None)) == ["peft not installed (fastprompt needs >= 0.20.0)"]
    assert below_floors(dict(image, timm="0.6.13")) == []  # optional, and no GPU stage uses it
