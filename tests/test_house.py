"""The house stays standing: one direction of imports, SQL in one place, modules of a size to read.

Every import counts, including those inside functions and under TYPE_CHECKING:
they are dependencies too (DESIGN.md, principle 10; ARCHITECTURE.md draws the map).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "console")
MAX_LINES = 600
#: The composition root, and who may build on it: the layers above it.
ROOT_MODULE = "engine.runtime"
ABOVE_THE_ROOT = ("engine.cli", "engine.demo", "engine.loader")
#: The examples are users' code: their participants keep their own tables with SQLAlchemy.
USERS_CODE = "engine.examples"


@dataclass(frozen=True)
class Module:
    name: str
    path: Path

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


@cache
def modules() -> dict[str, Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = Module(name, path)
    return found


def imported_names(module: Module) -> Iterator[str]:
    """Every module name ``module`` imports, absolute, wherever the import statement is."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"))
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            # `from engine import metrics` depends on engine.metrics, not on engine/__init__.
            if not all(sub in modules() for sub in subs):
                yield base
            yield from subs


@cache
def project_edges() -> dict[str, frozenset[str]]:
    """Each project module and the project modules it imports (the most specific one named)."""
    known = modules()
    edges = {}
    for name, module in known.items():
        targets = set()
        for imported in imported_names(module):
            target = imported
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        edges[name] = frozenset(targets)
    return edges


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start, children_of_start in edges.items():
        if start in index:
            continue
        work = [(start, iter(sorted(children_of_start)))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_there_is_no_import_cycle() -> None:
    assert cycles(project_edges()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    # The guard above must be able to fail.
    edges = {
        "a": frozenset({"b"}),
        "b": frozenset({"c"}),
        "c": frozenset({"a"}),
        "d": frozenset({"a"}),
    }
    assert cycles(edges) == [["a", "b", "c"]]


def test_only_the_store_imports_sqlalchemy() -> None:
    outside = sorted(
        name
        for name, module in modules().items()
        if not name.startswith(("engine.store", USERS_CODE))
        and any(n.split(".")[0] == "sqlalchemy" for n in imported_names(module))
    )
    assert outside == []


def test_the_engine_never_imports_the_console() -> None:
    offenders = {
        name: sorted(t for t in targets if t.startswith("console"))
        for name, targets in project_edges().items()
        if name.startswith("engine")
    }
    assert {name: t for name, t in offenders.items() if t} == {}


def test_nothing_below_the_composition_root_imports_it() -> None:
    importers = sorted(
        name
        for name, targets in project_edges().items()
        if ROOT_MODULE in targets and name.startswith("engine")
    )
    below = [n for n in importers if n != "engine" and not n.startswith(ABOVE_THE_ROOT)]
    assert below == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_past_the_size_a_person_reads_at_once(name: str) -> None:
    lines = len(modules()[name].path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it (ARCHITECTURE.md)"
