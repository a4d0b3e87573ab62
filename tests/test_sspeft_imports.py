"""The import graph of the sspeft package, built from its modules' source (every import statement, at module level
or inside a function), has no cycle: each module can be read knowing only those it imports. No module uses another
module's private (underscore) names."""

from __future__ import annotations

import ast
from pathlib import Path

import sspeft

PACKAGE = Path(sspeft.__file__).parent


def _module_name(path: Path) -> str:
    return "sspeft" if path.name == "__init__.py" else f"sspeft.{path.stem}"


def _target(package_part: str | None, name: str | None, modules: set[str]) -> str:
    """The sspeft module an import names: the submodule if one exists, else the package itself (its __init__)."""
    base = "sspeft" if not package_part else f"sspeft.{package_part}"
    if name is not None and f"{base}.{name}" in modules:
        return f"{base}.{name}"
    return base


def _imports(source: str, modules: set[str]) -> set[str]:
    """The sspeft modules that ``source`` (a module of the package) imports, relatively or absolutely."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {_target(node.module, alias.name, modules) for alias in node.names}
            elif node.level == 0 and node.module and node.module.split(".")[0] == "sspeft":
                part = node.module.partition(".")[2] or None
                found |= {_target(part, alias.name, modules) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sspeft"}
    return found & modules


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: modules of the package it imports} for every .py file directly in ``package``."""
    files = {_module_name(p): p for p in sorted(package.glob("*.py"))}
    modules = set(files)
    return {name: _imports(path.read_text(), modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


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
    modules = {_module_name(p): p for p in sorted(package.glob("*.py"))}
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
