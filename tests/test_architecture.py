"""The house keeps its shape: no import circle (function-level imports counted), imports at the
top (a function-level import says why it waits), no module past 500 lines, the folders are the
stages of docs/architecture.md, and no module outside tasks/ branches on a task's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
STAGES = ["commands", "compose", "data", "models", "rundir", "sweeps", "tasks", "training",
          "weights"]
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def runtime_imports(path: Path) -> list[tuple[ast.stmt, bool]]:
    """Every import a module runs (not those under `if TYPE_CHECKING:`), and whether it is
    inside a function."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    in_function = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                   for n in ast.walk(node)}
    return [(node, id(node) in in_function) for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in typing_only]


def internal_targets(node: ast.stmt) -> list[str]:
    """The finetune modules an import statement loads (a package's __init__ included)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        assert node.level == 0, "finetune imports itself by absolute names"
        base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    found = []
    for name in names:
        parts = name.split(".")
        found += [".".join(parts[:i]) for i in range(2, len(parts) + 1)
                  if ".".join(parts[:i]) in MODULES]
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: {t for node, _ in runtime_imports(path) for t in internal_targets(node)
                   if t != name}
            for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_even_through_a_function() -> None:
    graph = import_graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 200  # the graph is real
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle_hidden_in_a_function() -> None:
    """The check above would see a circle that a function-level import hides."""
    graph = import_graph()
    # override_checks imports schema
    graph["finetune.compose.schema"].add("finetune.compose.override_checks")
    assert ["finetune.compose.override_checks", "finetune.compose.schema"] in cycles(graph)


def test_a_function_level_import_says_why_it_waits() -> None:
    """Imports sit at the top; one inside a function keeps torch (or an optional or slow
    package) off a path that must not pay for it, and a `# lazy:` comment says which."""
    unexplained = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node, in_function in runtime_imports(path):
            if in_function and not any("# lazy:" in lines[i] for i in
                                       (node.lineno - 2, node.lineno - 1) if i >= 0):
                unexplained.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert unexplained == []


def test_no_module_is_past_the_size_that_means_it_owns_two_things() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_the_folders_are_the_stages() -> None:
    """A folder per stage (docs/architecture.md names each); the top level holds the API, the
    front door, the shared leaves and the kept `python -m finetune.X` commands."""
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders == STAGES
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for folder in folders:
        assert f"`{folder}/`" in page, f"docs/architecture.md does not describe {folder}/"
    unnamed = [path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
               if path.name != "__init__.py"
               and f"`{path.relative_to(PACKAGE).as_posix()}`" not in page]
    assert unnamed == [], "docs/architecture.md does not name these modules"


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_no_module_outside_tasks_branches_on_a_task_name(task: str) -> None:
    """A task is a table entry: only finetune/tasks/ (and the schema's default) may name one."""
    quoted = re.compile(rf"[\"']{task}[\"']")
    naming = [f"{path.relative_to(PACKAGE)}:{i}" for path in PACKAGE.rglob("*.py")
              if "tasks" not in path.relative_to(PACKAGE).parts
              for i, line in enumerate(path.read_text().splitlines(), 1)
              if quoted.search(line.split("#", 1)[0])]
    allowed = {"multiclass": ["compose/schema.py"], "multilabel": []}[task]
    assert [n for n in naming if n.split(":")[0] not in allowed] == []
