"""The 'no engine' floor: the saga's SQL with nothing around it.

success:      3 idempotent INSERTs (hotel, flight, car), each its own
              autocommitted transaction.
compensating: hotel and flight INSERTs, then the car step inserts inside a
              transaction and fails (rolled back, as a failing saga step is),
              then 2 compensating DELETEs in reverse order (flight, hotel).

Whatever an engine adds on top of this is its overhead.  Prints one JSON line
(see bench/README.md).  Run with any Python that has psycopg 3, e.g.
``/work/main/.venv/bin/python bench/floor.py``.
"""

from __future__ import annotations

import argparse
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

import psycopg
from harness import Plan, Scenario, add_plan_args, emit, plan_from_args, variant_document
from pgutil import (
    check_compensated,
    check_success,
    conninfo,
    create_participant_tables,
    participant_counts,
    recreate_database,
    server_version,
    truncate_participants,
)

DBNAME = "bench_floor"

INSERT_SQL = {
    t: f"INSERT INTO {t} (idem_key, saga) VALUES (%s, %s) ON CONFLICT (idem_key) DO NOTHING"
    for t in ("hotel", "flight", "car")
}
DELETE_SQL = {t: f"DELETE FROM {t} WHERE idem_key = %s" for t in ("hotel", "flight")}


class StepFailedError(Exception):
    """The simulated business failure of the third saga step."""


class ConnectionPool:
    """Autocommit connections handed out one per in-flight saga.

    A caller holds its connection for the whole saga, which is what 'one
    connection per thread' costs, without tying connections to thread objects
    that the harness recreates for every phase.
    """

    def __init__(self, dbname: str) -> None:
        self._dbname = dbname
        self._idle: queue.LifoQueue[psycopg.Connection] = queue.LifoQueue()
        self._all: list[psycopg.Connection] = []
        self._lock = threading.Lock()

    def _open(self) -> psycopg.Connection:
        conn = psycopg.connect(conninfo(self._dbname), autocommit=True)
        with self._lock:
            self._all.append(conn)
        return conn

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """Borrow an idle connection, opening a new one only if none is idle."""
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._open()
        try:
            yield conn
        finally:
            self._idle.put(conn)

    def close(self) -> None:
        """Close every connection ever opened."""
        for conn in self._all:
            conn.close()


def make_sagas(pool: ConnectionPool, run_id: str) -> tuple[Scenario, Scenario]:
    """Build the success and compensating scenarios over ``pool``."""

    def success(i: int) -> None:
        key = f"{run_id}-{i}"
        with pool.connection() as conn:
            for table in ("hotel", "flight", "car"):
                conn.execute(INSERT_SQL[table], (key, i))

    def compensating(i: int) -> None:
        key = f"{run_id}-{i}"
        with pool.connection() as conn:
            conn.execute(INSERT_SQL["hotel"], (key, i))
            conn.execute(INSERT_SQL["flight"], (key, i))
            try:
                # The failing step does its work and then fails, so its
                # transaction rolls back: same shape as a failing engine step.
                with conn.transaction():
                    conn.execute(INSERT_SQL["car"], (key, i))
                    raise StepFailedError("car unavailable")
            except StepFailedError:
                conn.execute(DELETE_SQL["flight"], (key,))
                conn.execute(DELETE_SQL["hotel"], (key,))

    def reset() -> None:
        truncate_participants(DBNAME)

    return (
        Scenario(success, reset, lambda: _verify(check_success)),
        Scenario(compensating, reset, lambda: _verify(check_compensated)),
    )


def _verify(check: Callable[[dict[str, int]], bool]) -> dict[str, Any]:
    """Table counts after a scenario, and whether they match its expected end state."""
    counts = participant_counts(DBNAME)
    return {"ok": check(counts), "counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_args(parser)
    plan: Plan = plan_from_args(parser.parse_args())

    recreate_database(DBNAME)
    create_participant_tables(DBNAME)
    pool = ConnectionPool(DBNAME)
    success, compensating = make_sagas(pool, uuid.uuid4().hex[:8])
    meta = {
        "description": "3 autocommitted idempotent INSERTs via psycopg, no engine",
        "psycopg": version("psycopg"),
        "postgres": server_version(),
        "database": DBNAME,
    }
    try:
        doc = variant_document(
            "floor", plan, {"success": success, "compensating": compensating}, meta
        )
    finally:
        pool.close()
    emit(doc)


if __name__ == "__main__":
    main()
