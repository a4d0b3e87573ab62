"""The README states the library's real defaults and names every module in its architecture section."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
        _, _, norm, _, init, scaling, n, lr, _worked = cells
        assert norm == d["normalization"], method
        assert init == d["init"], method
        assert float(scaling) == d["scaling"], method
        assert int(n) == d["n"], method
        assert float(lr) == d["lr"], method


def test_suggested_lrs_are_what_the_quality_benchmark_chose():
    """Where part 2 of benchmarks.quality chose an interior lr for a method at its defaults, that lr is the
    suggested one and the README's range is the report's; elsewhere the README says the lr was not chosen there."""
    from benchmarks.quality_report import lr_ranges, train_view
    from benchmarks.quality_train import LIBRARY_LABELS

    view = train_view(REPO / "benchmarks" / "results")
    ranges = lr_ranges(view) if view else {}
    for method, cells in _table_rows().items():
        worked = cells[-1]
        r = ranges.get(LIBRARY_LABELS[method])
        if r is None:
            assert worked.startswith("not chosen"), (method, worked)
            continue
        assert METHOD_DEFAULTS[method]["lr"] == pytest.approx(r["chosen"], rel=1e-9), method
        span = _lr_text(r["lo"]) if r["lo"] == r["hi"] else f"{_lr_text(r['lo'])} – {_lr_text(r['hi'])}"
        assert worked == span, (method, worked, span)


def _lr_text(lr: float) -> str:
    """An lr as the README writes it: two significant digits, a trailing zero dropped (9e-02, 8.1e-02)."""
    return f"{lr:.1e}".replace(".0e", "e")


def _make_rules() -> tuple[dict[str, str], dict[str, tuple[list[str], list[str]]]]:
    """The Makefile's variables {name: value} and explicit rules {target: (prerequisites, recipe lines)}."""
    variables, rules, target = {}, {}, None
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("\t") and target is not None:
            if not line.lstrip().startswith("#"):
                rules[target][1].append(line.strip())
        elif match := re.match(r"^([A-Za-z_]+) *[:?]?= *(.*)$", line):
            variables[match[1]] = match[2]
            target = None
        elif match := re.match(r"^([^\s#:=]+):(?!=) *(.*)$", line):
            target = match[1]
            rules[target] = (match[2].split(), [])
        elif line.strip() and not line.startswith("#"):
            target = None
    return variables, rules


def _section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n")[1].split("\n## ")[0]


def test_the_two_commands_are_make_targets_doing_what_the_readme_says():
    block = _section("Two commands").split("```bash\n")[1].split("```")[0]
    commands = dict(re.findall(r"^make (\S+) +# (.*)$", block, re.M))
    assert list(commands) == ["demo", "test", "test-fast"]
    variables, rules = _make_rules()
    phony = rules[".PHONY"][0]
    for target, says in commands.items():
        assert target in rules and target in phony, f"README names `make {target}`, the Makefile has no such target"
        assert "$(STAMP)" in rules[target][0], f"`make {target}` does not set up .venv first"
    # the environment: .venv built with pip from the constraints file the README names
    assert variables["VENV"] == ".venv" and variables["CONSTRAINTS"] == "constraints-cpu.txt"
    assert "$(CONSTRAINTS)" in rules["$(STAMP)"][0]
    installs = [line for line in rules["$(STAMP)"][1] if line.startswith("$(PIP) install") and "-e " in line]
    assert installs and all("-c $(CONSTRAINTS)" in line for line in installs)
    assert "constraints-cpu.txt" in _section("Two commands")
    # demo: launch.demo, the module the demo section describes
    assert rules["demo"][1] == ["$(BIN)/python -m launch.demo"]
    assert "`make demo` (`python -m launch.demo`)" in _section("The demo")
    # test: the whole suite after the one-node Slurm; test-fast: the suite without the slow marker
    assert "slurm-cluster" in rules["test"][0] and "Slurm" in commands["test"]
    assert rules["test"][1] == ["CI=$${CI:-} $(BIN)/python -m pytest $(PYTEST_ARGS)"]
    assert rules["test-fast"][1] == ["$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)"]
    assert "pytest -m 'not slow'" in commands["test-fast"]
    # CI runs exactly the README's test command
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_finding_is_what_the_quality_report_says():
    """The README's one line on what the benchmark found is the report's headline over the stored results."""
    from benchmarks.quality_report import headline, train_view

    block = README.read_text().split("<!-- finding")[1].split("<!-- /finding -->")[0]
    line = headline(train_view(REPO / "benchmarks" / "results"))
    assert line and block.split("-->", 1)[1].strip() == f"**Benchmark finding.** {line}"


def _architecture() -> str:
    return _section("Architecture")


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
