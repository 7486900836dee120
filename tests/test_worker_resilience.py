"""A worker keeps going when PostgreSQL kills its connections."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from engine import Saga, SagaEngine, SagaState, Settings

pytestmark = pytest.mark.slow


def _wait_all_final(engine: SagaEngine, ids: list[str], timeout: float) -> list[SagaState]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [engine.get(i).state for i in ids]
        if all(s.is_final for s in states):
            return states
        time.sleep(0.05)
    return [engine.get(i).state for i in ids]


def test_worker_survives_terminated_connections(pg_url: str) -> None:
    from tests.conftest import empty_tables

    empty_tables(pg_url)
    saga = Saga("resilient")
    saga.add_step("only", lambda ctx: {"n": ctx.payload["n"]})
    engine = SagaEngine(
        [saga], settings=Settings(database_url=pg_url, poll_seconds=0.05, worker_id="resilient")
    )
    worker = engine.worker(2).start()
    try:
        first = [engine.start("resilient", {"n": n}).id for n in range(5)]
        assert set(_wait_all_final(engine, first, 20)) == {SagaState.COMPLETED}

        dbname = sa.make_url(pg_url).database
        admin = sa.create_engine(pg_url)
        with admin.begin() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": dbname},
            ).scalar()
        admin.dispose()
        assert killed and killed > 0  # the worker's pooled connections were among them

        second = [engine.start("resilient", {"n": n}).id for n in range(5, 10)]
        assert set(_wait_all_final(engine, second, 20)) == {SagaState.COMPLETED}
        assert worker._thread is not None and worker._thread.is_alive()
    finally:
        worker.stop()
        engine.close()
