"""The import graph of the project's packages, read from their source (every import statement, at module level or
inside a function), and a cycle finder over it.

    from import_helpers import find_cycle, import_graph, package_modules
    graph = import_graph(package_modules(REPO / "launch", "launch") | package_modules(REPO / "eval", "eval"))
    assert find_cycle(graph) is None

Module names are dotted import names (`launch.recipe`, `eval.judging.engine`; a package's `__init__.py` is the
package itself). A directory of scripts that import each other by file name (benchmarks/, run with the directory
on sys.path) has its files under their stems. An import names the most specific known module it reaches: the
submodule when `from pkg import sub` names one, else the module or package itself; imports of anything else
(third-party, the standard library) are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path


def package_modules(directory: Path, package: str | None) -> dict[str, Path]:
    """{module name: file} for every .py file under `directory`, recursively; `package` is the directory's import
    name, or None for a directory of scripts importing each other by file name (its subdirectories are skipped)."""
    if package is None:
        return {path.stem: path for path in sorted(directory.glob("*.py"))}
    modules = {}
    for path in sorted(directory.rglob("*.py")):
        parts = [package, *path.relative_to(directory).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    """The package a relative import in `module` starts from: the module itself for an __init__.py."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _targets(node: ast.ImportFrom, module: str, path: Path, modules: set[str]) -> set[str]:
    if node.level:
        parts = _package_of(module, path).split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The modules among `modules` that the file `path` (the module `module`) imports, absolutely or relatively."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found |= _targets(node, module, path, modules)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return (found & modules) - {module}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the modules of `modules` it imports} (see `package_modules` for the names)."""
    names = set(modules)
    return {name: imports_of(name, path, names) for name, path in modules.items()}


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
