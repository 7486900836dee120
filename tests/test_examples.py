"""The example sagas, end to end on a real store: outcomes, effects, and compensation order."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from engine import Queries, SagaEngine, SagaState, Settings
from engine.cli import main
from engine.model import Instance
from engine.worker import Worker
from examples import order_fulfillment as orders
from examples import travel_booking as travel

APPS = "examples.travel_booking,examples.order_fulfillment"


@pytest.fixture
def engine(store_url: str) -> Iterator[SagaEngine]:
    eng = SagaEngine(
        [travel.book_trip, orders.fulfil_order],
        settings=Settings(database_url=store_url, poll_seconds=0.05, concurrency=4),
    )
    travel.init_engine(eng)
    orders.init_engine(eng)
    yield eng
    drop_participant_tables(eng)
    eng.close()


def drop_participant_tables(eng: SagaEngine) -> None:
    # The PostgreSQL test database outlives the test: leave only the store's own tables.
    for participant in (*travel.PARTICIPANTS, *orders.PARTICIPANTS):
        participant.table.drop(eng.store.db, checkfirst=True)


@pytest.fixture
def worker(engine: SagaEngine) -> Iterator[Worker]:
    running = engine.worker(4).start()
    yield running
    running.stop()


def wait_for(engine: SagaEngine, saga_id: str, *states: SagaState) -> Instance:
    """Poll the store until the instance reaches one of ``states`` (a generous deadline)."""
    deadline = time.monotonic() + 30
    while True:
        inst = engine.get(saga_id)
        if inst.state in states:
            return inst
        if time.monotonic() > deadline:
            pytest.fail(f"saga {saga_id} is still {inst.state}; expected {states}")
        time.sleep(0.02)


def compensation_order(engine: SagaEngine, saga_id: str) -> list[str]:
    """Steps whose compensation succeeded, in timeline order."""
    return [
        e.step_name or ""
        for e in Queries(engine.store).timeline(saga_id)
        if e.kind == "attempt_succeeded" and e.phase == "compensate"
    ]


def statuses(rows: list[dict[str, Any]]) -> list[str]:
    return [r["status"] for r in rows]


def test_a_trip_books_hotel_flight_and_car_once_each(engine: SagaEngine, worker: Worker) -> None:
    started = engine.start("book_trip", {"hotel": "Adlon", "nights": 3}, business_key="T-1")

    inst = wait_for(engine, started.id, SagaState.COMPLETED)

    assert statuses(travel.hotels.records(inst.id)) == ["active"]
    assert statuses(travel.flights.records(inst.id)) == ["active"]
    assert statuses(travel.cars.records(inst.id)) == ["active"]
    assert inst.outputs()["reserve_hotel"]["hotel"] == "Adlon"
    assert compensation_order(engine, inst.id) == []


def test_no_car_cancels_flight_then_hotel(engine: SagaEngine, worker: Worker) -> None:
    started = engine.start("book_trip", {"fail": {"car": "permanent"}})

    inst = wait_for(engine, started.id, SagaState.COMPENSATED, SagaState.FAILED)

    assert inst.state is SagaState.COMPENSATED
    # The car's action started (and failed), so its compensation runs too,
    # with nothing to undo; then the flight, then the hotel.
    assert compensation_order(engine, inst.id) == ["rent_car", "book_flight", "reserve_hotel"]
    assert statuses(travel.hotels.records(inst.id)) == ["cancelled"]
    assert statuses(travel.flights.records(inst.id)) == ["cancelled"]
    assert travel.cars.records(inst.id) == []


def test_a_flaky_flight_is_retried_then_the_trip_completes(
    engine: SagaEngine, worker: Worker
) -> None:
    started = engine.start("book_trip", {"fail": {"flight": "flaky:2"}})

    inst = wait_for(engine, started.id, SagaState.COMPLETED)

    assert inst.steps[1].attempts == 3
    assert statuses(travel.flights.records(inst.id)) == ["active"]


def test_a_flight_that_cannot_be_cancelled_dead_letters_the_trip(
    engine: SagaEngine, worker: Worker
) -> None:
    payload = {"fail": {"car": "permanent"}, "fail_compensation": {"flight": "always"}}
    started = engine.start("book_trip", payload)

    inst = wait_for(engine, started.id, SagaState.FAILED)

    [letter] = Queries(engine.store).dead_letters(saga_id=inst.id)
    assert (letter.step_name, letter.phase) == ("book_flight", "compensate")
    assert statuses(travel.flights.records(inst.id)) == ["active"]
    assert statuses(travel.hotels.records(inst.id)) == ["active"]  # not reached yet


def test_declined_payment_releases_the_inventory(engine: SagaEngine, worker: Worker) -> None:
    started = engine.start("fulfil_order", {"fail": {"payment": "permanent"}})

    inst = wait_for(engine, started.id, SagaState.COMPENSATED)

    assert statuses(orders.inventory.records(inst.id)) == ["released"]
    assert orders.payments.records(inst.id) == []
    assert orders.shipments.records(inst.id) == []


def test_shipping_down_after_payment_dead_letters_then_operator_retry_ships(
    engine: SagaEngine, worker: Worker, store_url: str
) -> None:
    started = engine.start("fulfil_order", {"order": "O-7", "fail": {"shipping": "flaky:3"}})

    inst = wait_for(engine, started.id, SagaState.FAILED)

    # Past the pivot nothing is undone: the charge stands, shipping waits.
    [letter] = Queries(engine.store).dead_letters(saga_id=inst.id)
    assert (letter.step_name, letter.phase, letter.attempts) == ("ship_order", "action", 3)
    assert compensation_order(engine, inst.id) == []
    assert statuses(orders.payments.records(inst.id)) == ["active"]
    assert orders.shipments.records(inst.id) == []

    result = CliRunner().invoke(
        main,
        ["-A", APPS, "retry", inst.id, "--reason", "carrier is back", "--actor", "alice"],
        env={"SAGA_DATABASE_URL": store_url},
    )
    assert result.exit_code == 0, result.output

    done = wait_for(engine, inst.id, SagaState.COMPLETED)
    assert done.steps[2].attempts == 4
    assert statuses(orders.shipments.records(inst.id)) == ["active"]
    assert statuses(orders.inventory.records(inst.id)) == ["active"]
    assert Queries(engine.store).dead_letters(saga_id=inst.id) == []  # resolved
    [action] = Queries(engine.store).operator_actions(saga_id=inst.id)
    assert (action.actor, action.action, action.reason) == ("alice", "retry", "carrier is back")


def test_a_repeated_step_has_one_effect(sqlite_url: str) -> None:
    # The hotel records the reservation, then its reply is lost (the attempt
    # times out); the retry runs the step again and the guard absorbs it.
    eng = SagaEngine(
        [travel.book_trip], settings=Settings(database_url=sqlite_url, poll_seconds=0.05)
    )
    travel.init_engine(eng)
    running = eng.worker(4).start()
    try:
        started = eng.start("book_trip", {"fail": {"hotel": "timeout:1"}})
        inst = wait_for(eng, started.id, SagaState.COMPLETED)
        key = f"{inst.id}:reserve_hotel:action"
        assert inst.steps[0].attempts == 2
        assert len(travel.hotels.records(inst.id)) == 1
        assert Queries(eng.store).duplicates_absorbed([key]) == {key: 1}
        _wait_for_late_result(eng, inst.id)
    finally:
        running.stop()
        eng.close()


def _wait_for_late_result(engine: SagaEngine, saga_id: str) -> None:
    # The hung first attempt returns after its deadline; let it note that on
    # the timeline before the store goes away.
    deadline = time.monotonic() + 30
    while not any(e.kind == "result_discarded" for e in Queries(engine.store).timeline(saga_id)):
        assert time.monotonic() < deadline, "the late result was never recorded"
        time.sleep(0.05)
