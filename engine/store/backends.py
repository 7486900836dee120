"""The backends: SQLite and PostgreSQL, each a :class:`Store` with its quirks, and
:func:`open_store`, which picks one from a URL and hands it the metrics.

SQLite takes its write lock up front and needs no row locks; PostgreSQL skips
rows other workers locked when it claims in bulk, and makes a new instance and
a batch of changes one statement each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from engine import metrics
from engine.errors import InvalidInput
from engine.model import Instance, Transition
from engine.store import schema as t
from engine.store.commits import TransitionHook, ignore_transitions
from engine.store.instances import Store
from engine.store.rows import (
    STEP_FIELDS,
    Change,
    batch_conflict,
    batch_events,
    compact_json,
    event_row,
    instance_changes,
    instance_row,
    step_row,
)
from engine.store.urls import normalise_url

log = logging.getLogger(__name__)


class SqliteStore(Store):
    """SQLite: one writer at a time, so claims need no row locks."""

    dialect = "sqlite"

    def _insert_instance(self, c: Connection, row: dict[str, Any]) -> bool:
        # RETURNING, not rowcount: SQLAlchemy does not keep an INSERT's rowcount
        # (psycopg reports -1 once the cursor is closed), so a conflict looked
        # like a success.
        stmt = sqlite_insert(t.instances).values(row).on_conflict_do_nothing()
        return c.execute(stmt.returning(t.instances.c.id)).first() is not None


class PostgresStore(Store):
    """PostgreSQL: bulk claims skip rows other workers have locked, and a new
    instance is inserted with its steps and events in one statement."""

    dialect = "postgresql"

    def __init__(self, db: Engine, *, on_transition: TransitionHook = ignore_transitions) -> None:
        super().__init__(db, on_transition=on_transition)
        # The same pool; a connection taken through it runs each statement as
        # its own transaction, and is set back when returned.
        self._autocommit = db.execution_options(isolation_level="AUTOCOMMIT")

    def _insert_new(self, c: Connection, transition: Transition, actor: str) -> bool:
        # One round trip instead of three: on the inline path this statement
        # and the steps' own writes are all a saga costs before its commit.
        inst = transition.instance
        params = {
            "instance": compact_json(instance_row(inst)),
            "steps": compact_json([step_row(inst.id, s) for s in inst.steps]),
            "events": compact_json(
                [event_row(inst, e, actor, inst.created_at) for e in transition.events]
            ),
        }
        return c.execute(_PG_INSERT_NEW, params).first() is not None

    def _save_batch(self, conn: Connection, changes: Sequence[Change], actor: str) -> None:
        # One statement for the whole batch: a reply listener records dozens of
        # replies per transaction, and a row-by-row executemany made PostgreSQL
        # plan and run some eight statements per reply. Several changes to one
        # instance become one update to its last state, its version moved by
        # their number, since a single UPDATE sees each row once.
        first: dict[str, Instance] = {}
        last: dict[str, Instance] = {}
        moves: dict[str, int] = {}
        for old, transition in changes:
            first.setdefault(old.id, old)
            last[old.id] = transition.instance
            moves[old.id] = moves.get(old.id, 0) + 1
        instances = [
            {
                **instance_changes(new),
                "id": saga_id,
                "b_version": first[saga_id].version,
                "version": first[saga_id].version + moves[saga_id],
            }
            for saga_id, new in last.items()
        ]
        steps = [
            step_row(saga_id, st)
            for saga_id, new in last.items()
            for st, before in zip(new.steps, first[saga_id].steps, strict=True)
            if st != before
        ]
        params = {
            "instances": compact_json(instances),
            "steps": compact_json(steps),
            "events": compact_json(batch_events(changes, actor)),
        }
        done = conn.execute(_PG_SAVE_MANY, params).scalar_one()
        if done != len(instances):
            raise batch_conflict(changes, len(instances) - done)

    @contextmanager
    def _single_statement(self, conn: Connection | None) -> Iterator[Connection]:
        # A new instance is one INSERT statement here, atomic on its own: run in
        # autocommit it saves the BEGIN and the COMMIT, two of the three
        # statements (and round trips) a start costs PostgreSQL.
        if conn is not None:
            yield conn
            return
        with self._autocommit.connect() as c:
            yield c

    def _insert_instance(self, c: Connection, row: dict[str, Any]) -> bool:
        # As SQLite's: RETURNING, not rowcount.
        stmt = pg_insert(t.instances).values(row).on_conflict_do_nothing()
        return c.execute(stmt.returning(t.instances.c.id)).first() is not None

    def _lock_claimable(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=True)


def _populate(
    table: sa.Table,
    source: str,
    skip: tuple[str, ...] = (),
    guard: str = "WHERE EXISTS (SELECT 1 FROM i) ",
) -> str:
    """INSERT the rows of the JSON array ``:source`` into ``table``, in their order."""
    cols = ", ".join(c.name for c in table.columns if c.name not in skip)
    return (
        f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM "
        f"jsonb_populate_recordset(NULL::{table.name}, CAST(:{source} AS jsonb)) "
        f"WITH ORDINALITY AS r {guard}ORDER BY r.ordinality"
    )


_INSTANCE_COLUMNS = ", ".join(c.name for c in t.instances.columns)
_PG_INSERT_NEW = sa.text(
    f"WITH i AS (INSERT INTO saga_instances ({_INSTANCE_COLUMNS}) SELECT {_INSTANCE_COLUMNS} "
    "FROM jsonb_populate_record(NULL::saga_instances, CAST(:instance AS jsonb)) "
    "ON CONFLICT DO NOTHING RETURNING id), "
    f"s AS ({_populate(t.steps, 'steps')}), "
    f"e AS ({_populate(t.events, 'events', skip=('id',))}) "
    "SELECT id FROM i"
)

_CHANGE_TYPES = {"state": "text", "current_step": "integer"} | {
    name: "bigint" for name in ("updated_at", "last_progress_at", "next_run_at")
}
_PG_SAVE_MANY = sa.text(
    "WITH c AS (SELECT * FROM jsonb_to_recordset(CAST(:instances AS jsonb)) AS c(id text, "
    "b_version integer, version integer, "
    + ", ".join(f"{name} {kind}" for name, kind in _CHANGE_TYPES.items())
    + ")), "
    "i AS (UPDATE saga_instances AS x SET version = c.version, stuck_since = NULL, "
    + ", ".join(f"{name} = c.{name}" for name in _CHANGE_TYPES)
    + " FROM c WHERE x.id = c.id AND x.version = c.b_version RETURNING x.id), "
    "s AS (UPDATE saga_steps AS x SET "
    + ", ".join(f"{name} = r.{name}" for name in STEP_FIELDS)
    + " FROM jsonb_populate_recordset(NULL::saga_steps, CAST(:steps AS jsonb)) AS r "
    "WHERE x.saga_id = r.saga_id AND x.step_index = r.step_index), "
    f"e AS ({_populate(t.events, 'events', skip=('id',), guard='')}) "
    "SELECT count(*) FROM i"
)


T = TypeVar("T")


def retry_on_disconnect(work: Callable[[], T], attempts: int = 3) -> T:
    """Run ``work`` (one whole transaction) again when its connection was found dead.

    Pooled connections are not pinged on checkout (a round trip on the hot
    path); a connection PostgreSQL dropped fails its first statement, the
    pool invalidates it, and the transaction, which never committed, is
    simply run again on a fresh one.
    """
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except DBAPIError as exc:
            if not exc.connection_invalidated or attempt == attempts:
                raise
            log.warning("store connection lost (%s); retrying on a fresh one", exc.orig)
    raise AssertionError("unreachable")


def open_store(
    url: str,
    *,
    pool_size: int = 10,
    echo: bool = False,
    on_transition: TransitionHook = metrics.transition_saved,
) -> Store:
    """A store for ``url`` (``sqlite:///file.db`` or ``postgresql://...``).

    ``on_transition`` is told of every transition the store commits; by default
    it counts them for the metrics, so every process that stores transitions
    (an engine, the ``saga`` commands, the console) counts them without wiring.
    """
    url = normalise_url(url)
    if url.startswith("sqlite"):
        return SqliteStore(_sqlite_engine(url, echo), on_transition=on_transition)
    if url.startswith("postgresql"):
        # No pre-ping: it costs a round trip per checkout on the hot path. A
        # connection that died is invalidated by its first failing statement,
        # and the work is retried from the store.
        db = sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size, echo=echo)
        return PostgresStore(db, on_transition=on_transition)
    raise InvalidInput("SAGA_DATABASE_URL", f"{url!r} is neither sqlite:/// nor postgresql://")


def _sqlite_engine(url: str, echo: bool) -> Engine:
    db = sa.create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(db, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN IMMEDIATE
        # below is what starts every transaction.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(db, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the lock up front: a deferred transaction that later
        # upgrades to a write fails with "database is locked" instead of waiting.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return db
