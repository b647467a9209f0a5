"""The layers of service/ and trainers/ import one way (docs/ARCHITECTURE.md), with no cycle and no project import
hidden inside a function; below the CLIs, Ray only in service.orchestration and MLflow only in service.tracking;
`service.run` starts without Ray; no source file over 600 lines. Every import counts: module level, inside
functions, under TYPE_CHECKING, and `from package import module`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Rank of each layer: an import must point to a strictly higher rank (further down), or stay inside its own layer.
RANKS = {"entry": 0, "cli": 1, "orchestration": 2, "benchmarks": 2, "methods": 3, "tracking": 4, "data": 4,
         "base": 5, "trainers": 6}
ENTRY_SHIMS = {f"service.{name}" for name in ("run", "sweep", "final", "ensemble", "encoder", "prepare", "report",
                                              "cluster", "bench", "registry", "predict")}
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
    if len(parts) == 1 or parts[1] in ("process", "storage"):
        return "base"
    return parts[1] if parts[1] in RANKS else None


def is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path, module: str | None = None) -> list[tuple[str, int, str | None]]:
    """(imported module, line, the enclosing function's name or None) for every import statement of a file,
    relative ones resolved."""
    tree = ast.parse(path.read_text())
    module = module or module_name(path)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = []

    def visit(node: ast.AST, in_function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or (getattr(child, "name", "<lambda>") if isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else None)
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
                             if is_module(f"{base}.{alias.name}"))
            visit(child, nested)

    visit(tree, None)
    return found


SOURCES = sorted([*ROOT.glob("service/**/*.py"), *ROOT.glob("trainers/**/*.py")])
EDGES = {module_name(p): [(t, line, inner) for t, line, inner in imports(p) if layer(t) is not None] for p in SOURCES}


def test_every_service_module_has_a_layer():
    assert [m for m in EDGES if layer(m) is None] == []


def deferred_import_allowed(source: str, inner: str, target: str, line: int, first: int | None) -> bool:
    """The one import a CLI defers (#23): `service/cli/<cmd>.py`'s `main` imports the heavy module it runs only once
    its command line is parsed (so --help, --print-config and argument errors answer before torch, MLflow and Ray
    load); one such import statement per CLI (`first`: the line of the first one), of a lower layer."""
    if source == "service.sweep" and inner == "__getattr__":     # what old pickles name, loaded on first use
        return target.startswith("service.orchestration")
    return (layer(source) == "cli" and inner == "main" and first in (None, line) and layer(target) is not None
            and RANKS[layer(target)] > RANKS["cli"])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_not_from_inside_functions(path):
    source = module_name(path)
    wrong = []
    first = None
    for target, line, inner in imports(path):
        lt = layer(target)
        if lt is not None and inner and not deferred_import_allowed(source, inner, target, line, first):
            wrong.append(f"{path.name}:{line} imports {target} inside a function")
        elif lt is not None and inner:
            first = line
        if lt is not None and lt != layer(source) and RANKS[lt] <= RANKS[layer(source)]:
            wrong.append(f"{path.name}:{line}: {source} ({layer(source)}) imports {target} ({lt}): not downward")
        top = target.split(".")[0]
        if top in THIRD_PARTY_HOME and layer(source) not in (THIRD_PARTY_HOME[top], "entry", "cli", "benchmarks"):
            wrong.append(f"{path.name}:{line}: {top} imported outside service.{THIRD_PARTY_HOME[top]}")
    assert wrong == []


def test_no_import_cycle():
    """Tarjan over module -> module edges (module level and function level alike): no component of two or more."""
    # An explicit import of a package (`from service.methods import METHODS`) is an edge to its __init__; the
    # implicit parent import of a submodule is not (the parent has started executing before its child runs).
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
    """The walk itself: function-level and `from package import module` imports of the CLI are found, and refused
    from tracking."""
    bad = tmp_path / "probe.py"
    bad.write_text("def f():\n    from service.cli import run\n\n\nfrom service import cli\n")
    found = imports(bad, "service.tracking.probe")
    assert ("service.cli", 2, "f") in found and ("service.cli.run", 2, "f") in found
    assert ("service.cli", 5, None) in found
    assert RANKS[layer("service.cli")] < RANKS[layer("service.tracking.probe")]
    # The one deferred import a CLI may have: in main, one statement, of a lower layer; nowhere else.
    assert deferred_import_allowed("service.cli.run", "main", "service.orchestration.run", 9, None)
    assert not deferred_import_allowed("service.cli.run", "main", "service.orchestration.sweep", 12, 9)
    assert not deferred_import_allowed("service.cli.run", "build_parser", "service.orchestration.run", 9, None)
    assert not deferred_import_allowed("service.tracking.probe", "main", "service.data.chain", 9, None)
    assert not deferred_import_allowed("service.cli.run", "main", "service.cli.options", 9, None)


def test_service_run_starts_without_ray():
    code = "import sys, service.run, service.final, service.report; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_no_source_file_over_600_lines():
    """service/, trainers/ and the tests themselves (every .py under tests/)."""
    files = [*SOURCES, *sorted(ROOT.glob("tests/**/*.py"))]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


# Below cli/ nothing takes an argparse Namespace: the CLIs turn it into typed, frozen options (service.methods.base:
# RunOptions, SweepOptions, FinalOptions) and a method reads its own flags from a plain mapping (Method.options).
# benchmarks/ are sub-CLIs of `service.bench` that parse their own flags, so they are not below it in that sense.
BELOW_CLI = [p for p in SOURCES if layer(module_name(p)) not in ("entry", "cli", "benchmarks")]


@pytest.mark.parametrize("path", BELOW_CLI, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_below_cli_takes_an_argparse_namespace(path):
    wrong = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                note = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if arg.arg == "args" or "Namespace" in note:
                    wrong.append(f"{path.name}:{node.lineno} {node.name}({arg.arg}: {note or 'untyped'})")
        elif isinstance(node, ast.Attribute) and node.attr == "Namespace":
            wrong.append(f"{path.name}:{node.lineno} uses argparse.Namespace")
    assert wrong == []


def test_each_cli_defers_at_most_one_import_and_only_in_main():
    """The deferred import is what keeps a CLI's start-up light; a second one (or one outside main) is refused."""
    for path in sorted(ROOT.glob("service/cli/*.py")):
        inner = {(line, fn) for t, line, fn in imports(path) if fn and layer(t) is not None}
        assert len(inner) <= 1 and all(fn == "main" for _, fn in inner), (path.name, inner)
