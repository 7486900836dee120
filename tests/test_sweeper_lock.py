"""Only one sweeper acts at a time: threads with their own connections, a `saga sweeper`
process, and a leader whose connection dies.

On PostgreSQL the leader holds a session advisory lock; on SQLite, a file
lock beside the database. Either way the others stand by and take over when
the leader stops.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine import SagaEngine
from engine.queries import Queries
from engine.store.leader import PostgresLock
from engine.sweeper.passes import SWEEPER
from tests.conftest import empty_tables
from tests.helpers.sweeps import World, begun_by_a_dead_worker, saga, wait_for_line

ROOT = Path(__file__).resolve().parent.parent
SAGA = str(Path(sys.executable).parent / "saga")


@pytest.fixture
def world(store_url: str) -> Iterator[World]:
    made = World(store_url)
    yield made
    made.close()


def work_for_a_sweeper(world: World) -> tuple[SagaEngine, list[str]]:
    """An instance that is stuck, and one whose worker died in the middle of a step."""
    engine = world.engine(saga("trip", stuck_grace=timedelta(0)))
    stuck = engine.start("trip", {}).id
    dead = engine.start("trip", {}).id
    begun_by_a_dead_worker(engine, dead, timedelta(seconds=10))
    world.clock.advance(minutes=11)
    return engine, [stuck, dead]


#: What one pass does: one attempt timed out, two instances flagged (neither progressed).
SWEPT_ONCE = ["attempt_timed_out", "stuck_detected", "stuck_detected"]


def sweeper_events(engine: SagaEngine, saga_ids: list[str]) -> list[str]:
    queries = Queries(engine.store)
    return sorted(e.kind for i in saga_ids for e in queries.timeline(i) if e.actor == SWEEPER)


def test_two_sweepers_at_once_act_once(world: World) -> None:
    engine, saga_ids = work_for_a_sweeper(world)
    # Two engines: each sweeper has its own connections, as two hosts would.
    sweepers = [world.engine(saga("trip", stuck_grace=timedelta(0))).sweeper() for _ in range(2)]
    start = threading.Barrier(2)
    results: list[Any] = [None, None]

    def sweep(index: int) -> None:
        start.wait()
        results[index] = sweepers[index].run_once()

    threads = [threading.Thread(target=sweep, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    try:
        assert sorted(r is None for r in results) == [False, True]  # one led, one stood by
        assert sweeper_events(engine, saga_ids) == SWEPT_ONCE
        leader, standby = sweepers if results[0] is not None else sweepers[::-1]
        assert standby.run_once() is None  # the leader keeps the lock between passes

        leader.stop()
        taken_over = standby.run_once()

        assert taken_over is not None  # the standby takes over, and finds nothing left to do
        assert taken_over["stuck"]["flagged"] == taken_over["dispatch"]["settled"] == 0
        assert sweeper_events(engine, saga_ids) == SWEPT_ONCE
    finally:
        for sweeper in sweepers:
            sweeper.stop()


def test_a_sweeper_process_holds_the_lead_until_it_stops(world: World) -> None:
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": world.url,
        "SAGA_WORKER_ID": "sweeper-process",
        "SAGA_SWEEP_DISPATCH_SECONDS": "0.2",
    }
    standby = world.engine().sweeper()
    with subprocess.Popen(
        [SAGA, "sweeper"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            wait_for_line(process, "sweeper-process leads")
            assert standby.run_once() is None

            process.terminate()  # SIGTERM: it finishes its sweep and gives up the lock
            assert process.wait(30) == 0

            assert standby.run_once() is not None
        finally:
            standby.stop()
            if process.poll() is None:
                process.kill()


@pytest.mark.postgres
def test_a_leader_whose_connection_dies_is_replaced(pg_url: str) -> None:
    empty_tables(pg_url)
    world = World(pg_url)
    try:
        leader, standby = world.engine().sweeper(), world.engine().sweeper()
        assert leader.run_once() is not None
        assert standby.run_once() is None

        _terminate_lock_holder(pg_url)

        assert standby.run_once() is not None  # the server dropped the lock with the session
        assert leader.run_once() is None  # the old leader notices, and stands by
        assert not leader.leading and standby.leading
        leader.stop()
        standby.stop()
    finally:
        world.close()


def _terminate_lock_holder(url: str) -> None:
    db = sa.create_engine(url)
    with db.connect() as c:
        pids = c.execute(
            sa.text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        ).scalars()
        for pid in list(pids):
            c.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    db.dispose()
    time.sleep(0.2)  # the server ends the session (and its locks) asynchronously


@pytest.mark.postgres
def test_the_advisory_lock_is_held_once_per_session(pg_url: str) -> None:
    db = sa.create_engine(pg_url)
    first, second = PostgresLock(db), PostgresLock(db)
    try:
        assert first.acquire() and first.acquire()  # confirming does not stack a second hold
        assert not second.acquire()
        first.release()
        assert second.acquire()
    finally:
        first.release()
        second.release()
        db.dispose()
