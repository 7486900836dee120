"""Effectively-once effects: the idempotency guard, alone and under a real engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa

from engine import (
    NO_RETRY,
    ActionFenced,
    IdempotencyGuard,
    NonRetryableError,
    Saga,
    SagaEngine,
    SagaState,
    StepContext,
    metrics,
)
from engine.decide import Run, begin_attempt
from engine.model import now_ms
from engine.queries import Queries
from engine.states import Phase
from tests.helpers.engines import Engines, timeline, wait_for, wait_state
from tests.helpers.participant import Participant, effects
from tests.helpers.sagas import travel


def write_effect(key: str, log: list[str]) -> Callable[[sa.Connection], dict[str, str]]:
    def effect(conn: sa.Connection) -> dict[str, str]:
        log.append(key)
        conn.execute(
            effects.insert().values(
                key=key, saga_id="s", step="x", phase="action", attempt=1, at_ns=time.time_ns()
            )
        )
        return {"receipt": key.upper()}

    return effect


def test_the_effect_runs_once_per_key_and_replays_its_result(participant: Participant) -> None:
    guard = IdempotencyGuard(participant.db, "payments")
    ran: list[str] = []
    first = guard.run_once("k1", write_effect("k1", ran))
    again = guard.run_once("k1", write_effect("k1", ran))
    other = guard.run_once("k2", write_effect("k2", ran))
    assert first == again == {"receipt": "K1"}
    assert other == {"receipt": "K2"}
    assert ran == ["k1", "k2"]
    assert participant.effect_counts() == {"k1": 1, "k2": 1}
    assert guard.duplicates("k1") == 1
    assert guard.duplicates("k2") == 0
    assert guard.seen("k1") and not guard.seen("k3")


@pytest.mark.parametrize("result", [None, 0, "", [], {"receipt": None}])
def test_every_result_is_replayed_as_it_was(participant: Participant, result: object) -> None:
    guard = IdempotencyGuard(participant.db, "payments")
    ran: list[object] = []
    first = guard.run_once("k", lambda conn: ran.append(result) or result)
    assert guard.run_once("k", lambda conn: ran.append(result) or result) == first == result
    assert ran == [result]


def test_a_failing_effect_leaves_no_key_so_the_next_try_runs_it(participant: Participant) -> None:
    guard = IdempotencyGuard(participant.db, "payments")

    def broken(conn: sa.Connection) -> None:
        write_effect("k1", [])(conn)
        raise ConnectionError("card network down")

    with pytest.raises(ConnectionError):
        guard.run_once("k1", broken)
    assert not guard.seen("k1")
    assert participant.effect_counts() == {}
    guard.run_once("k1", write_effect("k1", []))
    assert participant.effect_counts() == {"k1": 1}


def test_the_guard_inside_a_rolled_back_transaction_forgets_the_key(
    participant: Participant,
) -> None:
    guard = IdempotencyGuard(participant.db, "payments")
    with pytest.raises(RuntimeError), participant.db.begin() as conn:
        guard.run_once_in(conn, "k1", write_effect("k1", []))
        raise RuntimeError("the caller's transaction failed")
    assert not guard.seen("k1")
    assert participant.effect_counts() == {}


def test_racing_calls_with_one_key_run_the_effect_once(participant: Participant) -> None:
    guard = IdempotencyGuard(participant.db, "payments")
    barrier = threading.Barrier(5)
    ran: list[str] = []
    results: list[object] = []

    def call() -> None:
        barrier.wait()
        results.append(guard.run_once("race", write_effect("race", ran)))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert ran == ["race"]
    assert results == [{"receipt": "RACE"}] * 5
    assert guard.duplicates("race") == 4


def test_a_redelivered_action_with_the_same_key_acts_once(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(travel(participant))
    started = engine.start("travel", {})
    run = Run(0, Phase.ACTION, 1)
    ctx = engine.executor.context(started.instance, run)
    assert ctx.idempotency_key == f"{started.id}:hotel:action"
    first = participant.action(ctx)
    second = participant.action(engine.executor.context(started.instance, Run(0, Phase.ACTION, 2)))
    assert first == second
    assert len(participant.calls(started.id)) == 2
    assert participant.effect_counts() == {ctx.idempotency_key: 1}


def test_a_worker_that_died_after_the_effect_is_taken_over_with_one_effect(
    engines: Engines, participant: Participant
) -> None:
    saga = travel(participant)
    engine = engines(saga)
    started = engine.start("travel", {})
    store = engine.store
    # A worker claims the instance with a short lease, begins the hotel step,
    # makes the participant act... and dies before recording anything.
    now = now_ms()
    held = store.claim(started.id, "doomed-worker", 300, now)
    assert held is not None
    run = Run(0, Phase.ACTION, 1)
    begun = store.save(
        held, begin_attempt(held, saga, run, now), "doomed-worker", owner="doomed-worker"
    )
    participant.action(engine.executor.context(begun, run))

    engines.worker(engine)  # the survivor: takes the instance once the lease expires
    done = wait_state(engine, started.id, SagaState.COMPLETED)
    assert done.steps[0].attempts == 2
    hotel_key = f"{started.id}:hotel:action"
    assert participant.effect_counts()[hotel_key] == 1
    assert [c.attempt for c in participant.calls(started.id) if c.step == "hotel"] == [1, 2]
    assert Queries(store).duplicates_absorbed([hotel_key]) == {hotel_key: 1}
    abandoned = [e for e in timeline(engine, started.id) if e.kind == "attempt_abandoned"]
    assert [(e.step_name, e.attempt, e.actor) for e in abandoned] == [("hotel", 1, "test-worker")]


# -- late actions are fenced ----------------------------------------------------------


def test_a_compensation_that_ran_first_fences_its_action(participant: Participant) -> None:
    guard = IdempotencyGuard(participant.db, "cars")
    before = metrics.total(
        metrics.values(metrics.exposition().decode()), "saga_actions_fenced_total"
    )
    ran: list[str] = []
    # The step's attempt timed out before the car desk acted; the saga compensated it.
    assert guard.run_once("s1:rent_car:compensate", lambda conn: "nothing to undo") == (
        "nothing to undo"
    )

    with pytest.raises(ActionFenced) as refused:
        guard.run_once("s1:rent_car:action", write_effect("s1:rent_car:action", ran))

    assert ran == []  # the late action did nothing
    assert participant.effect_counts() == {}
    assert refused.value.key == "s1:rent_car:action"
    assert isinstance(refused.value, NonRetryableError)
    assert guard.duplicates("s1:rent_car:action") == 0  # a refusal, not a duplicate
    after = metrics.total(
        metrics.values(metrics.exposition().decode()), "saga_actions_fenced_total"
    )
    assert after == before + 1
    # The compensation itself may be delivered again: it replays as before.
    assert guard.run_once("s1:rent_car:compensate", lambda conn: "again") == "nothing to undo"


def test_an_action_that_ran_is_not_fenced_by_its_compensation(participant: Participant) -> None:
    guard = IdempotencyGuard(participant.db, "cars")
    ran: list[str] = []
    first = guard.run_once("s2:rent_car:action", write_effect("s2:rent_car:action", ran))
    guard.run_once("s2:rent_car:compensate", lambda conn: "returned")
    # A repeat of the action (redelivered) replays what it did; nothing is refused.
    assert guard.run_once("s2:rent_car:action", write_effect("x", ran)) == first
    assert ran == ["s2:rent_car:action"]


@pytest.mark.parametrize("key", ["refund-42", "s3:rent_car:undo", ":compensate", "compensate"])
def test_keys_not_of_the_engines_form_fence_nothing(participant: Participant, key: str) -> None:
    guard = IdempotencyGuard(participant.db, "cars")
    guard.run_once(key, lambda conn: None)
    assert not guard.seen("s3:rent_car:action")


def test_a_late_local_action_after_its_compensation_leaves_no_orphan_effect(
    engines: Engines, participant: Participant
) -> None:
    # The car desk takes 1.5 s, over the step's 0.5 s timeout: the saga gives up on the car
    # (its outcome unknown) and compensates it, finding nothing to undo. The car desk's
    # thread then reaches its guard, which refuses the late action.
    guard = IdempotencyGuard(participant.db, "cars")
    rented: list[str] = []
    released = threading.Event()

    def rent_car(ctx: StepContext) -> dict[str, str]:
        released.wait(5)  # held until the compensation ran: the action is late for sure
        return guard.run_once(ctx.idempotency_key, write_effect(ctx.idempotency_key, rented))

    def return_car(ctx: StepContext, output: object) -> None:
        guard.run_once(ctx.idempotency_key, lambda conn: None)
        released.set()

    trip = Saga("late_car", default_timeout=timedelta(seconds=0.5), default_retry=NO_RETRY)
    trip.add_step("rent_car", rent_car, return_car)
    engine = engines(trip.validate())
    saga_id = engine.start("late_car", {}).id
    engines.worker(engine)
    wait_state(engine, saga_id, SagaState.COMPENSATED, timeout=20)

    refused = wait_for(lambda: late_outcome(engine, saga_id))
    assert "ActionFenced" in refused
    assert rented == []  # no car rented behind the saga's back
    assert participant.effect_counts() == {}


def late_outcome(engine: SagaEngine, saga_id: str) -> str | None:
    for event in Queries(engine.store).timeline(saga_id):
        why = (event.detail or {}).get("why", "")
        if event.kind == "result_discarded" and "after its deadline" in why:
            return str(why)
    return None
