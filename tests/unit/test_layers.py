"""The import graph of the tree: one namespace, layers that only point down, no circles.

Read from the source (every import, also those inside functions), so a lazy import cannot hide an
arrow. Layers: ``models`` at the bottom; ``searcher`` and ``server`` on it; ``loadtest`` talks to a
server over HTTP and reads only the torch-free shared modules of ``models``; ``slimserve.cli`` (the
composition root) may import everything and nothing imports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("models", "searcher", "server", "loadtest")
# What each part may import from the others (a module prefix, or a whole part).
ALLOWED = {
    "models": (),
    "searcher": ("slimserve.models",),
    "server": ("slimserve.models",),
    "loadtest": ("slimserve.models.schema", "slimserve.models.idx"),
}
TORCH_FREE = (
    "slimserve.models.schema",
    "slimserve.models.idx",
    "slimserve.loadtest.locustfile",
    "slimserve.loadtest.compare",
)

pytestmark = pytest.mark.unit


def _modules() -> dict[str, Path]:
    found = {"slimserve.cli": ROOT / "slimserve" / "cli.py"}
    for part in PARTS:
        for path in sorted((ROOT / part).rglob("*.py")):
            name = ".".join(("slimserve", *path.relative_to(ROOT).with_suffix("").parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(source: str) -> Iterator[str]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target in _imports(path.read_text()) if target in modules and target != name}
        for name, path in modules.items()
    }


def _part(module: str) -> str:
    return module.split(".")[1] if module != "slimserve.cli" else "cli"


def test_every_module_imports_the_project_through_the_slimserve_namespace() -> None:
    bare = [
        f"{path.relative_to(ROOT)}: {target}"
        for path in _modules().values()
        for target in _imports(path.read_text())
        if target.split(".")[0] in PARTS
    ]
    assert bare == []


def test_no_arrow_points_up_or_sideways() -> None:
    wrong = []
    for module, targets in _graph().items():
        if module == "slimserve.cli":
            continue
        for target in targets:
            if target == "slimserve.cli":
                wrong.append(f"{module} -> {target} (the composition root)")
            elif _part(target) != _part(module) and not target.startswith(ALLOWED[_part(module)]):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_module_graph_has_no_circles() -> None:
    graph = _graph()
    state: dict[str, str] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_an_import_inside_a_function_counts() -> None:
    source = "def f():\n    from slimserve.models import bundle\n    import slimserve.server.app\n"
    assert list(_imports(source)) == ["slimserve.models", "slimserve.models.bundle", "slimserve.server.app"]


def test_the_shared_schema_and_the_load_generator_do_not_import_torch() -> None:
    code = f"import sys; import {', '.join(TORCH_FREE)}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"
