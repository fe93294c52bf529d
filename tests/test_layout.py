"""The package layout has an import order, engine <- finetune <- distill, and no module-level import cycles.

Imports are read from the source (including those inside functions), so a cycle hidden by a lazy import fails
too; imports under ``if TYPE_CHECKING:`` (annotations only, never run) are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "finetune", "distill")
#: a package may import only packages to its left
ORDER = {name: i for i, name in enumerate(PACKAGES)}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text())
        typing_only = {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for sub in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            found = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            targets |= {f for f in found if f in modules and f != name}
        graph[name] = targets
    return graph


def test_packages_import_only_lower_layers():
    bad = [
        f"{src} imports {dst}"
        for src, dsts in _imports().items()
        for dst in dsts
        if ORDER[dst.split(".")[0]] > ORDER[src.split(".")[0]]
    ]
    assert not bad, "imports against the order engine <- finetune <- distill:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _imports()
    # a package __init__ that re-exports its own modules is not a cycle: drop edges from a package to its children
    graph = {s: {d for d in ds if not d.startswith(s + ".")} for s, ds in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_cycle_detector_catches_a_lazy_cycle(tmp_path, monkeypatch):
    """The check above must be able to fail: two modules that import each other inside functions."""
    pkg = tmp_path / "distill"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from distill.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from distill.a import f\n")
    for name in ("engine", "finetune"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="distill.a -> distill.b -> distill.a"):
        test_no_import_cycles()
