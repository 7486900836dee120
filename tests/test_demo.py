"""The demo's stuck sagas: what a newcomer sees flagged on the Stuck tab, and recovers.

The expense example waits for a manager's approval. The demo approves most
expenses itself a few seconds after they start; the ones it never approves
outlive what the wait is expected to take, the sweeper flags them stuck, and
an operator's signal (or force-compensate) brings them home.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import SagaEngine, SagaState, Settings
from engine.demo import SCENARIOS, Manager, prepare
from engine.examples import expense_approval, parcel_delivery
from engine.examples.expense_approval import APPROVAL, EXPECTED_APPROVAL
from engine.examples.parcel_delivery import EXPECTED_COURIER
from engine.queries import Queries
from tests.helpers.engines import wait_state
from tests.helpers.sweeps import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(store_url: str, clock: Clock) -> Iterator[SagaEngine]:
    made = SagaEngine(
        [expense_approval.approve_expense],
        settings=Settings(database_url=store_url, worker_id="demo-test"),
        clock=clock,
    )
    expense_approval.init_engine(made)
    yield made
    made.close()


def waiting_for_approval(engine: SagaEngine) -> str:
    saga_id = engine.run("approve_expense", {"employee": "Ada"}).id
    inst = engine.get(saga_id)
    assert inst.state is SagaState.RUNNING and inst.current.name == APPROVAL
    return saga_id


def test_an_expense_nobody_approves_is_flagged_stuck_and_an_approval_finishes_it(
    engine: SagaEngine, clock: Clock
) -> None:
    saga_id = waiting_for_approval(engine)
    sweeps = engine.sweeps()
    assert sweeps.stuck()["flagged"] == 0  # within what a manager usually takes

    clock.advance(seconds=EXPECTED_APPROVAL.total_seconds() + 6)  # past it, plus the grace
    assert sweeps.stuck()["flagged"] == 1
    assert Queries(engine.store).stuck_since(saga_id) == clock.now

    # The operator approves from the console or `saga signal`: the saga goes on.
    engine.signal(saga_id, APPROVAL, {"approved_by": "on-call"}, sent_by="on-call", reason="ok")
    worker = engine.worker().start()
    try:
        done = wait_state(engine, saga_id, SagaState.COMPLETED)
    finally:
        worker.stop()
    assert done.steps[2].output["approved_by"] == "on-call"
    assert sweeps.stuck()["cleared"] == 1
    assert Queries(engine.store).stuck_since(saga_id) is None


def test_force_compensating_a_stuck_expense_releases_the_held_funds(
    engine: SagaEngine, clock: Clock
) -> None:
    saga_id = waiting_for_approval(engine)
    clock.advance(seconds=EXPECTED_APPROVAL.total_seconds() + 6)
    engine.sweeps().stuck()

    engine.operations.compensate(saga_id, actor="on-call", reason="the manager left")
    worker = engine.worker().start()
    try:
        wait_state(engine, saga_id, SagaState.COMPENSATED)
    finally:
        worker.stop()
    [hold] = expense_approval.ledger.records(saga_id)
    assert hold["status"] == "released"


def test_the_demo_approves_only_the_expenses_it_was_told_to(
    engine: SagaEngine,
) -> None:
    approved, forgotten = waiting_for_approval(engine), waiting_for_approval(engine)
    manager = Manager(engine)
    manager.approve_later(approved, 0.0)
    manager.approve_later("no-such-saga", 0.0)  # an instance purged meanwhile: skipped

    assert manager.approve_due(now=float("inf")) == 1
    assert manager.approve_due(now=float("inf")) == 0  # each once
    worker = engine.worker().start()
    try:
        wait_state(engine, approved, SagaState.COMPLETED)
    finally:
        worker.stop()
    assert engine.get(forgotten).current.name == APPROVAL


def test_the_demo_mix_has_expenses_nobody_approves_and_steps_slower_than_expected() -> None:
    expenses = [s for s in SCENARIOS if s.saga == "approve_expense"]
    assert any(s.approve_after is None for s in expenses)  # the manager never answers
    assert any("slow" in str(s.faults.get("fail", {})) for s in expenses)


def test_the_demo_looks_for_stuck_sagas_every_few_seconds(tmp_path: Path) -> None:
    demo = prepare(Settings(database_url=f"sqlite:///{tmp_path / 'demo.db'}"))
    try:
        assert demo.settings.sweep_stuck_seconds <= 5
        assert "approve_expense" in demo.registry.names()
    finally:
        demo.close()


def test_a_courier_that_hangs_is_flagged_stuck_and_the_saga_goes_on_when_it_answers(
    store_url: str, clock: Clock
) -> None:
    engine = SagaEngine(
        [parcel_delivery.ship_parcel],
        settings=Settings(database_url=store_url, worker_id="demo-test", poll_seconds=0.05),
        clock=clock,
    )
    parcel_delivery.init_engine(engine)  # the courier answers in this process
    worker = engine.worker().start()
    try:
        saga_id = engine.start("ship_parcel", {"fail": {"courier": "slow:2"}}).id
        # The command is out and the courier has not answered: past what it is expected
        # to take, plus the grace, the sweeper flags the saga.
        clock.advance(seconds=EXPECTED_COURIER.total_seconds() + 6)
        assert engine.sweeps().stuck()["flagged"] == 1
        assert engine.get(saga_id).current.name == "reserve_courier"

        done = wait_state(engine, saga_id, SagaState.COMPLETED)
        assert done.steps[1].output["courier"] == f"{saga_id}:reserve_courier:action"
        assert engine.sweeps().stuck()["cleared"] == 1
    finally:
        worker.stop()
        engine.close()


def test_the_demo_mix_has_a_courier_that_hangs() -> None:
    parcels = [s for s in SCENARIOS if s.saga == "ship_parcel"]
    assert any("slow" in str(s.faults.get("fail", {})) for s in parcels)
