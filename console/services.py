"""The console's one door to the engine: every engine object the views call, built once.

:func:`init_app` (from ``create_app``) builds :class:`Services` when the app
starts and keeps it in ``app.extensions['saga']``; a view reaches it with
:func:`get`. The engine is the console's own, built from the environment
(the store URL and ``SAGA_APP``, the modules that define the sagas, so the
operator actions know each saga's steps), or the one passed as
``SAGA_ENGINE`` (tests, and ``saga demo``, which serves the console next to
its own workers).

Which engine modules the console imports
----------------------------------------
Engine objects are built in two places only: here, and in the app factory
(``console/__init__.py``), which calls :func:`init_app`. They import what they
build from. ``console/commands.py``, the CLI's side of the console, builds
what its commands run and is outside this rule. Every other console module,
the views and their helpers, imports from the engine only:

- :mod:`engine.operations`: the writes, and the words they take (``Action``,
  ``AUDIT_ACTIONS``, ``MAX_REASON``, the input checks);
- :mod:`engine.queries`: the reads, and the records they return
  (``InstanceFilter``, ``EventRecord``, ``OpenWait``...);
- :mod:`engine.errors`: what a view catches, and what the error pages map to a status;
- :mod:`engine.states` and :mod:`engine.model`: the pure vocabulary of
  instances, steps and events that the pages show;
- :mod:`engine.settings`: the engine's settings;
- :mod:`engine.inputs`: the checks every value from a URL or a form passes at
  the door (text the store can keep, lengths, ASCII-digit numbers in a range);

and takes the facades below, and their own types, from this module: ``Role``,
``User``, ``UserStore`` and the password limits (users); the bulk records and
limits; ``Saga`` (the definitions the engine's registry holds);
``PoisonRecord``; ``CHOREOGRAPHED`` (the kind of a tracked choreography);
:func:`visible`, the engine's one way of showing untrusted text with its control
and bidirectional characters escaped (:mod:`engine.display`); and
``DatabaseError``, the store failure the console answers with 503, so that no
view imports SQLAlchemy. ``tests/console/test_console_imports.py`` keeps this
true.
"""

from __future__ import annotations

import atexit
import importlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from flask import Flask, current_app

from engine import metrics, signals
from engine.bulk.model import (
    MAX_BATCH,
    MAX_BULK_REASON,
    MAX_ITEMS,
    MAX_RATE,
    MIN_RATE,
    MIN_SAMPLE,
    BulkFilter,
    BulkNotFound,
    BulkOperation,
    DryRun,
    ItemOutcome,
    ItemPage,
    SelectionChanged,
    SnapshotGone,
)
from engine.bulk.recovery import BulkRecovery
from engine.choreography.declaration import CHOREOGRAPHED
from engine.choreography.handlers import EventBus, choreographies_in
from engine.choreography.operations import ChoreographyOperations
from engine.definition import Saga
from engine.display import visible
from engine.errors import InvalidInput
from engine.loader import import_module
from engine.model import Instance
from engine.operations import Operations
from engine.origins import Origin
from engine.queries import OpenWait, Queries
from engine.runtime import SagaEngine
from engine.settings import Settings
from engine.signals import Delivered
from engine.store import DatabaseError
from engine.transport.commands import CommandBus
from engine.transport.event_log import event_log_from_settings
from engine.transport.redis_doorbells import FIELD, is_saga_id
from engine.transport.redis_streams import RedisStreams
from engine.transport.streams import PoisonRecord
from engine.users import MAX_PASSWORD, MIN_PASSWORD, Role, User, UserStore

__all__ = [
    "CHOREOGRAPHED",
    "MAX_BATCH",
    "MAX_BULK_REASON",
    "MAX_ITEMS",
    "MAX_PASSWORD",
    "MAX_RATE",
    "MIN_PASSWORD",
    "MIN_RATE",
    "MIN_SAMPLE",
    "Bulk",
    "BulkFilter",
    "BulkNotFound",
    "BulkOperation",
    "DatabaseError",
    "DryRun",
    "ItemOutcome",
    "ItemPage",
    "Metrics",
    "PoisonReader",
    "PoisonRecord",
    "Role",
    "Saga",
    "SelectionChanged",
    "Services",
    "Signals",
    "SnapshotGone",
    "User",
    "UserStore",
    "build",
    "get",
    "init_app",
    "load_sagas",
    "visible",
]

_KEY = "saga"


@dataclass(frozen=True)
class Signals:
    """Signals to waiting steps (:mod:`engine.signals`), as an operator sends them."""

    engine: SagaEngine

    def open_waits(self, inst: Instance) -> list[OpenWait]:
        """The waits of ``inst`` that would take a signal now, in step order."""
        return signals.open_waits(self.engine.collaborators, inst)

    def open_wait(self, inst: Instance, event: str) -> OpenWait:
        """The wait for ``event``; the InvalidTransition sending it would raise, if any."""
        return signals.open_wait(self.engine.collaborators, inst, event)

    def send(
        self,
        saga_id: str,
        event: str,
        data: Any,
        *,
        sent_by: str,
        reason: str,
        expected_version: int,
        origin: Origin,
    ) -> Delivered:
        """Deliver ``event`` with ``data`` as ``sent_by``, audited with ``reason`` and
        ``origin`` (the console, and who is signed in)."""
        return self.engine.signal(
            saga_id,
            event,
            data,
            sent_by=sent_by,
            reason=reason,
            expected_version=expected_version,
            origin=origin,
        )


