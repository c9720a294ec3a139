"""The layout rules of docs/architecture.md, read from the source: no import cycles (imports inside
functions included), no module over ~450 lines, the trainer's imports, one home for atomic writes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The pocl modules an import statement of ``module`` loads (a name from a package that is a module
    counts as that module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                package = package.rsplit(".", 1)[0]
            base = package + (f".{node.module}" if node.module else "")
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [n for n in names if n in MODULES and n != module]


def _graph(*, annotations: bool = True) -> dict[str, set[str]]:
    """module -> the pocl modules it imports anywhere (functions included); without ``annotations``,
    imports under ``if TYPE_CHECKING:`` are left out."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip: set[int] = set()
        if not annotations:
            for node in ast.walk(tree):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    skip |= {id(n) for child in node.body for n in ast.walk(child)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                graph[module].update(_imported(module, node))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scan_finds_a_cycle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_lazy_imports_included():
    assert _cycles(_graph()) == []


def test_no_module_over_450_lines():
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > 450} == {}


def test_the_trainer_imports_its_collaborators_only():
    imported = _graph(annotations=False)["pocl.training.trainer"]
    assert imported == {"pocl.launch", "pocl.training.metrics", "pocl.training.onpolicy", "pocl.training.optim",
                        "pocl.training.run_store", "pocl.training.selection", "pocl.training.sharding",
                        "pocl.training.stage_teachers", "pocl.training.stages", "pocl.training.state",
                        "pocl.training.student_loss",
                        "pocl.training.teacher_signal"}


def test_nothing_in_pocl_imports_the_trainer_but_the_entry_points():
    importers = {m for m, deps in _graph().items() if "pocl.training.trainer" in deps}
    assert importers <= {"pocl.training", "pocl.pipeline", "pocl.baselines", "pocl.recipes.builtin_default"}


@pytest.mark.parametrize("pattern", [r"\.write_text\(", r"open\([^)]*['\"]w['\"]", r"json\.dump\("])
def test_every_file_write_goes_through_pocl_artifacts(pattern):
    """Files are written by pocl.artifacts (atomically) or inside a folder that is renamed into place
    complete (the ``write(tmp)`` callbacks of atomic_folder_write)."""
    offenders = []
    for module, path in MODULES.items():
        if module.startswith("pocl.artifacts"):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if re.search(pattern, line) and "tmp" not in line:
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert offenders == []
