"""Small PostgreSQL helpers shared by the benchmark variants (needs psycopg 3).

Connection settings come from BENCH_PG_HOST / BENCH_PG_PORT / BENCH_PG_USER
(defaults 127.0.0.1:5432, user postgres, trust auth).  Only databases named
``bench_*`` are ever created or dropped here.
"""

from __future__ import annotations

import os

import psycopg
from psycopg import sql

HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
USER = os.environ.get("BENCH_PG_USER", "postgres")

# The saga's participant tables, in forward step order.
PARTICIPANTS = ("hotel", "flight", "car")


def conninfo(dbname: str) -> str:
    """libpq conninfo string for ``dbname`` on the benchmark server."""
    return f"host={HOST} port={PORT} user={USER} dbname={dbname}"


def sqlalchemy_url(dbname: str) -> str:
    """SQLAlchemy URL (psycopg 3 driver) for ``dbname`` on the benchmark server."""
    return f"postgresql+psycopg://{USER}@{HOST}:{PORT}/{dbname}"


def _check_bench_name(dbname: str) -> None:
    # Guard rail: this code drops databases, so it may only touch its own.
    if not dbname.startswith("bench_"):
        raise ValueError(f"refusing to manage non-benchmark database {dbname!r}")


def recreate_database(dbname: str) -> None:
    """Drop (forcing off stale sessions) and create ``dbname`` so every run starts clean."""
    _check_bench_name(dbname)
    with psycopg.connect(conninfo("postgres"), autocommit=True) as conn:
        ident = sql.Identifier(dbname)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))


def create_participant_tables(dbname: str) -> None:
    """Create hotel/flight/car, each keyed by a unique idempotency key."""
    with psycopg.connect(conninfo(dbname), autocommit=True) as conn:
        for table in PARTICIPANTS:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " idem_key text PRIMARY KEY,"
                    " saga bigint NOT NULL,"
                    " created_at timestamptz NOT NULL DEFAULT now())"
                ).format(sql.Identifier(table))
            )


def truncate_participants(dbname: str) -> None:
    """Empty the participant tables between scenarios."""
    with psycopg.connect(conninfo(dbname), autocommit=True) as conn:
        tables = sql.SQL(", ").join(sql.Identifier(t) for t in PARTICIPANTS)
        conn.execute(sql.SQL("TRUNCATE {}").format(tables))


def participant_counts(dbname: str) -> dict[str, int]:
    """Row count per participant table (used to sanity-check a scenario)."""
    counts: dict[str, int] = {}
    with psycopg.connect(conninfo(dbname), autocommit=True) as conn:
        for table in PARTICIPANTS:
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            row = conn.execute(query).fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


def check_success(counts: dict[str, int]) -> bool:
    """A success run must leave one row per saga in every participant table."""
    values = list(counts.values())
    return values[0] > 0 and all(v == values[0] for v in values)


def check_compensated(counts: dict[str, int]) -> bool:
    """A compensating run must leave nothing behind: every step was undone or rolled back."""
    return all(v == 0 for v in counts.values())


def server_version() -> str:
    """PostgreSQL server version string, recorded in the output for context."""
    with psycopg.connect(conninfo("postgres"), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"
