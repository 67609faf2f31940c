"""The shape of the package: no import circle (not even one for annotations only), every module
and function short enough to read, and a public API whose every name exists."""

from __future__ import annotations

import ast
from pathlib import Path

import carprune as cp

PACKAGE = Path(cp.__file__).parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The carprune modules `name` imports anywhere in its file (in functions too, and under
    TYPE_CHECKING): `from .x import y` is module x.y when that is a module, else x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("carprune"):
            out.add(node.module)
    return out - {name}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], found = 1, None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_circles():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    assert graph["carprune.car.greedy"] >= {"carprune.car.run", "carprune.scoring.rule"}
    assert "carprune.scoring.sets" in graph["carprune.scoring.rule"]
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_modules_and_functions_fit_a_screen():
    long_modules, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                    and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long_functions.append(f"{name}.{node.name}")
    assert long_modules == [] and long_functions == []


def test_every_public_name_exists():
    assert len(cp.__all__) == len(set(cp.__all__))
    assert [n for n in cp.__all__ if not hasattr(cp, n)] == []
    assert {"car_prune", "global_car_prune", "Approximation", "Budget", "EngineOptions",
            "Resume", "PruneResult", "CARImportance", "class_importance", "Surgery", "Unit",
            "Block", "data", "models", "interpret"} <= set(cp.__all__)
