"""The package's layering, read from the source: no import circles, the registry a leaf, torch-free datasets.

Imports are read from the AST of every module, function-level ones included (a lazy import is still
a dependency); ``if TYPE_CHECKING:`` blocks are left out, as they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dinocache"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``module`` (at ``path``) imports at run time, resolved to full dotted names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    """dinocache module -> the dinocache modules it imports (names that are modules, not attributes)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path, name) if m in paths and m != name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)):
            return found
    return None


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_module_imports_another_in_a_circle():
    cycle = _cycle(import_graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_registry_is_a_leaf():
    imported = import_graph()["dinocache.encoders.registry"]
    assert not {m for m in imported if m.startswith("dinocache.encoders")}, imported


@pytest.mark.parametrize("package", ["dinocache.datasets"])
def test_datasets_import_no_torch(package):
    graph = import_graph()
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for module in (m for m in graph if m == package or m.startswith(f"{package}.")):
        for reached in {module} | _reaches(graph, module):
            torch = {m for m in _imports(paths[reached], reached) if m.split(".")[0] in ("torch", "timm")}
            assert not torch, f"{module} imports torch through {reached}: {sorted(torch)}"
