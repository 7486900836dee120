"""Workers on Redis Streams: poison entries, outages, lost messages, dead consumers.

The store is the truth and Redis is a doorbell: these tests take the
doorbells away (flush Redis, kill a consumer, point at no Redis at all) and
check that every saga still finishes, each effect once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from engine import Retry, SagaEngine, SagaState, Settings
from engine.queries import Queries
from engine.sweeper.doorbells import recover
from engine.transport.doorbells import InProcessQueue, Transport
from engine.transport.redis_doorbells import RedisStreamsTransport
from engine.worker import Worker
from tests.conftest import empty_tables
from tests.helpers.engines import wait_for, wait_state
from tests.helpers.participant import Participant
from tests.helpers.sagas import travel

Build = Callable[..., SagaEngine]


class Deployment:
    """Engines and workers on one store (and one Redis prefix), stopped after the test."""

    def __init__(self, url: str, participant: Participant) -> None:
        self.url = url
        self.participant = participant
        self.engines: list[SagaEngine] = []
        self.workers: list[Worker] = []

    def engine(
        self,
        worker_id: str,
        *,
        transport: Transport | None = None,
        **settings: Any,
    ) -> SagaEngine:
        settings.setdefault("poll_seconds", 0.2)
        settings.setdefault("concurrency", 4)
        built = SagaEngine(
            [travel(self.participant)],
            settings=Settings(database_url=self.url, worker_id=worker_id, **settings),
            transport=transport,
        )
        self.engines.append(built)
        return built

    def worker(self, engine: SagaEngine) -> Worker:
        running: Worker = engine.worker()
        self.workers.append(running.start())
        return running

    def close(self) -> None:
        for running in self.workers:
            running.stop(timeout=30)
        for built in self.engines:
            built.close()


@pytest.fixture
def sqlite_deployment(sqlite_url: str) -> Iterator[Deployment]:
    participant = Participant(sqlite_url)
    made = Deployment(sqlite_url, participant)
    yield made
    made.close()
    participant.close()


@pytest.fixture
def pg_deployment(pg_url: str) -> Iterator[Deployment]:
    empty_tables(pg_url)
    participant = Participant(pg_url)
    made = Deployment(pg_url, participant)
    yield made
    made.close()
    participant.close()


def counts(engine: SagaEngine) -> dict[str, int]:
    return Queries(engine.store).counts_by_state()


def wait_all(engine: SagaEngine, state: SagaState, total: int, timeout: float = 60.0) -> None:
    wait_for(lambda: counts(engine).get(str(state), 0) == total, timeout=timeout)


def effects_once(participant: Participant) -> None:
    """Every idempotency key took effect once, and no step ran alongside itself."""
    assert set(participant.effect_counts().values()) == {1}
    assert participant.overlaps() == []


# -- recovery -------------------------------------------------------------------


def test_recover_rings_for_due_instances_with_a_free_lease(
    store_url: str, participant: Participant
) -> None:
    queue = InProcessQueue()
    patient = Retry(max_attempts=3, initial_delay=timedelta(hours=1))
    engine = SagaEngine(
        [travel(participant), travel(participant, retry=patient, name="patient")],
        settings=Settings(database_url=store_url, worker_id="recovery-test"),
        transport=queue,
    )
    try:
        due = engine.start("travel", {}).id
        leased = engine.start("travel", {}).id
        expired = engine.start("travel", {}).id
        now = engine.clock()
        assert engine.store.claim(leased, "someone", 60_000, now)
        assert engine.store.claim(expired, "the-dead", 1, now - 10_000)
        finished = engine.run("travel", {})
        backing_off = engine.run("patient", {"fail": {"hotel": 1}})
        assert finished.state is SagaState.COMPLETED
        assert backing_off.next_run_at is not None and backing_off.next_run_at > now
        queue.receive(100, 0)  # drop the doorbells start() rang

        assert recover(engine.collaborators) == 2
        assert sorted(d.saga_id for d in queue.receive(100, 0)) == sorted([due, expired])
    finally:
        engine.close()


def test_recover_pages_through_every_due_instance(store_url: str, participant: Participant) -> None:
    queue = InProcessQueue()
    engine = SagaEngine(
        [travel(participant)],
        settings=Settings(database_url=store_url, worker_id="recovery-test"),
        transport=queue,
    )
    try:
        started = sorted(engine.start("travel", {}).id for _ in range(7))
        queue.receive(100, 0)
        assert recover(engine.collaborators, batch=3) == 7
        assert sorted(d.saga_id for d in queue.receive(100, 0)) == started
        assert (
            recover(engine.collaborators, batch=3) == 7
        )  # idempotent: nothing was claimed meanwhile
    finally:
        engine.close()


# -- a worker on Redis (SQLite store) ----------------------------------------------


@pytest.mark.redis
def test_poison_entries_do_not_stop_the_worker(
    client: redis.Redis, sqlite_deployment: Deployment, redis_url: str, prefix: str
) -> None:
    engine = sqlite_deployment.engine("w1", redis_url=redis_url, redis_prefix=prefix)
    running = sqlite_deployment.worker(engine)
    work = f"{prefix}:work"
    client.xadd(work, {"hello": "world"})
    client.xadd(work, {"saga_id": b"\x80\x81"})
    client.xadd(work, {"saga_id": "not-an-id"})
    client.xadd(work, {"saga_id": str(uuid.uuid4())})  # well formed, names no saga

    saga_id = engine.start("travel", {}).id
    wait_state(engine, saga_id, SagaState.COMPLETED)

    transport = engine.transport
    assert isinstance(transport, RedisStreamsTransport)
    wait_for(lambda: len(transport.poison()) == 3)
    reasons = sorted(r.reason.split(" ")[0] for r in transport.poison())
    assert reasons == ["no", "saga_id", "saga_id"]
    wait_for(lambda: client.xpending(work, "workers")["pending"] == 0)
    assert not running.stopping
    effects_once(sqlite_deployment.participant)


@pytest.mark.redis
def test_a_doorbell_is_acknowledged_once_its_saga_was_handled(
    client: redis.Redis,
    sqlite_deployment: Deployment,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    engine = sqlite_deployment.engine(
        "w1", redis_url=redis_url, redis_prefix=prefix, poll_seconds=60.0
    )
    sqlite_deployment.worker(engine)
    _past_first_poll(client, f"{prefix}:work")  # so the doorbell is what starts the saga
    gate = tmp_path / "hold-hotel"
    gate.touch()
    saga_id = engine.start("travel", {"block_while": {"hotel": str(gate)}}).id
    wait_for(lambda: sqlite_deployment.participant.calls(saga_id))

    # The worker runs the saga: its doorbell is still pending, so if the
    # worker died now, another would take the doorbell over.
    assert _pending_of(client, f"{prefix}:work", "w1") == 1
    gate.unlink()
    wait_state(engine, saga_id, SagaState.COMPLETED)
    wait_for(lambda: _pending_of(client, f"{prefix}:work", "w1") == 0)


@pytest.mark.redis
def test_a_redelivered_doorbell_does_not_run_a_saga_twice(
    client: redis.Redis,
    sqlite_deployment: Deployment,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    engine = sqlite_deployment.engine(
        "w1",
        redis_url=redis_url,
        redis_prefix=prefix,
        redis_claim_idle_seconds=0.2,
        poll_seconds=60.0,
    )
    sqlite_deployment.worker(engine)
    _past_first_poll(client, f"{prefix}:work")
    gate = tmp_path / "hold-hotel"
    gate.touch()
    saga_id = engine.start("travel", {"block_while": {"hotel": str(gate)}}).id

    # The step outlasts the idle threshold: the worker takes its own doorbell
    # over, finds the saga in hand, and acknowledges it.
    wait_for(lambda: _pending_of(client, f"{prefix}:work", "w1") == 0)
    assert engine.get(saga_id).state is SagaState.RUNNING
    gate.unlink()
    wait_state(engine, saga_id, SagaState.COMPLETED)
    hotel_calls = [c for c in sqlite_deployment.participant.calls(saga_id) if c.step == "hotel"]
    assert len(hotel_calls) == 1
    effects_once(sqlite_deployment.participant)


def test_without_redis_the_store_poll_keeps_work_moving(sqlite_deployment: Deployment) -> None:
    engine = sqlite_deployment.engine("w1", redis_url="redis://127.0.0.1:1/0", poll_seconds=0.05)
    sqlite_deployment.worker(engine)
    saga_id = engine.start("travel", {}).id  # no doorbell: logged, not raised
    wait_state(engine, saga_id, SagaState.COMPLETED)
    effects_once(sqlite_deployment.participant)


@pytest.mark.redis
def test_settings_choose_the_redis_transport(redis_url: str, sqlite_url: str) -> None:
    env = {
        "SAGA_DATABASE_URL": sqlite_url,
        "SAGA_REDIS_URL": redis_url,
        "SAGA_REDIS_PREFIX": "blue",
        "SAGA_REDIS_CLAIM_IDLE_SECONDS": "12",
    }
    engine = SagaEngine(settings=Settings.from_env(env))
    try:
        assert isinstance(engine.transport, RedisStreamsTransport)
        assert engine.transport.stream == "blue:work"
        assert engine.transport.claim_idle_ms == 12_000
        assert engine.transport.consumer == engine.owner
    finally:
        engine.close()


# -- end to end: PostgreSQL and Redis --------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
def test_fifty_sagas_finish_through_a_flush_of_redis(
    client: redis.Redis, pg_deployment: Deployment, redis_url: str, prefix: str
) -> None:
    options: dict[str, Any] = {"redis_url": redis_url, "redis_prefix": prefix}
    first = pg_deployment.engine("w1", **options)
    second = pg_deployment.engine("w2", **options)
    pg_deployment.worker(first)
    pg_deployment.worker(second)

    for n in range(50):
        (first if n % 2 else second).start("travel", {"pause_ms": 40})
    wait_for(lambda: counts(first).get("completed", 0) >= 10)
    client.flushdb()  # Redis loses every doorbell, the group and its pending entries
    wait_all(first, SagaState.COMPLETED, 50)

    effects_once(pg_deployment.participant)
    # The doorbells flow again through a group the workers made anew.
    groups = client.xinfo_groups(f"{prefix}:work")
    assert [g["name"] for g in groups] == [b"workers"]
    wait_for(lambda: client.xpending(f"{prefix}:work", "workers")["pending"] == 0)


@pytest.mark.redis
@pytest.mark.postgres
def test_a_worker_starting_after_the_flush_recovers_the_work(
    client: redis.Redis, pg_deployment: Deployment, redis_url: str, prefix: str
) -> None:
    # A store poll once a minute: only the start-up recovery can ring for the rest.
    options: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "poll_seconds": 60.0,
    }
    starter = pg_deployment.engine("starter", **options)
    for _ in range(30):
        starter.start("travel", {})
    client.flushdb()
    pg_deployment.worker(pg_deployment.engine("w1", **options))
    wait_all(starter, SagaState.COMPLETED, 30)
    effects_once(pg_deployment.participant)


@pytest.mark.redis
@pytest.mark.postgres
def test_a_dead_consumers_pending_entries_are_taken_over(
    client: redis.Redis, pg_deployment: Deployment, redis_url: str, prefix: str
) -> None:
    work = f"{prefix}:work"
    # The survivor polls the store once a minute, and the sagas are created
    # without a doorbell: only the dead consumer's entries can move them.
    survivor = pg_deployment.engine(
        "survivor",
        redis_url=redis_url,
        redis_prefix=prefix,
        redis_claim_idle_seconds=0.5,
        poll_seconds=60.0,
    )
    pg_deployment.worker(survivor)
    _past_first_poll(client, work)
    silent = pg_deployment.engine("silent", transport=InProcessQueue())
    saga_ids = [silent.start("travel", {}).id for _ in range(10)]

    # A worker reads the doorbells, then dies before acknowledging any. The
    # MULTI makes the read atomic with the writes, so the survivor cannot get
    # them first.
    pipe = client.pipeline(transaction=True)
    for saga_id in saga_ids:
        pipe.xadd(work, {"saga_id": saga_id})
    pipe.xreadgroup("workers", "dead", {work: ">"}, count=100)
    pipe.execute()
    assert _pending_of(client, work, "dead") == 10

    wait_all(survivor, SagaState.COMPLETED, 10)
    effects_once(pg_deployment.participant)
    wait_for(lambda: client.xpending(work, "workers")["pending"] == 0)


def _past_first_poll(client: redis.Redis, stream: str) -> None:
    """Wait until a new worker's first read made the group, and its first store poll ran."""
    wait_for(lambda: _has_group(client, stream))
    time.sleep(0.3)  # the first poll follows the first read at once


def _has_group(client: redis.Redis, stream: str) -> bool:
    try:
        return any(g["name"] == b"workers" for g in client.xinfo_groups(stream))
    except redis.ResponseError:  # no stream yet
        return False


def _pending_of(client: redis.Redis, stream: str, consumer: str) -> int:
    summary = client.xpending(stream, "workers")
    return sum(c["pending"] for c in summary["consumers"] if c["name"] == consumer.encode())
