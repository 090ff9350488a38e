"""The package layout stays as DESIGN.md draws it: data flows one way (v0_data -> v0_model -> v05_rl ->
pipelines), no import cycles between modules, no project module imported from a string outside the CLI's
lazy command table, no private name imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["v0_data", "v0_model", "v05_rl", "pipelines"]  # a package may import only those before it


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) of every import statement, relative imports resolved."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _project_target(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_dependencies_point_downwards():
    bad = []
    for mod, path in MODULES.items():
        layer = LAYERS.index(mod.split(".")[0])
        for target, _ in _imports(path):
            top = target.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > layer:
                bad.append(f"{mod} imports {target}")
    assert not bad, "imports against the data flow v0_data -> v0_model -> v05_rl -> pipelines:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for target, names in _imports(path):
            if _project_target(target) and _project_target(target) != mod:
                bad += [f"{mod}: from {target} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_project_module_loaded_from_a_string():
    allowed = {"pipelines.cli"}  # the lazy command table
    bad = [mod for mod, path in MODULES.items() if mod not in allowed and "import_module(" in path.read_text()]
    assert not bad, f"importlib.import_module outside the CLI table: {bad}"


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module-level imports only: a lazy import inside a function cannot cycle at import
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                t = _project_target(n)
                if t and t != mod and not mod.startswith(t + "."):  # a package's __init__ importing its children is fine
                    graph[mod].add(t)
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for t in graph[m]:
            if t.startswith(m + "."):
                continue
            if seen.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in seen:
                visit(t)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
