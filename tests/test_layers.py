"""The layers of service/ and trainers/ import one way (docs/ARCHITECTURE.md), with no cycle and no project import
hidden inside a function; Ray only in service.orchestration, MLflow only in service.tracking; no file over 600
lines. Every import counts: module level, inside functions, under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Rank of each layer: an import must point to a strictly higher rank (further down), or stay inside its own layer.
RANKS = {"entry": 0, "cli": 1, "orchestration": 2, "benchmarks": 2, "methods": 3, "tracking": 4, "data": 4,
         "base": 5, "trainers": 6}
ENTRY_SHIMS = {f"service.{name}" for name in ("run", "sweep", "final", "ensemble", "encoder", "prepare", "report",
                                              "cluster", "bench", "registry")}
THIRD_PARTY_HOME = {"ray": "orchestration", "mlflow": "tracking"}
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str | None:
    if module in ENTRY_SHIMS:
        return "entry"
    if module.startswith("trainers"):
        return "trainers"
    parts = module.split(".")
    if parts[0] != "service":
        return None
    if len(parts) == 1 or parts[1] == "process":
        return "base"
    return parts[1] if parts[1] in RANKS else None


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of a file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append((base, child.lineno, in_function))
                # `from service import sweep`: the submodule is the target
                found.extend((f"{base}.{alias.name}", child.lineno, in_function) for alias in child.names
                             if (ROOT / Path(*f"{base}.{alias.name}".split("."))).with_suffix(".py").is_file())
            visit(child, nested)

    visit(tree, False)
    return found


SOURCES = sorted([*ROOT.glob("service/**/*.py"), *ROOT.glob("trainers/**/*.py")])
EDGES = {module_name(p): [(t, line, inner) for t, line, inner in imports(p) if layer(t) is not None] for p in SOURCES}


def test_every_service_module_has_a_layer():
    assert [m for m in EDGES if layer(m) is None] == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_not_from_inside_functions(path):
    source = module_name(path)
    wrong = []
    for target, line, inner in imports(path):
        lt = layer(target)
        if lt is not None and inner:
            wrong.append(f"{path.name}:{line} imports {target} inside a function")
        if lt is not None and lt != layer(source) and RANKS[lt] <= RANKS[layer(source)]:
            wrong.append(f"{path.name}:{line}: {source} ({layer(source)}) imports {target} ({lt}): not downward")
        top = target.split(".")[0]
        if top in THIRD_PARTY_HOME and layer(source) not in (THIRD_PARTY_HOME[top], "entry", "cli", "benchmarks"):
            wrong.append(f"{path.name}:{line}: {top} imported outside service.{THIRD_PARTY_HOME[top]}")
    assert wrong == []


def test_no_import_cycle():
    """Tarjan over module -> module edges (module level and function level alike): no component of two or more."""
    graph = {m: sorted({t for t, _, _ in edges if t in EDGES and t != m}) for m, edges in EDGES.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert cycles == []


def test_the_layer_check_sees_a_backward_import(tmp_path):
    """The walk itself: a function-level import of the CLI from tracking is found and refused."""
    bad = ROOT / "service" / "tracking" / "_probe_backward.py"
    bad.write_text("def f():\n    from service.cli import run\n")
    try:
        found = imports(bad)
    finally:
        bad.unlink()
    assert ("service.cli", 2, True) in found
    assert RANKS[layer("service.cli")] < RANKS[layer("service.tracking._probe_backward")]


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
