"""The console's one door: its views import from the engine only what console.services allows.

Every import is read from the source with :mod:`ast`, wherever it stands: at
the top, inside a function, or under ``if TYPE_CHECKING:``. ``from engine
import X`` counts as importing ``engine.X`` when X is a module of the
engine, else as importing the ``engine`` package itself (which re-exports
everything, so it is no door).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import console

CONSOLE = Path(console.__file__).parent
ENGINE = CONSOLE.parent / "engine"

#: What a view may import from the engine; the reasons are in console/services.py's docstring.
ALLOWED = frozenset(
    {
        "engine.operations",
        "engine.queries",
        "engine.errors",
        "engine.states",
        "engine.model",
        "engine.settings",
        "engine.inputs",
    }
)
#: The composition places, which build the engine's objects and so import what they build
#: from; and the CLI's side of the console (its commands build what they run).
EXEMPT = frozenset({"__init__.py", "services.py", "commands.py", "cli.py", "__main__.py"})


#: Libraries behind the engine's store and transport: a view reaches them only through it.
BEHIND_THE_ENGINE = ("sqlalchemy", "redis")


def imported_modules(source: str) -> set[str]:
    """The modules ``source`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update(_from_import(node.module, [alias.name for alias in node.names]))
    return found


def engine_imports(source: str) -> set[str]:
    """The engine modules ``source`` imports, anywhere in it."""
    return {m for m in imported_modules(source) if m == "engine" or m.startswith("engine.")}


def _from_import(module: str, names: list[str]) -> set[str]:
    folder = ENGINE.parent.joinpath(*module.split("."))
    if not folder.is_dir():
        return {module}
    return {
        f"{module}.{name}"
        if (folder / f"{name}.py").is_file() or (folder / name).is_dir()
        else module
        for name in names
    }


def view_modules() -> list[Path]:
    return sorted(p for p in CONSOLE.glob("*.py") if p.name not in EXEMPT)


def test_there_are_views_to_check() -> None:
    names = {p.stem for p in view_modules()}
    assert {"sagas", "bulk", "poison", "errors", "health", "auth"} <= names


@pytest.mark.parametrize("path", view_modules(), ids=lambda p: p.name)
def test_a_view_imports_only_the_allowed_engine_modules(path: Path) -> None:
    outside = engine_imports(path.read_text(encoding="utf-8")) - ALLOWED
    assert not outside, (
        f"console/{path.name} imports {sorted(outside)}; a view imports only "
        f"{sorted(ALLOWED)} from the engine, and takes what else it needs from the "
        "facades in console/services.py"
    )


@pytest.mark.parametrize("path", view_modules(), ids=lambda p: p.name)
def test_a_view_reaches_the_store_and_redis_only_through_the_engine(path: Path) -> None:
    found = imported_modules(path.read_text(encoding="utf-8"))
    below = sorted(m for m in found if m.split(".")[0] in BEHIND_THE_ENGINE)
    assert not below, f"console/{path.name} imports {below}"


def test_imports_inside_functions_and_under_type_checking_count() -> None:
    source = """
from typing import TYPE_CHECKING
from engine import queries, SagaEngine
from engine.operations import Action
import engine.model as model

if TYPE_CHECKING:
    from engine.runtime import SagaEngine

def view():
    from engine.store import DatabaseError
    import engine.transport.redis_streams
"""
    assert engine_imports(source) == {
        "engine",
        "engine.queries",
        "engine.operations",
        "engine.model",
        "engine.runtime",
        "engine.store",
        "engine.transport.redis_streams",
    }
