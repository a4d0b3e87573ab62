"""The import graph of the sspeft package, built from its modules' source (every import statement, at module level
or inside a function), has no cycle: each module can be read knowing only those it imports. No module uses another
module's private (underscore) names."""

from __future__ import annotations

import ast
from pathlib import Path

from import_helpers import find_cycle, package_modules
from import_helpers import import_graph as shared_import_graph

import sspeft

PACKAGE = Path(sspeft.__file__).parent


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: modules of the package it imports} for every module of ``package`` (named as sspeft's)."""
    return shared_import_graph(package_modules(package, "sspeft"))


def test_find_cycle_reports_a_cycle_and_accepts_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_function_level_and_package_imports(tmp_path):
    (tmp_path / "__init__.py").write_text("from .one import f\n")
    (tmp_path / "one.py").write_text("def f():\n    from . import two\n    from . import __version__\n")
    (tmp_path / "two.py").write_text("from sspeft.one import f\nimport sspeft.one\n")
    assert import_graph(tmp_path) == {"sspeft": {"sspeft.one"}, "sspeft.one": {"sspeft.two", "sspeft"},
                                      "sspeft.two": {"sspeft.one"}}


def test_sspeft_has_no_import_cycle():
    graph = import_graph()
    assert {"sspeft.layer", "sspeft.forward", "sspeft.io"} <= set(graph), "the package's modules were not found"
    assert "sspeft.forward" in graph["sspeft.layer"], "the layer reaches its execution paths by import"
    cycle = find_cycle(graph)
    assert cycle is None, f"sspeft has an import cycle: {' → '.join(cycle)}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(package: Path = PACKAGE) -> list[str]:
    """'module: name' for every private name of another sspeft module that a module imports or reads off it."""
    modules = package_modules(package, "sspeft")
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        imported = {}  # local name → sibling module, from `from . import x [as y]`
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found += [f"{name}: {node.module}.{a.name}" for a in node.names if _is_private(a.name)]
                else:
                    imported |= {a.asname or a.name: a.name for a in node.names if f"sspeft.{a.name}" in modules}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                    and _is_private(node.attr)):
                found.append(f"{name}: {imported[node.value.id]}.{node.attr}")
    return found


def test_private_uses_are_found(tmp_path):
    (tmp_path / "one.py").write_text("from .two import _helper\n")
    (tmp_path / "two.py").write_text("from . import one\nx = one._state\n_helper = 1\n")
    assert private_uses(tmp_path) == ["sspeft.one: two._helper", "sspeft.two: one._state"]


def test_no_module_uses_another_modules_private_names():
    assert private_uses() == []
