"""The versions of torch / triton / transformers / peft / timm that fastprompt is tested with, and a check against
them (timm is optional: the vision extra; a package that is not installed is never warned about).

The ranges below are claims: CI tests each end (`.ci/run`: the locked lane at the upper versions of
`requirements-lock.txt`, the oldest lane at the floors, the newest lane at whatever the index serves that day).
Versions are read from package metadata, never by importing the packages: `fastprompt info` stays fast and the
check costs nothing at patch time.
"""
from __future__ import annotations

import re
import warnings
from importlib import metadata
from typing import Optional

# package -> (oldest tested, newest tested). Keep in sync with pyproject.toml's floors and requirements-lock.txt.
TESTED_RANGES = {
    "torch": ("2.11.0", "2.14.1"),
    "triton": ("3.6.0", "3.9.0"),
    "transformers": ("5.23.0", "5.25.0"),
    "peft": ("0.20.0", "0.21.2"),
    "timm": ("0.9.16", "1.0.31"),
}

# Packages fastprompt runs without (timm: the vision extra). Not installed is fine; installed, its range applies.
OPTIONAL_PACKAGES = ("timm",)

_warned = False


def installed_version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict:
    return {name: installed_version(name) for name in TESTED_RANGES}


def release(version: str) -> tuple:
    """(major, minor, patch) of a version string; local and pre-release tags ('+cu130', 'rc1') ignored."""
    parts = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return tuple(int(p or 0) for p in parts.groups()) if parts else (0, 0, 0)


def range_status(package: str, version: Optional[str]) -> str:
    """'tested', 'older than tested', 'newer than tested' or 'not installed'."""
    if version is None:
        return "not installed"
    low, high = TESTED_RANGES[package]
    if release(version) < release(low):
        return "older than tested"
    # A newer patch release of the newest tested minor is still covered (e.g. 5.25.1 when 5.25.0 is tested).
    if release(version)[:2] > release(high)[:2]:
        return "newer than tested"
    return "tested"


def below_floors(versions: Optional[dict] = None) -> list[str]:
    """What stops a GPU session (benchmarks/gpu_session.sh): each required package older than its floor or not
    installed, as 'transformers 5.17.0 (fastprompt needs >= 5.23.0)'. An optional package (OPTIONAL_PACKAGES) never
    stops it, absent or old: no GPU stage uses timm, and the image's own timm (version not known ahead) must not cost
    the session; its line in versions.txt still says where it stands."""
    versions = installed_versions() if versions is None else versions
    blockers = []
    for name, version in versions.items():
        if name in OPTIONAL_PACKAGES:
            continue
        status = range_status(name, version)
        if status in ("older than tested", "not installed"):
            blockers.append(f"{name} {version or 'not installed'} (fastprompt needs >= {TESTED_RANGES[name][0]})")
    return blockers


def untested_versions() -> list[str]:
    """One line per installed package outside its tested range, e.g. 'transformers 5.30.0 is newer than tested (5.23.0 - 5.25.0)'."""
    lines = []
    for name, version in installed_versions().items():
        status = range_status(name, version)
        if status in ("older than tested", "newer than tested"):
            low, high = TESTED_RANGES[name]
            lines.append(f"{name} {version} is {status} ({low} - {high})")
    return lines


def warn_untested_versions_once() -> None:
    """One UserWarning per process when torch / triton / transformers / peft / timm are outside the tested ranges."""
    global _warned
    if _warned:
        return
    _warned = True
    lines = untested_versions()
    if lines:
        warnings.warn("fastprompt: running with versions it was not tested with: " + "; ".join(lines)
                      + ". Results are checked against the oracle in CI only inside the tested ranges "
                      "(`fastprompt info` shows them).", UserWarning, stacklevel=3)
