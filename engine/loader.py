"""Loading the modules that define sagas, named by ``-A/--app`` or ``SAGA_APP``.

As with Celery's and rq's ``-A``, a name is an importable module path
(``examples.travel_booking``, ``myservice.sagas``); the working directory is
on the import path, so a module next to you is found. Every
:class:`~engine.Saga` among the module's globals is registered.

A module may also define ``init_engine(engine)``: a command that runs steps
in its process (``saga worker``) calls it once with the engine it built, the
way Flask extensions have ``init_app(app)``, so the module's participants can
use the engine's database or settings.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from engine.definition import Saga
from engine.errors import InvalidInput

if TYPE_CHECKING:
    from engine.runtime import SagaEngine

#: The optional module-level hook called with the engine once it is built.
INIT_HOOK = "init_engine"


@dataclass(frozen=True)
class AppModules:
    """The modules named on the command line and the sagas they define."""

    modules: tuple[ModuleType, ...] = ()
    sagas: tuple[Saga, ...] = ()

    def init(self, engine: SagaEngine) -> None:
        """Call each module's ``init_engine(engine)``, where it has one."""
        for module in self.modules:
            hook = getattr(module, INIT_HOOK, None)
            if callable(hook):
                hook(engine)


def split_names(values: Iterable[str]) -> tuple[str, ...]:
    """Module names from repeated and/or comma-separated values, in order, once each."""
    names: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip()
            if name and name not in names:
                names.append(name)
    return tuple(names)


def load_app(names: Iterable[str]) -> AppModules:
    """Import each module and collect its sagas; a module without one is an error."""
    modules = tuple(import_module(name) for name in split_names(names))
    sagas: list[Saga] = []
    for module in modules:
        found = sagas_in(module)
        if not found:
            raise InvalidInput(
                "--app", f"module {module.__name__!r} defines no Saga at module level"
            )
        sagas.extend(s for s in found if all(s is not known for known in sagas))
    return AppModules(modules, tuple(sagas))


def sagas_in(module: ModuleType) -> list[Saga]:
    """The :class:`Saga` objects among ``module``'s globals, each once."""
    found: list[Saga] = []
    for value in vars(module).values():
        if isinstance(value, Saga) and all(value is not known for known in found):
            found.append(value)
    return found


def import_module(name: str) -> ModuleType:
    """Import ``name``, turning "no such module" into a message that says what to check."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only a missing module named on the command line is the user's typo;
        # a missing dependency inside it is reported as what it is.
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise InvalidInput(
                "--app",
                f"no module named {name!r} (run from the directory that holds it, "
                "or put it on PYTHONPATH)",
            ) from exc
        raise InvalidInput("--app", f"importing {name!r} failed: {exc}") from exc
