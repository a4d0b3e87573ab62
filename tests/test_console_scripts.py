"""Console scripts (`sspeft-train` …): declared in pyproject.toml, installed by pip next to the packages, and
refusing to run when another distribution's `launch`/`eval`/`slurm` shadows the stages."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"sspeft-train": "launch.train", "sspeft-merge": "launch.merge", "sspeft-generate": "eval.generate",
            "sspeft-judge": "eval.judge", "sspeft-audit": "eval.audit",
            "sspeft-report": "eval.report", "sspeft-submit": "slurm.submit"}


def _scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_stage_has_a_console_script():
    import sspeft_cli

    scripts = _scripts()
    assert set(scripts) == set(COMMANDS)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
        assert sspeft_cli.COMMANDS[func] == COMMANDS[name]  # the same module `python -m` runs
        assert importlib.util.find_spec(COMMANDS[name]) is not None


def _run(script: Path, *args: str, pythonpath: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=300, cwd="/")


@pytest.mark.slow
def test_pip_installs_working_scripts(tmp_path):
    # build from a copy: pip builds in the source tree and would leave build/ and *.egg-info in the checkout
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "sspeft_cli.py"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for package in ("sspeft", "launch", "eval", "slurm"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    entry_points = next(target.glob("sspeft-*.dist-info/entry_points.txt")).read_text()
    for name, value in _scripts().items():
        assert f"{name} = {value}" in entry_points
    top_level = next(target.glob("sspeft-*.dist-info/top_level.txt")).read_text().split()
    assert sorted(top_level) == ["eval", "launch", "slurm", "sspeft", "sspeft_cli"]
    # run from / with only the install on the path: the scripts find the stages there, not in the checkout
    done = _run(target / "bin" / "sspeft-train", "--help", pythonpath=str(target))
    assert done.returncode == 0 and "recipe" in done.stdout, done.stderr
    # a foreign top-level `eval` earlier on the path is named, and nothing runs
    foreign = tmp_path / "other" / "eval"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("")
    shadowed = _run(target / "bin" / "sspeft-report", "--help", pythonpath=f"{foreign.parent}{os.pathsep}{target}")
    assert shadowed.returncode == 2
    assert f"the package 'eval' is imported from {foreign / '__init__.py'}" in shadowed.stderr
    assert "usage" not in shadowed.stdout
