"""Nothing at the repository root may shadow an installed package.

`python -m pytest`, `python -m fastprompt` and `python -c` put the working directory first on sys.path, so a root
folder or module named like an installed distribution's import name wins over it. It happened: the Triton kernels
lived in a root `kernels/` folder, transformers 5.25 started importing Hugging Face's `kernels` package at model
load, and every model import from the root failed. The kernels now live in fastprompt/kernels/.
"""
import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SUFFIXES = (".py", ".pyc", ".pyd") + tuple(s for s in (sysconfig.get_config_var("EXT_SUFFIX"), ".so") if s)


def root_import_names(root: Path) -> dict:
    """{import name: entry} for every entry of `root` that `import name` could find with root on sys.path: any folder
    whose name is an identifier (with or without __init__.py: a namespace package still shadows a namespace
    package, and a module of a distribution that has none) and every module file."""
    names = {}
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            stem = entry.name
        else:
            suffix = next((s for s in _SUFFIXES if entry.name.endswith(s)), None)
            if suffix is None:
                continue
            stem = entry.name[: -len(suffix)].split(".")[0]
        if stem.isidentifier():
            names[stem] = entry.name
    return names


def installed_import_names() -> dict:
    """{import name: [distributions]} for the environment running the tests, less fastprompt itself, plus the
    standard library's modules."""
    names = {n: [d for d in dists if d.lower() != "fastprompt"] for n, dists in metadata.packages_distributions().items()}
    names = {n: d for n, d in names.items() if d}
    for n in sys.stdlib_module_names:
        names.setdefault(n, ["the standard library"])
    return names


def shadowed(root: Path) -> list:
    installed = installed_import_names()
    return sorted(f"{entry} shadows `{name}` ({', '.join(installed[name])})"
                  for name, entry in root_import_names(root).items() if name in installed and name != "fastprompt")


def test_no_root_entry_is_named_like_an_installed_package():
    assert shadowed(ROOT) == []


def test_the_check_sees_a_root_folder_named_like_an_installed_package(tmp_path):
    """The check itself: a folder named after an installed distribution's import name (pytest's) is caught, with
    or without __init__.py, and so is a module file."""
    (tmp_path / "fastprompt").mkdir()
    (tmp_path / "_pytest").mkdir()
    (tmp_path / "pluggy.py").write_text("")
    (tmp_path / "notes.txt").write_text("")
    found = shadowed(tmp_path)
    assert len(found) == 2 and found[0].startswith("_pytest shadows `_pytest`") and "pluggy.py" in found[1]


def test_models_import_from_the_repository_root():
    """What a user runs from the root: transformers' model module (which imports HF `kernels` from 5.25 on) and
    fastprompt, in a fresh interpreter whose sys.path starts with the root."""
    code = "import transformers.modeling_utils, fastprompt.integrations, fastprompt.kernels; print('ok')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
