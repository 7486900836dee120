"""Crashes lose nothing: real worker and participant processes on PostgreSQL and Redis.

The chaos test runs the remote travel booking (examples/travel_booking_remote.py)
with 3 ``saga worker`` and 3 ``saga participant`` processes (hotel, flight,
car), 30% of the trips failing into compensation; it SIGKILLs a worker and a
participant mid-run and starts new ones, and flushes Redis once. Every trip
must end in the state its payload asked for, each participant effect must
have happened once, and compensations must have run in reverse order.

It runs ``SAGA_CHAOS_SAGAS`` trips (60 by default, the CI size)::

    SAGA_CHAOS_SAGAS=500 .venv/bin/pytest tests/test_chaos.py

The smaller tests below kill one thing at a time: a participant in the
middle of a command, and every database connection of every process. The
last one scrapes a participant process's ``--metrics-port`` after a trip
completed, one was compensated and a malformed command was set aside.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from engine import SagaEngine, SagaState, Settings, metrics
from engine.metrics import total
from engine.queries import Queries
from engine.store import schema as t
from examples import remote_participants
from examples.travel_booking_remote import book_trip_remote
from tests.conftest import empty_tables
from tests.helpers.engines import timeline, wait_for, wait_state
from tests.helpers.participant import Participant
from tests.helpers.procs import Processes, participant, worker
from tests.helpers.remote import remote_travel
from tests.test_metrics import promtool

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

SAGAS = int(os.environ.get("SAGA_CHAOS_SAGAS", "60"))
WORKERS_APP = "examples.travel_booking_remote"
PARTICIPANTS_APP = "examples.remote_participants"
STEPS = ("reserve_hotel", "book_flight", "rent_car")
SERVICES = ("hotel", "flight", "car")


@pytest.fixture
def prefix() -> str:
    return f"chaos-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    plain = redis.Redis.from_url(redis_url)
    yield plain
    plain.flushdb()  # this test worker's own database: nobody else's keys
    plain.close()


@pytest.fixture
def store(pg_url: str) -> Iterator[str]:
    empty_tables(pg_url)
    db = sa.create_engine(pg_url)
    remote_participants.bind(db)  # the tables, and a way to read them
    yield pg_url
    db.dispose()


@pytest.fixture
def procs(store: str, redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Processes]:
    env = {"SAGA_DATABASE_URL": store, "SAGA_REDIS_URL": redis_url, "SAGA_REDIS_PREFIX": prefix}
    made = Processes(tmp_path, env)
    yield made
    made.close()


@pytest.fixture
def starter(store: str, redis_url: str, prefix: str) -> Iterator[SagaEngine]:
    """Starts trips and reads the store from the test; it runs no steps."""
    engine = SagaEngine(
        [book_trip_remote, remote_travel(timeout=5.0)],
        settings=Settings(
            database_url=store, redis_url=redis_url, redis_prefix=prefix, worker_id="starter"
        ),
    )
    yield engine
    engine.close()


def failing(n: int) -> bool:
    """Trips 0, 3, 6 of every ten (30%) cannot rent a car: they are compensated."""
    return n % 10 in (0, 3, 6)


def finished(engine: SagaEngine) -> int:
    counts = Queries(engine.store).counts_by_state()
    return sum(counts.get(str(s), 0) for s in (SagaState.COMPLETED, SagaState.COMPENSATED))


class Starter(threading.Thread):
    """Starts the trips at a steady pace over about ``seconds``, so the chaos hits mid-run."""

    def __init__(self, engine: SagaEngine, total: int, seconds: float = 12.0) -> None:
        super().__init__(name="chaos-starter", daemon=True)
        self.engine = engine
        self.total = total
        self.pause = seconds / total
        self.ids: dict[str, bool] = {}  # saga id -> must fail

    def run(self) -> None:
        for n in range(self.total):
            payload = {"traveller": f"T{n}"}
            if failing(n):
                payload["fail"] = {"car": "permanent"}  # type: ignore[assignment]
            self.ids[self.engine.start("book_trip_remote", payload).id] = failing(n)
            time.sleep(self.pause)


def test_chaos_workers_and_participants_killed_and_redis_flushed(
    procs: Processes, starter: SagaEngine, client: redis.Redis
) -> None:
    for n in (1, 2, 3):
        worker(procs, f"w{n}", WORKERS_APP)
    for service in SERVICES:
        participant(procs, f"p-{service}", PARTICIPANTS_APP, service)

    trips = Starter(starter, SAGAS)
    trips.start()
    wait_for(lambda: finished(starter) >= SAGAS // 4, timeout=60, every=0.05)
    procs.kill("w1")
    procs.kill("p-flight")
    killed_at = finished(starter)
    time.sleep(1.0)  # the dead hold leases and pending entries for a while
    worker(procs, "w1-again", WORKERS_APP)
    participant(procs, "p-flight-again", PARTICIPANTS_APP, "flight")

    wait_for(lambda: finished(starter) >= SAGAS // 2, timeout=60, every=0.05)
    client.flushdb()  # Redis loses every doorbell, command and reply, and the groups
    flushed_at = finished(starter)
    trips.join()

    wait_for(lambda: finished(starter) == SAGAS, timeout=60 + SAGAS * 0.2, every=0.2)

    assert killed_at < SAGAS and flushed_at < SAGAS  # the chaos really hit mid-run
    assert len(trips.ids) == SAGAS
    for saga_id, must_fail in trips.ids.items():
        inst = starter.get(saga_id)
        assert inst.state is (SagaState.COMPENSATED if must_fail else SagaState.COMPLETED)
        assert inst.lease_owner is None
        if must_fail:
            assert compensations(starter, saga_id) == ["rent_car", "book_flight", "reserve_hotel"]
    assert_effects_once(starter, trips.ids)
    for name in ("w2", "w3", "w1-again", "p-hotel", "p-car", "p-flight-again"):
        assert procs.alive(name), procs.log(name)


def compensations(engine: SagaEngine, saga_id: str) -> list[str | None]:
    return [
        e.step_name
        for e in timeline(engine, saga_id)
        if e.kind == "attempt_succeeded" and e.phase == "compensate"
    ]


def assert_effects_once(engine: SagaEngine, trips: dict[str, bool]) -> None:
    """Each record made (and undone) once, and the guard saw exactly the expected keys:
    an effect's key for each effect, and a fence for each refused car that was compensated
    (its action never ran, so a late one would be refused)."""
    expected: set[str] = set()
    fences: set[str] = set()
    for saga_id, must_fail in trips.items():
        hotel, flight, car = (p.records(saga_id) for p in remote_participants.PARTICIPANTS)
        if must_fail:
            assert [r["status"] for r in hotel + flight] == ["cancelled", "cancelled"]
            assert car == []
            assert flight[0]["undone_at"] <= hotel[0]["undone_at"]  # undone in reverse
            expected |= {f"{saga_id}:{s}:action" for s in STEPS[:2]}
            expected |= {f"{saga_id}:{s}:compensate" for s in STEPS}
            fences.add(f"{saga_id}:{STEPS[2]}:action")
        else:
            assert [r["status"] for r in hotel + flight + car] == ["active"] * 3
            expected |= {f"{saga_id}:{s}:action" for s in STEPS}
    k = t.idempotency_keys.c
    with engine.store.db.connect() as conn:
        rows = conn.execute(sa.select(k.key, k.fenced_at)).all()
    keys = [key for key, fenced_at in rows if fenced_at is None]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert {key for key, fenced_at in rows if fenced_at is not None} == fences


# -- one thing at a time -------------------------------------------------------------

APP = "tests.helpers.proc_app"


@pytest.fixture
def recorder(store: str) -> Iterator[Participant]:
    p = Participant(store)
    yield p
    p.close()


def test_a_participant_killed_mid_command_still_acts_once(
    procs: Processes, starter: SagaEngine, recorder: Participant, tmp_path: Path
) -> None:
    gate = tmp_path / "hold-hotel"
    gate.touch()
    worker(procs, "w1", APP)
    participant(procs, "p1", APP)
    saga_id = starter.start("rtravel", {"block_while": {"hotel": str(gate)}}).id
    wait_for(lambda: recorder.effects(saga_id))  # the hotel acted; its reply is not sent

    procs.kill("p1")
    gate.unlink()
    participant(procs, "p2", APP)

    done = wait_state(starter, saga_id, SagaState.COMPLETED, timeout=30)
    hotel = [c for c in recorder.calls(saga_id) if c.step == "hotel"]
    assert hotel[0].ended_ns is None  # the first call died with its process
    assert len(hotel) == 2  # taken over (attempt 1) or tried again after its deadline
    assert done.steps[0].attempts in (1, 2)
    assert set(recorder.effect_counts().values()) == {1}


def test_workers_and_participants_carry_on_when_database_connections_are_killed(
    procs: Processes, starter: SagaEngine, recorder: Participant, store: str
) -> None:
    worker(procs, "w1", APP)
    worker(procs, "w2", APP)
    participant(procs, "p1", APP)
    first = [starter.start("rtravel", {"pause_ms": 20}).id for _ in range(20)]
    wait_for(lambda: finished(starter) >= 5, timeout=30)

    killed = terminate_backends(store)
    starter.store.db.dispose()  # the test's own pooled connections died too
    recorder.db.dispose()
    second = [starter.start("rtravel", {"pause_ms": 20}).id for _ in range(20)]
    assert killed > 0

    for saga_id in first + second:
        wait_state(starter, saga_id, SagaState.COMPLETED, timeout=60)
    assert set(recorder.effect_counts().values()) == {1}
    assert len(recorder.effect_counts()) == 40 * 3
    for name in ("w1", "w2", "p1"):
        assert procs.alive(name), procs.log(name)


def terminate_backends(url: str) -> int:
    """Kill every other connection to the test database; returns how many."""
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
            )
    finally:
        admin.dispose()


# -- what a participant process tells Prometheus ----------------------------------------


def test_a_participant_counts_and_times_the_commands_it_answers(
    procs: Processes, starter: SagaEngine, client: redis.Redis, prefix: str
) -> None:
    worker(procs, "w1", APP)
    procs.start("p1", "-A", APP, "participant", "--metrics-port", "0", ready="metrics on http://")
    url = _metrics_url(procs.log("p1"))
    # A worker whose reply group is new sends the commands in flight again (Redis
    # may have lost them); let that happen before any saga starts, so each command
    # here is answered once and the counts below are exact.
    wait_for(lambda: _has_group(client, f"{prefix}:replies", "workers"))
    client.xadd(f"{prefix}:commands:hotel", {"junk": "not a command"})

    done = starter.start("rtravel", {}).id
    refused = starter.start("rtravel", {"fatal": {"car": True}}).id
    wait_state(starter, done, SagaState.COMPLETED, timeout=30)
    wait_state(starter, refused, SagaState.COMPENSATED, timeout=30)
    text = _scrape(url)
    parsed = metrics.values(text)

    answered = "saga_participant_commands_total"
    assert total(parsed, answered, command="hotel.do", outcome="success") == 2
    assert total(parsed, answered, command="flight.do", outcome="success") == 2
    assert total(parsed, answered, command="car.do", outcome="success") == 1
    assert total(parsed, answered, command="car.do", outcome="fail") == 1
    assert total(parsed, answered, command="flight.undo", outcome="success") == 1
    assert total(parsed, answered, command="hotel.undo", outcome="success") == 1
    # The refused step is undone too: its action may have done something first.
    assert total(parsed, answered, command="car.undo", outcome="success") == 1
    handler = "saga_participant_handler_duration_seconds_count"
    assert total(parsed, handler, command="car.do", outcome="fail") == 1
    assert total(parsed, "saga_participant_command_wait_seconds_count", command="hotel.do") == 2
    hotel = f"{prefix}:commands:hotel"
    assert total(parsed, "saga_poison_records_total", stream=hotel, why="malformed") == 1
    assert total(parsed, "saga_participant_busy") == 0
    checked = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _has_group(client: redis.Redis, stream: str, group: str) -> bool:
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return False
    return any(g["name"] in (group, group.encode()) for g in groups)


def _metrics_url(log: str) -> str:
    line = next(line for line in log.splitlines() if "metrics on http://" in line)
    return line.split("metrics on ", 1)[1].split()[0].replace("0.0.0.0", "127.0.0.1")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text
