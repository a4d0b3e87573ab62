"""The applications (launch/, eval/, slurm/, benchmarks/) and the library they use (sspeft/) form one import graph,
built from every import statement (module level or inside a function), with no cycle; imports point one way: the
library imports no application."""

from __future__ import annotations

from pathlib import Path

from import_helpers import find_cycle, import_graph, package_modules

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sspeft", "launch", "eval", "slurm")


def project_graph() -> dict[str, set[str]]:
    """The import graph of the library, the application packages and the benchmark scripts (by file name)."""
    modules = package_modules(REPO / "benchmarks", None)
    for package in PACKAGES:
        modules |= package_modules(REPO / package, package)
    return import_graph(modules)


def test_import_graph_resolves_relative_and_nested_imports(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (tmp_path / "sub" / "leaf.py").write_text("def x():\n    from .. import top\n    import app.sub\n")
    (tmp_path / "top.py").write_text("from app.sub import leaf\nimport os\n")
    assert import_graph(package_modules(tmp_path, "app")) == {
        "app": set(), "app.sub": {"app.sub.leaf"}, "app.sub.leaf": {"app.top", "app.sub"}, "app.top": {"app.sub.leaf"}}


def test_applications_and_library_have_no_import_cycle():
    graph = project_graph()
    assert {"launch.recipe", "launch.sftconfig", "eval.judging.engine", "slurm.submit", "gpu_check"} <= set(graph)
    assert "launch.sftconfig" in graph["launch.recipe"], "the recipe loader reaches SFTConfig's checks by import"
    assert "launch.recipe" in graph["eval.target"], "eval reads the recipe schema by import"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' → '.join(cycle)}"


def test_library_imports_no_application():
    graph = project_graph()
    upward = sorted(f"{m} → {t}" for m, targets in graph.items() if m.split(".")[0] == "sspeft"
                    for t in targets if t.split(".")[0] != "sspeft")
    assert upward == [], f"sspeft imports application modules: {upward}"
