"""The package's shape, enforced: imports run one way between packages, no import cycle between modules (imports
inside functions counted), no function-level import of taylorprune outside the CLI, no module over 300 lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "taylorprune"
# Each package may import only packages listed before it (and the top-level modules errors/options).
LAYERS = ["errors", "options", "distributed", "modeling", "calib", "evaluate", "export", "stats", "prune", "quantize",
          "recover", "scoring", "pipeline", "report", "cli"]
MAX_LINES = 300


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported taylorprune module, inside a function, line) of every import in ``path``; ``from package import
    name`` counts as the submodule when ``name`` is one."""
    tree = ast.parse(path.read_text())
    inner = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
             for sub in ast.walk(node) if isinstance(sub, ast.Import | ast.ImportFrom)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "taylorprune":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in MODULES else node.module, id(node) in inner, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in inner, node.lineno) for a in node.names
                      if a.name.split(".")[0] == "taylorprune"]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_imports_run_one_way_between_packages():
    bad = []
    for name, path in MODULES.items():
        own = name.split(".")[1] if "." in name else ""
        if own not in LAYERS:
            continue
        for target, _, line in imports(path):
            dep = target.split(".")[1] if "." in target else ""
            if dep in LAYERS and LAYERS.index(dep) > LAYERS.index(own):
                bad.append(f"{name}:{line} imports {target}")
    assert not bad, bad


def test_no_import_cycle_between_modules():
    graph = {m: {t for t, _, _ in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_level_taylorprune_import_outside_the_cli():
    bad = [f"{m}:{line} imports {t}" for m, p in MODULES.items() if not m.startswith("taylorprune.cli")
           for t, inner, line in imports(p) if inner]
    assert not bad, bad


def test_no_module_over_300_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
