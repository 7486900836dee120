"""The idempotency guard participants put around their effects.

A step may run more than once (a worker died after the participant acted
but before the engine stored the result). The guard keeps one row per key:
the first call inserts it, runs the effect and stores its result in the
same transaction; any later call with that key finds the row, counts a
duplicate, and returns the stored result without running the effect.

Because the key row and the effect commit together, the effect happens once
when it writes to the same database as the guard. For effects elsewhere (an
HTTP call), pass the key on so the remote side can deduplicate too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.engine import Engine as SAEngine

from engine import metrics
from engine.model import now_ms
from engine.store import schema as t

T = TypeVar("T")


class IdempotencyGuard:
    """Runs an effect once per key; ``scope`` names the participant in the key table."""

    def __init__(self, db: SAEngine, scope: str) -> None:
        self.db = db
        self.scope = scope

    def run_once(self, key: str, effect: Callable[[Connection], T]) -> T:
        """Run ``effect(conn)`` inside a transaction unless ``key`` was seen; return its result."""
        with self.db.begin() as conn:
            return self.run_once_in(conn, key, effect)

    def run_once_in(self, conn: Connection, key: str, effect: Callable[[Connection], T]) -> T:
        """As :meth:`run_once`, inside the caller's transaction (a transactional step)."""
        if self._claim(conn, key):
            result = effect(conn)
            if result is not None:  # the claimed row's result is NULL already: a statement saved
                conn.execute(_STORE_RESULT, {"b_key": key, "result": _jsonable(result)})
            return result
        replayed: T = self._replay(conn, key)
        return replayed

    def seen(self, key: str) -> bool:
        with self.db.connect() as conn:
            found = conn.execute(
                sa.select(t.idempotency_keys.c.key).where(t.idempotency_keys.c.key == key)
            ).first()
            return found is not None

    def duplicates(self, key: str) -> int:
        """How many repeated calls with ``key`` the guard absorbed."""
        with self.db.connect() as conn:
            count = conn.execute(
                sa.select(t.idempotency_keys.c.duplicates).where(t.idempotency_keys.c.key == key)
            ).scalar()
            return int(count or 0)

    def _claim(self, conn: Connection, key: str) -> bool:
        # Insert first: a concurrent duplicate blocks on the uncommitted row
        # (PostgreSQL) or on the database lock (SQLite) until the first
        # caller commits, then sees the conflict and replays its result.
        dialect = conn.dialect.name
        if dialect not in _CLAIM:  # pragma: no cover - only the two stores are supported
            raise NotImplementedError(dialect)
        row = {"key": key, "scope": self.scope, "created_at": now_ms(), "duplicates": 0}
        # RETURNING, not rowcount: an INSERT's rowcount is not kept by SQLAlchemy
        # (psycopg reports -1), which made every key look new on PostgreSQL.
        return conn.execute(_CLAIM[dialect], row).first() is not None

    def _replay(self, conn: Connection, key: str) -> Any:
        metrics.duplicate_absorbed(self.scope)
        table = t.idempotency_keys
        conn.execute(
            table.update().where(table.c.key == key).values(duplicates=table.c.duplicates + 1)
        )
        return conn.execute(sa.select(table.c.result).where(table.c.key == key)).scalar()


def _claim_statements() -> dict[str, Any]:
    # Built once: a participant runs these for every command, and building a
    # statement costs more CPU than running it.
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    table = t.idempotency_keys
    return {
        "postgresql": pg_insert(table).on_conflict_do_nothing().returning(table.c.key),
        "sqlite": sqlite_insert(table).on_conflict_do_nothing().returning(table.c.key),
    }


_CLAIM = _claim_statements()
_STORE_RESULT = (
    t.idempotency_keys.update()
    .where(t.idempotency_keys.c.key == sa.bindparam("b_key"))
    .values(result=sa.bindparam("result"))
)


def _jsonable(value: Any) -> Any:
    json.dumps(value)  # fail loudly, inside the transaction, on a result that is not JSON
    return value
