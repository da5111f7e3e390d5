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


#: The ACT model (what training and serving both use), stage two and stage three: each stage builds on
#: the model and the layers below it, never on a sibling stage; the model on neither stage.
POLICY_MODEL, STAGE_TWO, STAGE_THREE = "dinocache.policy.model", "dinocache.policy.training", "dinocache.policy.deployment"
FORBIDDEN = {
    POLICY_MODEL: (STAGE_TWO, STAGE_THREE),
    STAGE_TWO: (STAGE_THREE,),
    STAGE_THREE: (STAGE_TWO,),
    # the layers below the policy know nothing of it
    "dinocache.datasets": ("dinocache.policy", "dinocache.pipeline", "dinocache.encoders"),
    "dinocache.encoders": ("dinocache.policy", "dinocache.pipeline"),
    "dinocache.pipeline": ("dinocache.policy",),
}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_never_reaches_a_sibling_or_a_layer_above(package):
    """Direct imports and what they reach in turn: a stage importing a shared module that imports the
    other stage is as much a breach as importing it itself."""
    graph = import_graph()
    modules = [m for m in graph if _within(m, package)]
    assert modules, f"no modules under {package}"
    breaches = []
    for module in modules:
        for reached in {module} | _reaches(graph, module):
            if any(_within(reached, f) for f in FORBIDDEN[package]):
                continue  # reported at the edge that crossed into it
            bad = [m for m in graph[reached] if any(_within(m, f) for f in FORBIDDEN[package])]
            breaches += [f"{module} -> ... {reached} -> {m}" for m in bad]
    assert not breaches, f"{package} reaches a layer it must not:\n" + "\n".join(sorted(set(breaches)))


def test_every_policy_module_is_in_a_stage_or_the_model():
    """A module dropped beside the three packages would be in no stage: the tree must say where it is."""
    loose = [m for m in import_graph() if m.startswith("dinocache.policy.")
             and not any(_within(m, p) for p in (POLICY_MODEL, STAGE_TWO, STAGE_THREE))]
    assert not loose, f"policy modules outside model/training/deployment: {loose}"


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines (split them by job): {long}"
