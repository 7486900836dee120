"""DBOS Transact 3.4 running the benchmark saga, for the side-by-side baseline.

DBOS 3.0 removed ``@DBOS.transaction`` and the application database; their
replacement is a datasource: ``ds = SQLAlchemyDatasource.create(url)`` and
``@ds.transaction()``, with the same exactly-once checkpointing (the step's
output row is written inside the step's own transaction).  So each saga step is
one ``@ds.transaction()`` doing one idempotent INSERT into a participant table
of the app database, inside one ``@DBOS.workflow()``.

success:      workflow runs hotel, flight, car transactions.
compensating: hotel, flight, then the car transaction inserts and raises (rolled
              back); the workflow catches it and runs two compensating
              DELETE transactions in reverse order (flight, hotel).

Callers start the workflow and wait for its result
(``DBOS.start_workflow(...).get_result()``).  Databases: ``bench_dbos_sys``
(DBOS system database) and ``bench_dbos`` (app database), both recreated per run.
Must run in bench/.venv-dbos (see setup-dbos.sh).  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, Literal, cast, get_args

import sqlalchemy as sa
from dbos import DBOS, DBOSConfig, SQLAlchemyDatasource
from harness import Plan, Scenario, add_plan_args, emit, plan_from_args, variant_document
from pgutil import (
    check_compensated,
    check_success,
    create_participant_tables,
    participant_counts,
    recreate_database,
    server_version,
    sqlalchemy_url,
    truncate_participants,
)

SYS_DB = "bench_dbos_sys"
APP_DB = "bench_dbos"
# Mirrors dbos._datasource.IsolationLevel (private), so ds.transaction() type-checks.
Isolation = Literal["SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED"]


class StepFailedError(Exception):
    """The simulated business failure of the third saga step."""


@dataclass(frozen=True)
class Workflows:
    """The two registered workflow functions (each takes an idempotency key)."""

    book: Callable[[str, int], str]
    book_failing: Callable[[str, int], str]


def _insert(ds: SQLAlchemyDatasource, table: str, key: str, saga: int) -> None:
    ds.sql_session().execute(
        sa.text(
            f"INSERT INTO {table} (idem_key, saga) VALUES (:k, :s)"
            " ON CONFLICT (idem_key) DO NOTHING"
        ),
        {"k": key, "s": saga},
    )


def _delete(ds: SQLAlchemyDatasource, table: str, key: str) -> None:
    ds.sql_session().execute(sa.text(f"DELETE FROM {table} WHERE idem_key = :k"), {"k": key})


def register_workflows(ds: SQLAlchemyDatasource, isolation: Isolation) -> Workflows:
    """Register the saga's transactions and workflows with DBOS (before launch)."""
    tx = ds.transaction(isolation_level=isolation)

    @tx
    def reserve_hotel(key: str, saga: int) -> None:
        _insert(ds, "hotel", key, saga)

    @tx
    def reserve_flight(key: str, saga: int) -> None:
        _insert(ds, "flight", key, saga)

    @tx
    def reserve_car(key: str, saga: int) -> None:
        _insert(ds, "car", key, saga)

    @tx
    def reserve_car_failing(key: str, saga: int) -> None:
        # Do the step's work, then fail: DBOS rolls the transaction back and
        # checkpoints the error, as it would for a real failing step.
        _insert(ds, "car", key, saga)
        raise StepFailedError("car unavailable")

    @tx
    def cancel_flight(key: str) -> None:
        _delete(ds, "flight", key)

    @tx
    def cancel_hotel(key: str) -> None:
        _delete(ds, "hotel", key)

    @DBOS.workflow()
    def book(key: str, saga: int) -> str:
        reserve_hotel(key, saga)
        reserve_flight(key, saga)
        reserve_car(key, saga)
        return "booked"

    @DBOS.workflow()
    def book_failing(key: str, saga: int) -> str:
        reserve_hotel(key, saga)
        reserve_flight(key, saga)
        try:
            reserve_car_failing(key, saga)
        except StepFailedError:
            cancel_flight(key)
            cancel_hotel(key)
            return "compensated"
        return "booked"

    return Workflows(book, book_failing)


def dbos_config(pool_size: int) -> DBOSConfig:
    """DBOS configuration: system database on local PG, pool sized for the callers."""
    return {
        "name": "saga-bench",
        "system_database_url": sqlalchemy_url(SYS_DB),
        # Default is 20; give DBOS as many system connections as the floor gets
        # app connections, so the 32-caller phase is not a pool-size artefact.
        "sys_db_pool_size": pool_size,
        "log_level": "WARNING",
    }


def caller(workflow: Callable[[str, int], str], expected: str) -> Callable[[int], None]:
    """Wrap a workflow as the harness's ``one(i)``: start it, wait, check the result."""

    def one(i: int) -> None:
        result = DBOS.start_workflow(workflow, f"saga-{i}", i).get_result()
        if result != expected:
            raise RuntimeError(f"workflow returned {result!r}, expected {expected!r}")

    return one


def _verify(check: Callable[[dict[str, int]], bool]) -> dict[str, Any]:
    """Table counts after a scenario, and whether they match its expected end state."""
    counts = participant_counts(APP_DB)
    return {"ok": check(counts), "counts": counts}


def scenarios(wf: Workflows) -> dict[str, Scenario]:
    """The success and compensating scenarios over the registered workflows."""

    def reset() -> None:
        truncate_participants(APP_DB)

    return {
        "success": Scenario(caller(wf.book, "booked"), reset, lambda: _verify(check_success)),
        "compensating": Scenario(
            caller(wf.book_failing, "compensated"), reset, lambda: _verify(check_compensated)
        ),
    }


def parse_args() -> argparse.Namespace:
    """CLI: the shared plan options plus DBOS-specific knobs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_args(parser)
    parser.add_argument(
        "--isolation",
        choices=get_args(Isolation),
        default="SERIALIZABLE",
        help="isolation of each step transaction (DBOS default: SERIALIZABLE)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    plan: Plan = plan_from_args(args)
    # DBOS logs through 'dbos'; keep its chatter off stdout's JSON line.
    logging.getLogger("dbos").setLevel(logging.WARNING)

    for db in (SYS_DB, APP_DB):
        recreate_database(db)
    create_participant_tables(APP_DB)

    pool_size = max(plan.threads, default=1) + 8
    DBOS(config=dbos_config(pool_size))
    ds = SQLAlchemyDatasource.create(
        sqlalchemy_url(APP_DB),
        engine_kwargs={"pool_size": pool_size, "max_overflow": 0},
    )
    wf = register_workflows(ds, cast(Isolation, args.isolation))
    DBOS.launch()
    meta = {
        "description": "DBOS workflow, 3 datasource transactions (1 idempotent INSERT each)",
        "dbos": version("dbos"),
        "sqlalchemy": version("sqlalchemy"),
        "psycopg": version("psycopg"),
        "postgres": server_version(),
        "isolation": args.isolation,
        "pool_size": pool_size,
        "databases": {"system": SYS_DB, "app": APP_DB},
    }
    try:
        doc = variant_document("dbos", plan, scenarios(wf), meta)
    finally:
        DBOS.destroy()
    emit(doc)


if __name__ == "__main__":
    main()
