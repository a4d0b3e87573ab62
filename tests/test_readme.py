"""The README states the library's real defaults and names every module in its architecture section."""

import re
import subprocess
import sys
from pathlib import Path

import sspeft
from sspeft.config import METHOD_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PACKAGES = ("sspeft", "launch", "eval", "slurm", "benchmarks")


def _table_rows() -> dict[str, list[str]]:
    text = README.read_text()
    block = text.split("<!-- method-table")[1].split("<!-- /method-table -->")[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in sspeft.METHODS:
            rows[cells[0]] = cells
    return rows


def test_method_table_matches_defaults():
    rows = _table_rows()
    assert set(rows) == set(sspeft.METHODS)
    for method, cells in rows.items():
        d = METHOD_DEFAULTS[method]
        _, _, norm, _, init, scaling, n, lr = cells
        assert norm == d["normalization"], method
        assert init == d["init"], method
        assert float(scaling) == d["scaling"], method
        assert int(n) == d["n"], method
        assert float(lr) == d["lr"], method


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def _architecture() -> str:
    return README.read_text().split("\n## Architecture\n")[1].split("\n## ")[0]


def test_architecture_names_every_module_once():
    listed = re.findall(r"^- `([^`]+\.py)`: \S", _architecture(), re.M)
    modules = sorted(p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
                     if p.name != "__init__.py" or p.parent.name == "sspeft")
    modules.append("sspeft_cli.py")
    assert sorted(listed) == sorted(modules)


def test_modules_said_to_be_torch_free_are():
    names = re.search(r"`launch\.process`, `launch\.rundir`, `launch\.recipe` and `launch\.models` import no torch",
                      _architecture())
    assert names, "the architecture section no longer names the torch-free modules"
    code = ("import sys, launch.process, launch.rundir, launch.recipe, launch.models, slurm.render, slurm.rank, "
            "eval.target; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
