"""The README's and RESULTS.md's figures are the checked-in results' (benchmarks/results/*.json), written by
benchmarks/render_figures.py into marked regions: a figure edited by hand, or results re-run without re-rendering,
fail here. The headline byte figure is also re-counted (byte counts are deterministic), so the checked-in run
must be one that the tree reproduces."""
import os
import re

import pytest

from script_modules import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


render = load_script("benchmarks/render_figures.py")


def _read(name):
    with open(os.path.join(ROOT, name)) as fh:
        return fh.read()


def test_every_region_matches_the_checked_in_results():
    stale = render.stale(ROOT)
    assert not stale, ("figures differ from benchmarks/results/*.json (run `python benchmarks/render_figures.py`, "
                       f"never edit them by hand): {stale}")


def test_the_documents_have_their_regions():
    assert set(render.regions(_read("README.md"))) == {"main-job-runtime", "bench-summary", "hoisting", "t5",
                                                      "query-pass", "pool-example", "multitask-example",
                                                      "continual-example"}
    assert set(render.regions(_read(os.path.join("benchmarks", "RESULTS.md")))) == {"results-default",
                                                                                    "results-quick",
                                                                                    "issue20-before-after",
                                                                                    "issue20-before-after-attention", "results-vision",
                                                                                    "results-h100-quick",
                                                                                    "results-h100-vision",
                                                                                    "h100-findings",
                                                                                    "prompt-free-sdpa-before-after"}
    assert set(render.RENDERERS) == {"main-job-runtime", "bench-summary", "hoisting", "t5", "query-pass",
                                     "pool-example", "multitask-example", "continual-example", "results-default",
                                     "results-quick", "issue20-before-after",
                                     "issue20-before-after-attention", "results-vision", "results-h100-quick",
                                     "results-h100-vision", "h100-findings", "prompt-free-sdpa-before-after"}


def test_the_readme_has_no_figure_outside_a_region():
    """Ratios and byte sizes in the README are rendered; one typed by hand outside a region is refused."""
    outside = render.REGION.sub("", _read("README.md"))
    hand = re.findall(r"\b\d+\.\d+x\b|\b\d+(?:\.\d+)? ?(?:MiB|GiB|MB|GB)\b", outside)
    assert not hand, hand


def test_a_figure_edited_by_hand_is_caught():
    src = render.load_sources()
    text = render.render_text(_read("README.md"), src)
    body = render.regions(text)["bench-summary"]
    edited = text.replace(body, re.sub(r"\d\.\d\dx", "0.01x", body, count=1))
    assert render.regions(edited)["bench-summary"] != body
    assert render.regions(render.render_text(edited, src))["bench-summary"] == body


def test_an_unknown_region_is_an_error():
    with pytest.raises(KeyError, match="figures:nothing"):
        render.render_text("<!-- figures:nothing -->\n<!-- /figures -->\n", render.load_sources())


def test_the_rendered_versions_are_the_runs():
    src = render.load_sources()
    versions = src["default"]["meta"]["versions"]
    body = render.regions(_read("README.md"))["bench-summary"]
    assert f"transformers {versions['transformers']}" in body and f"torch {versions['torch']}" in body


def test_the_checked_in_attention_bytes_reproduce():
    """The reference attention layer's new bytes, counted afresh, are the checked-in run's (the figure the README's
    summary and the target lead with; a change to the op's allocations must come with a re-run)."""
    import torch

    from fastprompt.bench import runner
    from fastprompt.bench.cases import compared_sides

    run = render.load_sources()["default"]
    record = render.attention_reference(run)
    case = next(c for c in runner.suite("default") if c.group == "attention" and "reference" in c.tags)
    assert case.params == record["params"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sides = compared_sides(case.build("cpu"))
        counted = {}
        for name, side in sides.items():
            side.step()
            counted[name] = runner._counts(side)[0]
    finally:
        torch.set_num_threads(threads)
    ratio = counted["fastprompt"] / counted["baseline"]
    assert ratio == pytest.approx(record["ratios"]["new_bytes"], abs=0.01), (counted, record["figures"])
