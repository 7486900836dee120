"""The engine objects the views call: operations, queries and users.

The console builds its own :class:`SagaEngine` from the environment (the
store URL and ``SAGA_APP``, the modules that define the sagas, so the
operator actions know each saga's steps), or uses the one passed as
``SAGA_ENGINE`` (tests, and ``saga demo``, which serves the console next
to its own workers).
"""

from __future__ import annotations

import atexit
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from flask import Flask, current_app

from engine.definition import Saga
from engine.errors import InvalidInput
from engine.operations import Operations
from engine.queries import Queries
from engine.runtime import SagaEngine
from engine.settings import Settings
from engine.users import UserStore

_KEY = "saga"


@dataclass(frozen=True)
class Services:
    """What the console needs from the engine."""

    engine: SagaEngine
    queries: Queries
    users: UserStore

    @property
    def operations(self) -> Operations:
        return self.engine.operations


def init_app(app: Flask) -> None:
    """Attach the engine services to ``app`` (``app.extensions['saga']``)."""
    engine = app.config.get("SAGA_ENGINE")
    if engine is None:
        engine = _engine_from_config(app)
        atexit.register(engine.close)
    app.extensions[_KEY] = Services(engine, Queries(engine.store), UserStore(engine.store.db))


def get() -> Services:
    """The services of the current app."""
    found: Services = current_app.extensions[_KEY]
    return found


def load_sagas(modules: Iterable[str]) -> list[Saga]:
    """Import ``modules`` and collect every :class:`Saga` defined at their top level."""
    found: dict[int, Saga] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise InvalidInput("SAGA_APP", f"cannot import {name!r}: {exc}") from exc
        for value in vars(module).values():
            if isinstance(value, Saga):
                found[id(value)] = value
    return list(found.values())


def _engine_from_config(app: Flask) -> SagaEngine:
    settings = Settings.from_env()
    overrides: dict[str, Any] = {}
    if app.config.get("SAGA_DATABASE_URL"):
        overrides["database_url"] = app.config["SAGA_DATABASE_URL"]
    if app.config.get("SAGA_APP") is not None:
        overrides["app"] = tuple(app.config["SAGA_APP"])
    # The console runs no worker; a small pool serves its page requests.
    settings = replace(settings, concurrency=4, **overrides)
    return SagaEngine(load_sagas(settings.app), settings=settings)
