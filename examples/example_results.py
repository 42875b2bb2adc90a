"""The examples' --json output: their figures with the settings and the machine they ran on, so the README's
example figures are rendered from a checked-in run (benchmarks/render_figures.py), never typed by hand."""
from __future__ import annotations

import datetime
import json
import os


def write_results(path: str, script: str, settings: dict, results: dict, **extra) -> None:
    from fastprompt.bench.runner import machine_info, versions

    payload = {"meta": {"script": script, "settings": {k: v for k, v in settings.items() if k != "json"},
                        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "machine": machine_info("cpu"), "versions": versions()},
               "results": results, **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
    print(f"wrote {path}")
