"""Every command README.md gives is run by CI (in one lane) or skipped for a written reason (.ci/readme_commands.py);
a program the README shows twice (inside the locked install line and bare) runs once."""
from pathlib import Path

from script_modules import load_script

ROOT = Path(__file__).resolve().parent.parent


def _script():
    return load_script(".ci/readme_commands.py")


def test_every_readme_command_is_run_in_exactly_one_lane_or_skipped_for_a_reason():
    rc = _script()
    commands = rc.readme_commands((ROOT / "README.md").read_text())
    assert commands
    for command in commands:
        locked, _ = rc.decision(command, "locked", commands)
        newest, reason = rc.decision(command, "newest", commands)
        assert "unknown" not in (locked, newest), (command, reason)
        runs = [locked == "run", newest == "run"]
        assert sum(runs) == 1 or (locked == newest == "skip") or (locked == newest == "locked"), (command, locked,
                                                                                                   newest)


def test_a_program_shown_twice_runs_once_in_the_locked_lane():
    rc = _script()
    commands = ["python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/fastprompt bench",
                "fastprompt bench", "fastprompt bench --quick"]
    assert rc.decision("fastprompt bench", "newest", commands)[0] == "locked"
    assert rc.decision("fastprompt bench --quick", "newest", commands)[0] == "run"
