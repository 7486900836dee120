"""Choreographed sagas: the pure tracker core, its store persistence, and the event bus."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import engine.users
import examples.order_fulfillment_choreography as example
from engine import metrics
from engine.choreography.declaration import CHOREOGRAPHED, Choreography, ChoreoStep, DomainEvent
from engine.choreography.handlers import EventBus, EventContext, EventHandlers, tracker_handlers
from engine.choreography.operations import ChoreographyOperations
from engine.choreography.runtime import EventRuntime
from engine.choreography.track import compensation_plan, missing_compensations, track
from engine.choreography.tracker import Tracker
from engine.errors import DefinitionError, InvalidInput
from engine.model import EventKind, Instance
from engine.queries import Queries
from engine.states import CompensationStatus, Phase, SagaState, StepStatus
from engine.store import Store, open_store
from engine.transport.event_log import EventLog, InProcessEventLog, RedisEventLog
from tests.conftest import empty_tables
from tests.console.support import make_app, make_engine, sign_in
from tests.helpers.procs import Processes, participant

ORDER = Choreography(
    name="order_choreography",
    start="OrderPlaced",
    steps=(
        ChoreoStep(
            "reserve_inventory", "InventoryReserved", "InventoryReleased", timedelta(seconds=5)
        ),
        ChoreoStep("charge_payment", "PaymentCharged", "PaymentRefunded", timedelta(seconds=10)),
        ChoreoStep("ship_order", "OrderShipped", None, timedelta(seconds=60)),
    ),
    failures={"PaymentFailed": "charge_payment", "ShippingFailed": "ship_order"},
)

_seq = iter(range(1, 10_000))


def ev(event_type: str, at: int, corr: str = "order-1", **data: Any) -> DomainEvent:
    return DomainEvent(f"e{next(_seq)}", event_type, corr, data, at)


def feed(*events: DomainEvent) -> tuple[Instance | None, list[EventKind]]:
    inst: Instance | None = None
    kinds: list[EventKind] = []
    for event in events:
        tr = track(ORDER, inst, event)
        if tr is not None:
            inst = tr.instance
            kinds.extend(e.kind for e in tr.events)
    return inst, kinds


class TestDeclaration:
    def test_an_event_type_plays_one_role(self) -> None:
        with pytest.raises(DefinitionError):
            Choreography("x", "A", (ChoreoStep("s", "A"),))

    def test_failure_events_name_declared_steps(self) -> None:
        with pytest.raises(DefinitionError):
            Choreography("x", "A", (ChoreoStep("s", "B"),), failures={"F": "nope"})

    def test_needs_steps(self) -> None:
        with pytest.raises(DefinitionError):
            Choreography("x", "A", ())


class TestTrack:
    def test_the_starting_event_opens_an_instance_waiting_for_the_first_step(self) -> None:
        inst, kinds = feed(ev("OrderPlaced", 1000, sku="A1"))
        assert inst is not None
        assert inst.kind == CHOREOGRAPHED
        assert inst.state is SagaState.RUNNING
        assert inst.correlation_id == "order-1"
        assert inst.payload == {"sku": "A1"}
        first = inst.steps[0]
        assert first.status is StepStatus.RUNNING
        assert first.deadline_at == 1000 + 5000  # its expected time
        assert kinds == [EventKind.SAGA_STARTED, EventKind.ATTEMPT_STARTED]

    def test_other_events_before_the_start_open_nothing(self) -> None:
        assert track(ORDER, None, ev("InventoryReserved", 1)) is None

    def test_unrelated_events_change_nothing(self) -> None:
        inst, _ = feed(ev("OrderPlaced", 1))
        assert track(ORDER, inst, ev("SomethingElse", 2)) is None

    def test_the_happy_path_completes_step_by_step(self) -> None:
        inst, kinds = feed(
            ev("OrderPlaced", 1),
            ev("InventoryReserved", 2, reservation="r1"),
            ev("PaymentCharged", 3),
            ev("OrderShipped", 4),
        )
        assert inst is not None
        assert inst.state is SagaState.COMPLETED
        assert [s.status for s in inst.steps] == [StepStatus.SUCCEEDED] * 3
        assert inst.steps[0].output == {"reservation": "r1"}
        assert [s.finished_at for s in inst.steps] == [2, 3, 4]
        assert kinds[-1] is EventKind.SAGA_COMPLETED
        assert kinds.count(EventKind.ATTEMPT_SUCCEEDED) == 3

    def test_the_next_step_is_expected_after_one_is_done(self) -> None:
        inst, _ = feed(ev("OrderPlaced", 1), ev("InventoryReserved", 100))
        assert inst is not None
        assert inst.cursor == 1
        assert inst.steps[1].status is StepStatus.RUNNING
        assert inst.steps[1].deadline_at == 100 + 10_000

    def test_a_duplicate_event_changes_nothing(self) -> None:
        inst, _ = feed(ev("OrderPlaced", 1), ev("InventoryReserved", 2))
        assert track(ORDER, inst, ev("InventoryReserved", 3)) is None
        assert track(ORDER, inst, ev("OrderPlaced", 3)) is None

    def test_a_failure_turns_back_and_lists_the_missing_compensations(self) -> None:
        inst, kinds = feed(
            ev("OrderPlaced", 1),
            ev("InventoryReserved", 2),
            ev("PaymentFailed", 3, reason="card declined"),
        )
        assert inst is not None
        assert inst.state is SagaState.COMPENSATING
        assert inst.steps[1].status is StepStatus.FAILED
        assert inst.steps[1].error == "card declined"
        assert inst.steps[0].comp_status is CompensationStatus.PENDING
        assert inst.steps[2].status is StepStatus.PENDING
        assert inst.phase is Phase.COMPENSATE
        assert inst.cursor == 0
        assert missing_compensations(ORDER, inst) == ["InventoryReleased"]
        assert kinds[-2:] == [EventKind.STEP_FAILED, EventKind.COMPENSATION_STARTED]

    def test_the_compensating_events_finish_the_compensation(self) -> None:
        inst, _kinds = feed(
            ev("OrderPlaced", 1),
            ev("InventoryReserved", 2),
            ev("PaymentCharged", 3),
            ev("ShippingFailed", 4),
        )
        assert inst is not None
        assert missing_compensations(ORDER, inst) == ["PaymentRefunded", "InventoryReleased"]
        tr = track(ORDER, inst, ev("PaymentRefunded", 5))
        assert tr is not None
        inst = tr.instance
        assert inst.state is SagaState.COMPENSATING
        assert missing_compensations(ORDER, inst) == ["InventoryReleased"]
        tr = track(ORDER, inst, ev("InventoryReleased", 6))
        assert tr is not None
        inst = tr.instance
        assert inst.state is SagaState.COMPENSATED
        assert inst.steps[0].comp_status is CompensationStatus.COMPENSATED
        assert tr.events[-1].kind is EventKind.SAGA_COMPENSATED
        assert track(ORDER, inst, ev("InventoryReleased", 7)) is None  # final: nothing moves

    def test_a_failure_of_the_first_step_compensates_at_once(self) -> None:
        order = Choreography(
            "o", "Placed", (ChoreoStep("a", "ADone", "AUndone"),), failures={"AFailed": "a"}
        )
        inst = track(order, None, ev("Placed", 1))
        assert inst is not None
        tr = track(order, inst.instance, ev("AFailed", 2))
        assert tr is not None
        assert tr.instance.state is SagaState.COMPENSATED

    def test_a_late_step_event_after_the_failure_is_ignored(self) -> None:
        inst, _ = feed(ev("OrderPlaced", 1), ev("InventoryReserved", 2), ev("PaymentFailed", 3))
        assert track(ORDER, inst, ev("PaymentCharged", 4)) is None

    def test_compensation_plan_reverses_the_completed_steps(self) -> None:
        inst, _ = feed(ev("OrderPlaced", 1), ev("InventoryReserved", 2), ev("PaymentCharged", 3))
        assert inst is not None
        plan = compensation_plan(ORDER, inst)
        assert [(p.step, p.event_type) for p in plan] == [
            ("charge_payment", "PaymentRefunded"),
            ("reserve_inventory", "InventoryReleased"),
        ]
        assert len({p.key for p in plan}) == 2

    def test_compensation_plan_skips_what_is_already_undone(self) -> None:
        inst, _ = feed(
            ev("OrderPlaced", 1),
            ev("InventoryReserved", 2),
            ev("PaymentCharged", 3),
            ev("ShippingFailed", 4),
            ev("PaymentRefunded", 5),
        )
        assert inst is not None
        assert [p.event_type for p in compensation_plan(ORDER, inst)] == ["InventoryReleased"]

    def test_forced_compensation_while_running_ends_compensated(self) -> None:
        inst, _ = feed(
            ev("OrderPlaced", 1),
            ev("InventoryReserved", 2),
            ev("InventoryReleased", 3),
        )
        assert inst is not None
        assert inst.state is SagaState.COMPENSATED


class TestTrackerStore:
    def test_one_instance_per_correlation_id_with_its_timeline(self, store_url: str) -> None:
        store = open_store(store_url)
        try:
            tracker = Tracker(store, [ORDER])
            for event in (
                ev("OrderPlaced", 1, corr="c-1"),
                ev("OrderPlaced", 1, corr="c-2"),
                ev("InventoryReserved", 2, corr="c-1"),
                ev("InventoryReserved", 2, corr="c-1"),  # delivered twice
                ev("PaymentFailed", 3, corr="c-1", reason="declined"),
                ev("InventoryReleased", 4, corr="c-1"),
                ev("Unrelated", 5, corr="c-1"),
            ):
                tracker.apply(event)
            c1 = store.find_by_key(ORDER.name, "choreo:c-1")
            c2 = store.find_by_key(ORDER.name, "choreo:c-2")
            assert c1 is not None and c2 is not None
            assert c1.kind == CHOREOGRAPHED
            assert c1.state is SagaState.COMPENSATED
            assert c2.state is SagaState.RUNNING
            loaded = store.load(c1.id)
            assert loaded == c1
            kinds = [(e.kind, e.step_name) for e in Queries(store).timeline(c1.id)]
            assert kinds == [
                ("saga_started", None),
                ("attempt_started", "reserve_inventory"),
                ("attempt_succeeded", "reserve_inventory"),
                ("attempt_started", "charge_payment"),
                ("step_failed", "charge_payment"),
                ("compensation_started", "reserve_inventory"),
                ("attempt_succeeded", "reserve_inventory"),
                ("saga_compensated", None),
            ]
        finally:
            store.dispose()

    def test_orchestrated_instances_keep_their_kind(self, store_url: str) -> None:
        store = open_store(store_url)
        try:
            inst = Tracker(store, [ORDER]).apply(ev("OrderPlaced", 1, corr="c-9"))
            assert inst is not None
            assert store.load(inst.id).kind == CHOREOGRAPHED
            assert Instance.__dataclass_fields__["kind"].default == "orchestrated"
        finally:
            store.dispose()


# -- the event bus -----------------------------------------------------------


def wait_until(what: Any, timeout: float = 30.0) -> Any:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        found = what()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("gave up waiting")


@pytest.fixture(params=["in-process", "redis"])
def event_log(request: pytest.FixtureRequest, prefix: str) -> Iterator[EventLog]:
    if request.param == "in-process":
        yield InProcessEventLog()
        return
    url = request.getfixturevalue("redis_url")
    made = RedisEventLog(url, prefix=prefix, claim_idle_seconds=1.0)
    yield made
    keys = list(made.client.scan_iter(f"{prefix}:*"))
    if keys:
        made.client.delete(*keys)
    made.close()


def runtime(
    services: list[EventHandlers], log_: EventLog, store: Store, name: str = "c1"
) -> EventRuntime:
    return EventRuntime(services, log_, store, consumer=name, retry_delay=0.01).start()


class TestEventBus:
    def test_each_service_sees_every_event_and_its_effect_happens_once(
        self, event_log: EventLog, sqlite_url: str
    ) -> None:
        store = open_store(sqlite_url)
        seen: dict[str, list[str]] = {"a": [], "b": []}
        a, b = EventHandlers("a"), EventHandlers("b")

        @a.on("Ping")
        def on_ping_a(ctx: EventContext) -> None:
            ctx.guard.run_once(ctx.idempotency_key, lambda conn: seen["a"].append(ctx.event.id))

        @b.on("Ping")
        def on_ping_b(ctx: EventContext) -> None:
            assert ctx.idempotency_key == f"{ctx.event.id}:b.on_ping_b"
            seen["b"].append(ctx.event.data["n"])

        bus = EventBus(event_log)
        first = bus.publish("Ping", {"n": 1}, correlation_id="c")
        bus.publish("Ping", {"n": 1}, correlation_id="c", event_id=first)  # a duplicate
        rt = runtime([a, b], event_log, store)
        try:
            wait_until(lambda: len(seen["b"]) == 2)
            wait_until(lambda: rt.counts["handled"] == 4)
            assert seen["a"] == [first]  # the guard absorbed the duplicate
        finally:
            rt.stop()
            store.dispose()

    def test_a_slow_batch_is_kept_by_its_reader_and_handled_once(
        self, redis_url: str, prefix: str, sqlite_url: str
    ) -> None:
        # Four events of 0.4 s each: the last waits 1.2 s in the batch, four times
        # the idle period after which a second process would take it over.
        log_ = RedisEventLog(redis_url, prefix=prefix, claim_idle_seconds=0.3)
        store = open_store(sqlite_url)
        calls: list[tuple[str, str]] = []
        slow = EventHandlers("slow")

        @slow.on("Ping")
        def on_ping(ctx: EventContext) -> None:
            calls.append((ctx.event.id, threading.current_thread().name))
            time.sleep(0.4)

        bus = EventBus(log_)
        sent = [bus.publish("Ping", {"n": n}, correlation_id="c") for n in range(4)]
        first = runtime([slow], log_, store, "one")
        wait_until(lambda: bool(calls))
        second = runtime([slow], log_, store, "two")
        try:
            wait_until(lambda: first.counts["handled"] + second.counts["handled"] == 4)
            time.sleep(0.5)  # room for a takeover, if there was one
            assert sorted(event_id for event_id, _ in calls) == sorted(sent)
        finally:
            first.stop()
            second.stop()
            log_.close()
            store.dispose()

    def test_a_handler_that_keeps_failing_has_the_event_dead_lettered(
        self, event_log: EventLog, sqlite_url: str
    ) -> None:
        store = open_store(sqlite_url)
        svc = EventHandlers("flaky")
        calls: list[int] = []

        @svc.on("Ping")
        def boom(ctx: EventContext) -> None:
            calls.append(ctx.attempt)
            raise RuntimeError("downstream unavailable")

        def runs(outcome: str) -> float:
            scrape = metrics.values(metrics.exposition().decode())
            return metrics.total(
                scrape, "saga_event_handler_runs_total", handler="flaky.boom", outcome=outcome
            )

        before = {outcome: runs(outcome) for outcome in ("failed", "dead_lettered")}
        event_id = EventBus(event_log).publish("Ping", {}, correlation_id="c-7")
        rt = runtime([svc], event_log, store)
        try:
            letters = wait_until(store.event_dead_letters)
            assert calls == [1, 2, 3]
            assert runs("failed") - before["failed"] == 2
            assert runs("dead_lettered") - before["dead_lettered"] == 1
            (letter,) = letters
            assert letter["handler"] == "flaky.boom"
            assert letter["event_id"] == event_id
            assert letter["correlation_id"] == "c-7"
            assert letter["attempts"] == 3
            assert "downstream unavailable" in letter["reason"]
        finally:
            rt.stop()
            store.dispose()

    def test_malformed_events_are_dead_lettered_with_the_reason(
        self, event_log: EventLog, sqlite_url: str
    ) -> None:
        store = open_store(sqlite_url)
        svc = EventHandlers("svc")
        got: list[str] = []
        svc.on("Ping")(lambda ctx: got.append(ctx.event.id))
        event_log.append({"type": "Ping"})
        event_log.append({"id": "x", "type": "Ping", "correlation_id": "c", "data": "{", "at": "1"})
        good = EventBus(event_log).publish("Ping", {}, correlation_id="c")
        rt = runtime([svc], event_log, store)
        try:
            wait_until(lambda: got == [good])
            reasons = sorted(
                d["reason"]
                for d in wait_until(
                    lambda: len(store.event_dead_letters()) == 2 and store.event_dead_letters()
                )
            )
            assert "data is not JSON" in reasons[0]
            assert "missing field(s): id, correlation_id, data, at" in reasons[1]
        finally:
            rt.stop()
            store.dispose()

    def test_the_tracker_follows_the_events_on_the_bus(
        self, event_log: EventLog, sqlite_url: str
    ) -> None:
        store = open_store(sqlite_url)
        bus = EventBus(event_log)
        rt = runtime([tracker_handlers(Tracker(store, [ORDER]))], event_log, store)
        try:
            for event_type in (
                "OrderPlaced",
                "InventoryReserved",
                "PaymentCharged",
                "OrderShipped",
            ):
                bus.publish(event_type, {}, correlation_id="o-1")
            inst = wait_until(
                lambda: (
                    (i := store.find_by_key(ORDER.name, "choreo:o-1"))
                    and i.state is SagaState.COMPLETED
                    and i
                )
            )
            assert inst.kind == CHOREOGRAPHED
        finally:
            rt.stop()
            store.dispose()


# -- the example, as separate participant processes on Redis and PostgreSQL ----

APP = "examples.order_fulfillment_choreography"
SERVICES = ("inventory", "payment", "shipping", "choreography-tracker")


@pytest.fixture
def deployed(
    pg_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Processes, EventBus, Store]]:
    empty_tables(pg_url)
    store = open_store(pg_url)
    # The participant processes create the example's table themselves, as its
    # docstring says (init_event_handlers): start without it.
    example.effects.drop(store.db, checkfirst=True)
    log_ = RedisEventLog(redis_url, prefix=prefix)
    procs = Processes(
        tmp_path,
        {"SAGA_DATABASE_URL": pg_url, "SAGA_REDIS_URL": redis_url, "SAGA_REDIS_PREFIX": prefix},
    )
    try:
        for service in SERVICES:
            participant(procs, service, APP, service)
        yield procs, EventBus(log_), store
    finally:
        procs.close()
        keys = list(log_.client.scan_iter(f"{prefix}:*"))
        if keys:
            log_.client.delete(*keys)
        log_.close()
        store.dispose()


def effects_of(store: Store, order_id: str) -> list[tuple[str, str]]:
    e = example.effects.c
    with store.db.connect() as c:
        rows = c.execute(sa.select(e.service, e.action).where(e.order_id == order_id))
        return sorted((r.service, r.action) for r in rows)


def tracked(store: Store, order_id: str, state: SagaState) -> Instance:
    found: Instance = wait_until(
        lambda: (
            (i := store.find_by_key(example.ORDER.name, f"choreo:{order_id}"))
            and i.state is state
            and i
        )
    )
    return found


@pytest.mark.redis
@pytest.mark.postgres
def test_the_example_succeeds_and_compensates_across_processes(
    deployed: tuple[Processes, EventBus, Store],
) -> None:
    procs, bus, store = deployed
    placed = example.place_order(bus, "o-ok", sku="A1")
    bus.publish(
        "OrderPlaced", {"order_id": "o-ok", "sku": "A1"}, correlation_id="o-ok", event_id=placed
    )
    example.place_order(bus, "o-declined", sku="B2", card="declined")

    ok = tracked(store, "o-ok", SagaState.COMPLETED)
    assert ok.kind == CHOREOGRAPHED
    assert [s.status for s in ok.steps] == [StepStatus.SUCCEEDED] * 3
    assert effects_of(store, "o-ok") == [
        ("inventory", "reserve"),
        ("payment", "charge"),
        ("shipping", "ship"),
    ]  # OrderPlaced was delivered twice; every effect happened once

    declined = tracked(store, "o-declined", SagaState.COMPENSATED)
    assert [s.status for s in declined.steps] == [
        StepStatus.SUCCEEDED,
        StepStatus.FAILED,
        StepStatus.PENDING,
    ]
    assert declined.steps[1].error == "card declined"
    assert declined.steps[0].comp_status is CompensationStatus.COMPENSATED
    assert effects_of(store, "o-declined") == [("inventory", "release"), ("inventory", "reserve")]
    timeline = [(e.kind, e.step_name) for e in Queries(store).timeline(declined.id)]
    assert timeline[-4:] == [
        ("step_failed", "charge_payment"),
        ("compensation_started", "reserve_inventory"),
        ("attempt_succeeded", "reserve_inventory"),
        ("saga_compensated", None),
    ]
    assert all(procs.alive(s) for s in SERVICES)


@pytest.mark.redis
@pytest.mark.postgres
def test_a_participant_killed_mid_handler_has_its_event_redelivered(
    deployed: tuple[Processes, EventBus, Store], prefix: str
) -> None:
    procs, bus, store = deployed
    example.place_order(bus, "o-slow", sku="C3", ship_delay_s=3)
    client = bus.log.client  # type: ignore[attr-defined]
    wait_until(lambda: client.xpending(f"{prefix}:events", "shipping")["pending"] > 0)
    procs.kill("shipping")  # mid-handler: it read PaymentCharged and is still working on it
    participant(procs, "shipping-2", APP, "shipping")

    done = tracked(store, "o-slow", SagaState.COMPLETED)
    assert done.steps[2].status is StepStatus.SUCCEEDED
    assert effects_of(store, "o-slow").count(("shipping", "ship")) == 1


@pytest.mark.redis
@pytest.mark.postgres
def test_malformed_events_on_the_bus_are_dead_lettered_and_nothing_crashes(
    deployed: tuple[Processes, EventBus, Store],
) -> None:
    procs, bus, store = deployed
    bus.log.append({"type": "OrderPlaced", "data": "not json"})
    example.place_order(bus, "o-after", sku="D4")
    tracked(store, "o-after", SagaState.COMPLETED)
    letters = wait_until(
        lambda: len(store.event_dead_letters()) == 4 and store.event_dead_letters()
    )
    assert {d["handler"] for d in letters} == set(SERVICES)
    assert all("malformed event: missing field(s): id" in d["reason"] for d in letters)
    assert all(procs.alive(s) for s in SERVICES)


def forced_events(client: Any, stream: str) -> list[str]:
    found = []
    for _, fields in client.xrange(stream):
        if b'"forced":true' in fields.get(b"data", b""):
            found.append(fields[b"type"].decode())
    return found


@pytest.mark.redis
@pytest.mark.postgres
def test_a_missing_event_flags_the_instance_stuck_and_force_compensate_undoes_it(
    deployed: tuple[Processes, EventBus, Store], prefix: str
) -> None:
    _procs, bus, store = deployed
    example.place_order(bus, "o-hang", sku="E5", ship="hang")
    waiting = wait_until(
        lambda: (
            (i := store.find_by_key(example.ORDER.name, "choreo:o-hang")) and i.cursor == 2 and i
        )
    )
    tracker = Tracker(store, [example.ORDER])
    assert tracker.flag_stuck(waiting.last_progress_at + 1_000) == []  # not overdue yet
    assert tracker.flag_stuck(waiting.last_progress_at + 31_000) == [waiting.id]
    stuck = Queries(store).timeline(waiting.id)[-1]
    assert stuck.kind == "stuck_detected"
    assert stuck.detail is not None and stuck.detail["missing"] == ["OrderShipped"]

    ops = ChoreographyOperations(store, bus, [example.ORDER])
    published = ops.force_compensate(waiting.id, actor="alice", reason="courier lost it")
    assert published == ["PaymentRefunded", "InventoryReleased"]  # reverse order

    done = tracked(store, "o-hang", SagaState.COMPENSATED)
    assert [s.comp_status for s in done.steps[:2]] == [CompensationStatus.COMPENSATED] * 2
    assert forced_events(bus.log.client, f"{prefix}:events") == published  # type: ignore[attr-defined]
    wait_until(lambda: len(effects_of(store, "o-hang")) == 4)
    assert effects_of(store, "o-hang") == [
        ("inventory", "release"),
        ("inventory", "reserve"),
        ("payment", "charge"),
        ("payment", "refund"),
    ]
    audit = [(a.action, a.actor, a.reason) for a in Queries(store).operator_actions()]
    assert ("force_compensate", "alice", "courier lost it") in audit


def test_re_publishing_the_last_event_nudges_the_next_service(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    log_ = InProcessEventLog()
    bus = EventBus(log_)
    tracker = Tracker(store, [ORDER])
    try:
        for event_type in ("OrderPlaced", "InventoryReserved"):
            tracker.apply(ev(event_type, 1, corr="n-1"))
        inst = store.find_by_key(ORDER.name, "choreo:n-1")
        assert inst is not None
        ops = ChoreographyOperations(store, bus, [ORDER])
        assert ops.republish_last(inst.id, actor="bob", reason="payment missed it") == (
            "InventoryReserved"
        )
        (entry,) = log_.read("payment", "c", 10, 0)
        assert entry.fields[b"type"] == b"InventoryReserved"
        with pytest.raises(InvalidInput):
            ops.republish_last(inst.id, actor="bob", reason=" ")
    finally:
        store.dispose()


def test_force_compensate_publishes_each_compensating_event_once(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    log_ = InProcessEventLog()
    tracker = Tracker(store, [ORDER])
    try:
        for event_type in ("OrderPlaced", "InventoryReserved", "PaymentCharged"):
            tracker.apply(ev(event_type, 1, corr="f-1"))
        inst = store.find_by_key(ORDER.name, "choreo:f-1")
        assert inst is not None
        ops = ChoreographyOperations(store, EventBus(log_), [ORDER])
        first = ops.force_compensate(inst.id, actor="alice", reason="stuck at shipping")
        again = ops.force_compensate(inst.id, actor="alice", reason="clicked twice")
        assert first == ["PaymentRefunded", "InventoryReleased"]
        assert again == []
        types = [e.fields[b"type"] for e in log_.read("any", "c", 10, 0)]
        assert types == [b"PaymentRefunded", b"InventoryReleased"]
        actions = [a.action for a in Queries(store).operator_actions(saga_id=inst.id)]
        assert actions.count("force_compensate") == 2  # both audited
    finally:
        store.dispose()


# -- the console ---------------------------------------------------------------


def test_the_console_marks_a_choreographed_instance_and_force_compensates_it(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.users, "PASSWORD_HASH_METHOD", "pbkdf2:sha256:1000")
    saga_engine = make_engine(sqlite_url)
    log_ = InProcessEventLog()
    try:
        tracker = Tracker(saga_engine.store, [ORDER])
        for event_type in ("OrderPlaced", "InventoryReserved", "PaymentCharged"):
            tracker.apply(ev(event_type, 1, corr="web-1"))
        inst = saga_engine.store.find_by_key(ORDER.name, "choreo:web-1")
        assert inst is not None
        ops = ChoreographyOperations(saga_engine.store, EventBus(log_), [ORDER])
        app = make_app(saga_engine, SAGA_CHOREOGRAPHY_OPERATIONS=ops)
        viewer = sign_in(app.test_client(), "viewer")
        page = viewer.get(f"/sagas/{inst.id}").get_data(as_text=True)
        assert 'id="choreographed"' in page
        assert "Force-compensate" not in page  # viewers see, operators act
        saga_engine.store.add_event_dead_letter(
            handler="payment.charge",
            event_id="ev-1",
            event_type="InventoryReserved",
            correlation_id="web-1",
            reason="RuntimeError: gateway down",
            attempts=3,
            fields=None,
        )
        letters = viewer.get("/dead-letters").get_data(as_text=True)
        assert "payment.charge" in letters and "RuntimeError: gateway down" in letters
        listed = viewer.get("/sagas").get_data(as_text=True)
        assert 'class="badge choreographed"' in listed

        operator = sign_in(app.test_client(), "operator")
        page = operator.get(f"/sagas/{inst.id}").get_data(as_text=True)
        assert "Force-compensate" in page and "Re-publish the last event" in page
        url = f"/sagas/{inst.id}/choreography/force-compensate"
        assert operator.get(url).status_code == 200
        assert (
            operator.post(url, data={"reason": "", "expected_version": inst.version}).status_code
            == 400
        )
        done = operator.post(url, data={"reason": "INC-7", "expected_version": inst.version})
        assert done.status_code == 302
        types = [e.fields[b"type"] for e in log_.read("g", "c", 10, 0)]
        assert types == [b"PaymentRefunded", b"InventoryReleased"]
        audit = Queries(saga_engine.store).operator_actions(saga_id=inst.id)
        assert [(a.action, a.actor, a.reason, a.origin, a.origin_detail) for a in audit] == [
            ("force_compensate", "operator", "INC-7", "console", "operator")
        ]
    finally:
        saga_engine.close()


def test_the_tracker_runtime_flags_a_late_event_stuck(sqlite_url: str) -> None:
    quick = Choreography(
        "quick", "Began", (ChoreoStep("only", "Ended", None, timedelta(milliseconds=1)),)
    )
    store = open_store(sqlite_url)
    log_ = InProcessEventLog()
    handlers = tracker_handlers(Tracker(store, [quick]))
    rt = EventRuntime([handlers], log_, store, consumer="t", stuck_every=0.05).start()
    try:
        EventBus(log_).publish("Began", {}, correlation_id="q-1")
        inst = wait_until(lambda: store.find_by_key("quick", "choreo:q-1"))
        wait_until(lambda: Queries(store).stuck_since(inst.id) is not None)
        flagged = Queries(store).timeline(inst.id)[-1]
        assert flagged.kind == "stuck_detected"
        assert flagged.detail is not None and flagged.detail["missing"] == ["Ended"]
        EventBus(log_).publish("Ended", {}, correlation_id="q-1")
        wait_until(lambda: Queries(store).stuck_since(inst.id) is None)  # progress clears it
    finally:
        rt.stop()
        store.dispose()