class Bulk(BulkRecovery):
    """Bulk recovery on the app's engine, keeping the runner threads it starts.

    A runner runs in a background thread of this console process (tests join
    :attr:`runner_threads`); the operations and their items are read from the store.
    """

    def __init__(self, engine: SagaEngine) -> None:
        super().__init__(engine.collaborators)
        self.runner_threads: list[threading.Thread] = []

    def spawn(self, operation_id: str) -> threading.Thread:
        thread = super().spawn(operation_id)
        self.runner_threads.append(thread)
        return thread

    def recent(self, limit: int, before: str | None = None) -> list[BulkOperation]:
        """Operations, newest first; ``before`` is the last id of the previous page."""
        return self.store.recent(limit=limit, before=before)

    def items(
        self, operation_id: str, *, outcome: ItemOutcome | None, after: int, limit: int
    ) -> ItemPage:
        """The operation's items in processing order, from ``after``, of one outcome or all."""
        return self.store.items(operation_id, outcome=outcome, after=after, limit=limit)


class PoisonReader:
    """The entries that readers on Redis set aside on ``<prefix>:poison``, read-only.

    The in-process bus keeps what it sets aside in the reading process's memory
    only: then there is no stream to read, and :attr:`stream` is None.
    """

    def __init__(self, bus: CommandBus) -> None:
        self._bus = bus if isinstance(bus, RedisStreams) else None

    @property
    def stream(self) -> str | None:
        """The poison stream's key; None without Redis."""
        return self._bus.poison_stream if self._bus is not None else None

    def newest(self, limit: int) -> list[PoisonRecord]:
        """The newest ``limit`` records, newest first; TransportError when Redis fails."""
        return self._bus.poison_records(limit) if self._bus is not None else []

    @staticmethod
    def saga_id(record: PoisonRecord) -> str | None:
        """The saga the entry names in its ``saga_id`` field, when it has a saga id's shape."""
        text = record.fields.get(FIELD, b"").decode("utf-8", "replace")
        return text if is_saga_id(text) else None


@dataclass(frozen=True)
class Metrics:
    """What ``/metrics`` answers: the store's gauges, computed at each scrape."""

    collector: metrics.StoreCollector
    #: The bearer token a scrape must present (``SAGA_METRICS_TOKEN``); None: none needed.
    token: str | None

    def exposition(self) -> bytes:
        """One scrape, in the Prometheus text format."""
        return metrics.exposition(self.collector)


@dataclass(frozen=True)
class Services:
    """What the console needs from the engine, built once when the app starts."""

    engine: SagaEngine
    operations: Operations
    queries: Queries
    users: UserStore
    signals: Signals
    choreography: ChoreographyOperations
    bulk: Bulk
    poison: PoisonReader
    metrics: Metrics


def init_app(app: Flask) -> None:
    """Attach the engine services to ``app`` (``app.extensions['saga']``).

    ``SAGA_ENGINE`` and ``SAGA_CHOREOGRAPHY_OPERATIONS`` in the config are used
    as given (tests); the rest is built here.
    """
    engine = app.config.get("SAGA_ENGINE")
    if engine is None:
        engine = _engine_from_config(app)
        atexit.register(engine.close)
    app.extensions[_KEY] = build(engine, app.config.get("SAGA_CHOREOGRAPHY_OPERATIONS"))


def build(engine: SagaEngine, choreography: ChoreographyOperations | None = None) -> Services:
    """The services on ``engine``; ``choreography`` as given, or built from its settings."""
    if choreography is None:
        choreography = _choreography_operations(engine)
    return Services(
        engine=engine,
        operations=engine.operations,
        queries=Queries(engine.store),
        users=UserStore(engine.store.db),
        signals=Signals(engine),
        choreography=choreography,
        bulk=Bulk(engine),
        poison=PoisonReader(engine.bus),
        metrics=Metrics(
            metrics.StoreCollector(engine.store, engine.registry.names, engine.clock),
            engine.settings.metrics_token,
        ),
    )


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


def _choreography_operations(engine: SagaEngine) -> ChoreographyOperations:
    """On the engine's store, publishing on the event bus its settings name, for the
    choreographies that the ``SAGA_APP`` modules declare."""
    modules = [import_module(name) for name in engine.settings.app]
    declared = [c for m in modules for c in choreographies_in(m)]
    return ChoreographyOperations(
        engine.store, EventBus(event_log_from_settings(engine.settings)), declared
    )
