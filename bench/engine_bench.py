"""Our engine on the benchmark workload: a 3-step saga, each step one idempotent INSERT.

success:      hotel, flight, car: three transactional steps, each an
              ``INSERT ... ON CONFLICT DO NOTHING`` that commits together with
              the step's recorded result (the engine's equivalent of a DBOS
              transaction step).
compensating: the car step raises a non-retryable error, so flight and hotel
              are compensated (a DELETE each, also transactional), in that order.

Each caller thread starts and runs its saga inline (``SagaEngine.run``), the
library way of using the engine: durable from the first commit, taken over by
a worker if the caller dies. Prints one JSON line (see bench/README.md) that
also reports the commits per saga, counted from PostgreSQL's own statistics.
Run with the project venv: ``.venv/bin/python bench/engine_bench.py``.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import sqlalchemy as sa
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import NonRetryableError, Saga, SagaEngine, SagaState, Settings, StepContext
from engine.store.migrate import upgrade

DBNAME = "bench_engine"
SAGA_TABLES = ("saga_events", "saga_steps", "saga_dead_letters", "saga_instances")


def _insert(table: str) -> Any:
    statement = sa.text(
        f"INSERT INTO {table} (idem_key, saga) VALUES (:key, :saga) "
        "ON CONFLICT (idem_key) DO NOTHING"
    )

    def action(ctx: StepContext) -> None:
        assert ctx.connection is not None
        ctx.connection.execute(statement, {"key": ctx.idempotency_key, "saga": ctx.payload["i"]})

    return action


def _delete(table: str) -> Any:
    statement = sa.text(f"DELETE FROM {table} WHERE idem_key = :key")

    def compensation(ctx: StepContext, _output: object) -> None:
        assert ctx.connection is not None
        ctx.connection.execute(statement, {"key": f"{ctx.saga_id}:{table}:action"})

    return compensation


def _fail_car(ctx: StepContext) -> None:
    raise NonRetryableError("no cars left")


def build_sagas() -> list[Saga]:
    """The two benchmark sagas: ``trip`` succeeds, ``trip_fails`` compensates."""
    ok = Saga("trip")
    failing = Saga("trip_fails")
    for table in ("hotel", "flight"):
        ok.add_step(table, _insert(table), transactional=True)
        failing.add_step(table, _insert(table), _delete(table), transactional=True)
    ok.add_step("car", _insert("car"), transactional=True)
    failing.add_step("car", _fail_car, transactional=True)
    return [ok, failing]


def _runner(engine: SagaEngine, name: str, final: SagaState) -> Any:
    def one(i: int) -> None:
        inst = engine.run(name, {"i": i})
        if inst.state is not final:
            raise RuntimeError(f"saga {inst.id} ended {inst.state}, expected {final}")

    return one


def _reset(url: str) -> None:
    truncate_participants(DBNAME)
    db = sa.create_engine(url)
    with db.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(SAGA_TABLES)} CASCADE"))
    db.dispose()


def _verify(check: Any) -> dict[str, Any]:
    counts = participant_counts(DBNAME)
    return {"ok": bool(check(counts)), "rows": counts}


def commits_per_saga(engine: SagaEngine, name: str, n: int = 200) -> float:
    """Commits the engine's connections made per saga, counted client-side over ``n`` sagas."""
    commits = 0

    def count(_conn: Any) -> None:
        nonlocal commits
        commits += 1

    sa.event.listen(engine.store.db, "commit", count)
    try:
        for i in range(n):
            engine.run(name, {"i": 10_000_000 + i})
    finally:
        sa.event.remove(engine.store.db, "commit", count)
    return round(commits / n, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_args(parser)
    args = parser.parse_args()
    plan: Plan = plan_from_args(args)
    recreate_database(DBNAME)
    create_participant_tables(DBNAME)
    url = sqlalchemy_url(DBNAME)
    upgrade(url)
    threads = max(plan.threads, default=8)
    settings = Settings(database_url=url, concurrency=threads, worker_id="bench")
    engine = SagaEngine(build_sagas(), settings=settings)
    try:
        scenarios = {
            "success": Scenario(
                _runner(engine, "trip", SagaState.COMPLETED),
                reset=lambda: _reset(url),
                verify=lambda: _verify(check_success),
            ),
            "compensating": Scenario(
                _runner(engine, "trip_fails", SagaState.COMPENSATED),
                reset=lambda: _reset(url),
                verify=lambda: _verify(check_compensated),
            ),
        }
        doc = variant_document(
            "engine",
            plan,
            scenarios,
            meta={
                "engine": "saga-engine (this repo), transactional steps, inline run",
                "sqlalchemy": version("sqlalchemy"),
                "psycopg": version("psycopg"),
                "postgres": server_version(),
                "participant_rows": participant_counts(DBNAME),
            },
        )
        doc["meta"]["commits_per_saga"] = {
            "success": commits_per_saga(engine, "trip"),
            "compensating": commits_per_saga(engine, "trip_fails"),
        }
        emit(doc)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
