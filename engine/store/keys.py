"""The idempotency guard's key rows (``saga_idempotency_keys``), in the database of
the participant that keeps them: one row per key, holding the effect's result
and how many duplicates the guard absorbed. A row with ``fenced_at`` was written
by a compensation for an action that had not run: that action is refused.

:class:`~engine.idempotency.IdempotencyGuard` is the public face; this is its SQL.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from engine.errors import ActionFenced
from engine.model import now_ms
from engine.store import commits
from engine.store import schema as t

_KEYS = t.idempotency_keys
# Built once: a participant runs these for every command, and building a
# statement costs more CPU than running it.
_CLAIM = {
    "postgresql": pg_insert(_KEYS).on_conflict_do_nothing().returning(_KEYS.c.key),
    "sqlite": sqlite_insert(_KEYS).on_conflict_do_nothing().returning(_KEYS.c.key),
}
_FENCE = _CLAIM  # the same statement: a row for the key unless one is there
_STORE_RESULT = (
    _KEYS.update().where(_KEYS.c.key == sa.bindparam("b_key")).values(result=sa.bindparam("result"))
)


class IdempotencyKeys:
    """The key rows in ``db``: claimed, given their result, replayed, counted."""

    def __init__(self, db: Engine) -> None:
        self.db = db

    def transaction(self) -> AbstractContextManager[Connection]:
        """A transaction whose :func:`~engine.store.commits.after_commit` work waits for it."""
        return commits.transaction(self.db)

    def claim(self, conn: Connection, key: str, scope: str) -> bool:
        """Insert the row of ``key``; False when it is there already (a duplicate)."""
        # Insert first: a concurrent duplicate blocks on the uncommitted row
        # (PostgreSQL) or on the database lock (SQLite) until the first
        # caller commits, then sees the conflict and replays its result.
        dialect = conn.dialect.name
        if dialect not in _CLAIM:  # pragma: no cover - only the two stores are supported
            raise NotImplementedError(dialect)
        row = {"key": key, "scope": scope, "created_at": now_ms(), "duplicates": 0}
        # RETURNING, not rowcount: an INSERT's rowcount is not kept by SQLAlchemy
        # (psycopg reports -1), which made every key look new on PostgreSQL.
        return conn.execute(_CLAIM[dialect], row).first() is not None

    def store_result(self, conn: Connection, key: str, result: Any) -> None:
        """Keep the effect's ``result`` (JSON) on the row of ``key``."""
        json.dumps(result)  # fail loudly, inside the transaction, on a result that is not JSON
        conn.execute(_STORE_RESULT, {"b_key": key, "result": result})

    def replay(self, conn: Connection, key: str) -> Any:
        """Count a duplicate on the row of ``key`` and return the result it keeps.

        Raises :class:`~engine.errors.ActionFenced`, counting nothing, when the row
        is a fence: the compensation of this action's step ran before it.
        """
        found = conn.execute(
            sa.select(_KEYS.c.result, _KEYS.c.fenced_at).where(_KEYS.c.key == key)
        ).one()
        if found.fenced_at is not None:
            raise ActionFenced(key, found.fenced_at)
        conn.execute(
            _KEYS.update().where(_KEYS.c.key == key).values(duplicates=_KEYS.c.duplicates + 1)
        )
        return found.result

    def fence(self, conn: Connection, action_key: str, scope: str) -> bool:
        """Write the row of ``action_key`` as a fence, unless the action ran (or is running:
        its uncommitted row makes this wait for it). True when the fence was written."""
        row = {
            "key": action_key,
            "scope": scope,
            "created_at": now_ms(),
            "duplicates": 0,
            "fenced_at": now_ms(),
        }
        return conn.execute(_FENCE[conn.dialect.name], row).first() is not None

    def seen(self, key: str) -> bool:
        with self.db.connect() as conn:
            found = conn.execute(sa.select(_KEYS.c.key).where(_KEYS.c.key == key)).first()
            return found is not None

    def duplicates(self, key: str) -> int:
        """How many repeated calls with ``key`` the guard absorbed."""
        with self.db.connect() as conn:
            count = conn.execute(sa.select(_KEYS.c.duplicates).where(_KEYS.c.key == key)).scalar()
            return int(count or 0)
