"""Several workers on one PostgreSQL, and a worker killed mid-step.

The participant records when each call of each idempotency key started and
ended; two intervals of one key that overlap would mean a step ran
concurrently with itself, which leases must prevent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import sqlalchemy as sa

from engine import SagaEngine, SagaState
from engine.queries import Queries
from engine.store import schema as t
from engine.transport.doorbells import InProcessQueue
from tests.helpers.engines import Engines, timeline, wait_for, wait_state
from tests.helpers.participant import Participant
from tests.helpers.sagas import travel

ROOT = Path(__file__).resolve().parent.parent
RACE = 200


@pytest.fixture
def pg(pg_url: str) -> str:
    """An empty PostgreSQL store: these tests are about PostgreSQL's concurrency."""
    from tests.conftest import empty_tables

    empty_tables(pg_url)
    return pg_url


@pytest.fixture
def participant_pg(pg: str) -> Iterator[Participant]:
    p = Participant(pg)
    yield p
    p.close()


@pytest.fixture
def engines_pg(pg: str) -> Iterator[Engines]:
    made = Engines(pg)
    yield made
    made.close()


class Procs:
    """Worker processes started by a test; whatever is still alive at the end is killed."""

    def __init__(self, url: str, logs: Path) -> None:
        self.url = url
        self.logs = logs
        self.running: list[subprocess.Popen[str]] = []
        self._files: list[IO[str]] = []

    def start(
        self, worker_id: str, lease_seconds: float = 30.0, concurrency: int = 8
    ) -> subprocess.Popen[str]:
        env = {
            **os.environ,
            "SAGA_DATABASE_URL": self.url,
            "SAGA_WORKER_ID": worker_id,
            "SAGA_LEASE_SECONDS": str(lease_seconds),
            "SAGA_POLL_SECONDS": "0.05",
            "SAGA_CONCURRENCY": str(concurrency),
        }
        env.pop("SAGA_REDIS_URL", None)
        stderr: IO[str] = open(self.logs / f"{worker_id}.log", "w")  # noqa: SIM115
        self._files.append(stderr)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.worker_proc"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self.running.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "ready", f"worker {worker_id} did not start: {self.log(worker_id)}"
        return proc

    def log(self, worker_id: str) -> str:
        return (self.logs / f"{worker_id}.log").read_text()

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.running:
            self.stop(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        for file in self._files:
            file.close()


@pytest.fixture
def procs(pg: str, tmp_path: Path) -> Iterator[Procs]:
    made = Procs(pg, tmp_path)
    yield made
    made.close()


def all_finished(engine: SagaEngine, n: int, state: SagaState = SagaState.COMPLETED) -> bool:
    return Queries(engine.store).counts_by_state()[str(state)] == n


def assert_one_owner_at_a_time(engine: SagaEngine, p: Participant, instances: int) -> None:
    """No overlapping calls; and with nothing failing, every step ran exactly once."""
    assert p.overlaps() == []
    counts = p.effect_counts()
    assert len(counts) == instances * 3
    assert set(counts.values()) == {1}
    calls = [c.key for c in p.calls()]
    assert len(calls) == len(set(calls)) == instances * 3
    with engine.store.db.connect() as conn:
        kinds = set(conn.execute(sa.select(t.events.c.kind).distinct()).scalars())
    assert kinds == {"saga_started", "attempt_started", "attempt_succeeded", "saga_completed"}


@pytest.mark.slow
def test_two_engines_race_on_200_instances_without_overlap(
    engines_pg: Engines, participant_pg: Participant
) -> None:
    doorbells = InProcessQueue()  # both hear every doorbell, and both poll
    saga = travel(participant_pg)
    first = engines_pg(saga, worker_id="w1", transport=doorbells, concurrency=6)
    second = engines_pg(saga, worker_id="w2", transport=doorbells, concurrency=6)
    engines_pg.worker(first)
    engines_pg.worker(second)
    for n in range(RACE):
        (first if n % 2 else second).start("travel", {"pause_ms": 3})
    wait_for(lambda: all_finished(first, RACE), timeout=60)
    assert_one_owner_at_a_time(first, participant_pg, RACE)
    actors = {
        e.actor
        for e in Queries(first.store).timeline(
            Queries(first.store).list_instances(limit=1).items[0].id
        )
    }
    assert actors <= {"w1", "w2"}


@pytest.mark.slow
def test_one_worker_never_advances_an_instance_on_two_threads(
    engines_pg: Engines, participant_pg: Participant
) -> None:
    # Each start rings the doorbell while the frequent poll finds the same
    # due instance: both paths lead to claims by the same owner.
    engine = engines_pg(travel(participant_pg), poll_seconds=0.005, concurrency=8)
    engines_pg.worker(engine)
    for _ in range(60):
        engine.start("travel", {"pause_ms": 5})
    wait_for(lambda: all_finished(engine, 60), timeout=60)
    assert_one_owner_at_a_time(engine, participant_pg, 60)


@pytest.mark.slow
def test_two_worker_processes_race_on_200_instances_without_overlap(
    procs: Procs, engines_pg: Engines, participant_pg: Participant
) -> None:
    procs.start("proc-a")
    procs.start("proc-b")
    engine = engines_pg(travel(participant_pg), worker_id="starter")
    for _ in range(RACE):
        engine.start("travel", {"pause_ms": 3})
    wait_for(lambda: all_finished(engine, RACE), timeout=90)
    assert_one_owner_at_a_time(engine, participant_pg, RACE)
    pids = {c.pid for c in participant_pg.calls()}
    assert len(pids) == 2  # both processes did part of the work


@pytest.mark.slow
def test_a_worker_killed_mid_step_is_taken_over_after_its_lease(
    procs: Procs, engines_pg: Engines, participant_pg: Participant, tmp_path: Path
) -> None:
    gate = tmp_path / "flight-busy"
    gate.touch()
    doomed = procs.start("doomed", lease_seconds=1.5)
    engine = engines_pg(travel(participant_pg), worker_id="starter")
    ids = [engine.start("travel", {"block_while": {"flight": str(gate)}}).id for _ in range(3)]

    def flights_acted() -> bool:
        return all(("flight", "action") in participant_pg.effects(i) for i in ids)

    wait_for(flights_acted, timeout=30)  # each flight booked, and now blocks mid-step
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)
    leases = {i: engine.get(i).lease_expires_at for i in ids}
    assert all(engine.get(i).lease_owner == "doomed" for i in ids)
    gate.unlink()

    procs.start("survivor", lease_seconds=1.5)
    for saga_id in ids:
        done = wait_state(engine, saga_id, SagaState.COMPLETED, timeout=30)
        assert done.steps[1].attempts == 2
        flight_calls = [c for c in participant_pg.calls(saga_id) if c.step == "flight"]
        assert [(c.attempt, c.ended_ns is None) for c in flight_calls] == [(1, True), (2, False)]
        [abandoned] = [e for e in timeline(engine, saga_id) if e.kind == "attempt_abandoned"]
        assert (abandoned.step_name, abandoned.attempt, abandoned.actor) == (
            "flight",
            1,
            "survivor",
        )
        lease_end = leases[saga_id]
        assert lease_end is not None and abandoned.at > lease_end  # only once the lease expired
    counts = participant_pg.effect_counts()
    assert len(counts) == 9 and set(counts.values()) == {1}  # one effect per step
    assert "Traceback" not in procs.log("survivor")
