"""End to end: a real engine, a real worker thread, a real store, small real delays.

Every scenario runs on SQLite and on PostgreSQL. What happened is read back
twice: from the participant's own records (effects, in the order they
happened) and from the engine's timeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import NO_RETRY, Saga, SagaState, StepStatus
from engine.queries import Queries
from engine.states import CompensationStatus
from tests.helpers.engines import Engines, kinds, timeline, wait_for, wait_state
from tests.helpers.participant import Participant
from tests.helpers.sagas import FLAKY, QUICK, ledger, mixed, order, travel

ACTIONS = [("hotel", "action"), ("flight", "action"), ("car", "action")]


def test_travel_booking_succeeds(engines: Engines, participant: Participant) -> None:
    engine = engines(travel(participant))
    engines.worker(engine)
    started = engine.start("travel", {"trip": "Lisbon"}, business_key="trip-1")
    done = wait_state(engine, started.id, SagaState.COMPLETED)
    assert participant.effects(started.id) == ACTIONS
    assert done.outputs() == {s: {"step": s, "phase": "action"} for s in ("hotel", "flight", "car")}
    events = timeline(engine, started.id)
    assert kinds(events) == [
        ("saga_started", None, None),
        ("attempt_started", "hotel", "action"),
        ("attempt_succeeded", "hotel", "action"),
        ("attempt_started", "flight", "action"),
        ("attempt_succeeded", "flight", "action"),
        ("attempt_started", "car", "action"),
        ("attempt_succeeded", "car", "action"),
        ("saga_completed", None, None),
    ]
    assert {e.correlation_id for e in events} == {done.correlation_id}
    assert {e.actor for e in events[1:]} == {"test-worker"}
    assert [e.at for e in events] == sorted(e.at for e in events)


def test_travel_booking_inline_with_run(engines: Engines, participant: Participant) -> None:
    engine = engines(travel(participant))
    done = engine.run("travel", {"trip": "Porto"}, correlation_id="corr-42")
    assert done.state is SagaState.COMPLETED
    assert done.lease_owner is None
    assert engine.get(done.id) == done
    assert participant.effects(done.id) == ACTIONS
    assert {e.correlation_id for e in timeline(engine, done.id)} == {"corr-42"}


def test_car_fails_for_good_so_everything_is_undone_in_reverse(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(travel(participant))
    engines.worker(engine)
    started = engine.start("travel", {"fail": {"car": "always"}})
    done = wait_state(engine, started.id, SagaState.COMPENSATED)
    # The car's action started (and failed), so its outcome is undone too.
    assert participant.effects(started.id) == [
        ("hotel", "action"),
        ("flight", "action"),
        ("car", "compensate"),
        ("flight", "compensate"),
        ("hotel", "compensate"),
    ]
    assert done.steps[2].status is StepStatus.FAILED
    assert done.steps[2].attempts == QUICK.max_attempts
    assert all(s.comp_status is CompensationStatus.COMPENSATED for s in done.steps)
    events = timeline(engine, started.id)
    undone = [
        e.step_name for e in events if e.kind == "attempt_succeeded" and e.phase == "compensate"
    ]
    assert undone == ["car", "flight", "hotel"]
    failed = [e for e in events if e.kind == "attempt_failed"]
    assert [e.attempt for e in failed] == [1, 2, 3]
    assert all("car refused attempt" in (e.error or "") for e in failed)
    assert all("StepFailed" in (e.traceback or "") for e in failed)
    step_failed = events.index(next(e for e in events if e.kind == "step_failed"))
    assert events[step_failed + 1].kind == "compensation_started"
    assert events[-1].kind == "saga_compensated"


def test_a_step_that_times_out_is_compensated(engines: Engines, participant: Participant) -> None:
    saga = travel(participant, timeouts={"flight": 0.3}, retries={"flight": NO_RETRY})
    engine = engines(saga)
    engines.worker(engine)
    started = engine.start("travel", {"sleep": {"flight": 1.2}})
    done = wait_state(engine, started.id, SagaState.COMPENSATED)
    assert done.steps[1].status is StepStatus.TIMED_OUT
    assert done.steps[2].attempts == 0
    assert [e for e in participant.effects(started.id) if e[1] == "compensate"] == [
        ("flight", "compensate"),
        ("hotel", "compensate"),
    ]
    events = timeline(engine, started.id)
    [timed_out] = [e for e in events if e.kind == "attempt_timed_out"]
    assert (timed_out.step_name, timed_out.attempt) == ("flight", 1)
    assert "timed out after 0.3s" in (timed_out.error or "")

    # The attempt's late result arrives after its deadline and is recorded as discarded.
    def discarded() -> list[object]:
        return [
            e
            for e in timeline(engine, started.id)
            if e.kind == "result_discarded" and e.step_name == "flight"
        ]

    [late] = wait_for(discarded)
    assert "after its deadline" in late.detail["why"]
    assert engine.get(started.id).state is SagaState.COMPENSATED  # nothing changed


def test_a_flaky_step_succeeds_on_attempt_3_after_its_backoff(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(travel(participant, retries={"flight": FLAKY}))
    engines.worker(engine)
    started = engine.start("travel", {"fail": {"flight": 2}})
    done = wait_state(engine, started.id, SagaState.COMPLETED)
    assert done.steps[1].attempts == 3
    assert participant.effect_attempts(started.id)[1] == ("flight", "action", 3)
    flight = [e for e in timeline(engine, started.id) if e.step_name == "flight"]
    assert [(e.kind, e.attempt) for e in flight] == [
        ("attempt_started", 1),
        ("attempt_failed", 1),
        ("attempt_started", 2),
        ("attempt_failed", 2),
        ("attempt_started", 3),
        ("attempt_succeeded", 3),
    ]
    initial = FLAKY.initial_delay.total_seconds() * 1000
    for n, (failed, retried) in enumerate([(flight[1], flight[2]), (flight[3], flight[4])]):
        delay = initial * FLAKY.backoff**n
        retry_at = failed.detail["retry_at"]  # type: ignore[index]
        assert retry_at - failed.at >= delay * (1 - FLAKY.jitter)
        assert retried.at >= retry_at  # the worker waited for the backoff
        assert retried.at - failed.at >= delay * (1 - FLAKY.jitter)


def test_a_compensation_that_keeps_failing_dead_letters_until_an_operator_retries(
    engines: Engines, participant: Participant, tmp_path: Path
) -> None:
    fault = tmp_path / "refund-api-down"
    fault.touch()
    engine = engines(travel(participant))
    engines.worker(engine)
    started = engine.start(
        "travel", {"fail": {"car": "always"}, "comp_fail_while": {"flight": str(fault)}}
    )
    failed = wait_state(engine, started.id, SagaState.FAILED)
    assert failed.steps[1].comp_status is CompensationStatus.FAILED
    assert failed.steps[0].comp_status is CompensationStatus.PENDING
    [letter] = Queries(engine.store).dead_letters(saga_id=started.id)
    assert (letter.step_name, letter.phase, letter.attempts) == ("flight", "compensate", 3)
    assert "compensation refused while" in letter.error
    assert letter.traceback is not None and "StepFailed" in letter.traceback
    assert "Traceback (most recent call last)" in letter.traceback
    assert timeline(engine, started.id)[-1].kind == "dead_lettered"

    fault.unlink()
    engine.operations.retry(
        started.id, actor="ann", reason="the refund API is back", expected_version=failed.version
    )
    done = wait_state(engine, started.id, SagaState.COMPENSATED)
    assert all(s.comp_status is CompensationStatus.COMPENSATED for s in done.steps)
    assert [e for e in participant.effects(started.id) if e[1] == "compensate"] == [
        ("car", "compensate"),
        ("flight", "compensate"),
        ("hotel", "compensate"),
    ]
    assert Queries(engine.store).dead_letters(saga_id=started.id) == []
    [resolved] = Queries(engine.store).dead_letters(saga_id=started.id, open_only=False)
    assert resolved.resolution == "retry"


def test_a_step_that_runs_again_after_acting_has_one_effect(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(travel(participant))
    engines.worker(engine)
    # The hotel acts, then its reply is lost: the engine runs it again, same key.
    started = engine.start("travel", {"crash_after": {"hotel": 1}})
    wait_state(engine, started.id, SagaState.COMPLETED)
    hotel_key = f"{started.id}:hotel:action"
    assert [c.attempt for c in participant.calls(started.id) if c.step == "hotel"] == [1, 2]
    assert participant.effect_counts()[hotel_key] == 1
    assert Queries(engine.store).duplicates_absorbed([hotel_key]) == {hotel_key: 1}
    assert participant.effects(started.id) == ACTIONS


def test_a_duplicate_start_returns_the_same_instance(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(travel(participant))
    first = engine.start("travel", {"n": 1}, idempotency_key="booking-9")
    again = engine.start("travel", {"n": 2}, idempotency_key="booking-9")
    assert first.created and not again.created
    assert again.id == first.id
    assert again.instance.payload == {"n": 1}
    inline = engine.run("travel", {"n": 3}, idempotency_key="booking-9")
    assert inline.id == first.id
    engines.worker(engine)
    wait_state(engine, first.id, SagaState.COMPLETED)
    assert Queries(engine.store).counts_by_state()["completed"] == 1
    assert participant.effects() == ACTIONS  # one saga ran, once


def test_a_duplicate_inline_run_returns_the_same_instance(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(travel(participant))
    first = engine.run("travel", {}, idempotency_key="booking-10")
    again = engine.run("travel", {}, idempotency_key="booking-10")
    assert again.id == first.id
    assert again.state is SagaState.COMPLETED
    assert participant.effects() == ACTIONS


def test_transactional_steps_commit_effect_and_result_together(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(ledger(participant))
    done = engine.run("ledger", {})
    assert done.state is SagaState.COMPLETED
    assert participant.effect_attempts(done.id) == [("debit", "action", 1), ("credit", "action", 1)]
    assert done.outputs() == {"debit": {"step": "debit"}, "credit": {"step": "credit"}}


def test_a_transactional_step_failing_after_its_write_rolls_the_write_back(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(ledger(participant))
    engines.worker(engine)
    started = engine.start("ledger", {"crash_after": {"debit": 1}})
    done = wait_state(engine, started.id, SagaState.COMPLETED)
    # Attempt 1 wrote, then failed: its write went with it. Attempt 2's write stayed.
    assert participant.effect_attempts(started.id) == [
        ("debit", "action", 2),
        ("credit", "action", 1),
    ]
    assert done.steps[0].attempts == 2
    assert [(e.kind, e.attempt) for e in timeline(engine, started.id) if e.step_name == "debit"][
        -3:
    ] == [("attempt_failed", 1), ("attempt_started", 2), ("attempt_succeeded", 2)]


def test_a_transactional_step_whose_result_cannot_be_stored_leaves_no_effect(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(ledger(participant))
    done = engine.run("ledger", {"not_json": {"credit": True}})
    assert done.state is SagaState.COMPENSATED
    assert done.steps[1].status is StepStatus.FAILED
    assert done.steps[1].attempts == 1  # bad output never improves by retrying
    assert "not JSON" in (done.steps[1].error or "") or "JSON" in (done.steps[1].error or "")
    assert participant.effect_attempts(done.id) == [("debit", "action", 1)]


def test_a_step_longer_than_the_lease_keeps_it_by_heartbeat(
    engines: Engines, participant: Participant
) -> None:
    saga = travel(participant)
    busy = engines(saga, worker_id="busy", lease_seconds=0.6)
    rival = engines(saga, worker_id="rival", lease_seconds=0.6)
    engines.worker(busy)
    engines.worker(rival)  # polls all along, and would take an expired lease
    started = busy.start("travel", {"sleep": {"hotel": 1.5}})
    done = wait_state(busy, started.id, SagaState.COMPLETED)
    assert done.steps[0].attempts == 1
    assert [c.attempt for c in participant.calls(started.id) if c.step == "hotel"] == [1]
    kinds_seen = {e.kind for e in timeline(busy, started.id)}
    assert "attempt_abandoned" not in kinds_seen
    assert "result_discarded" not in kinds_seen


@pytest.mark.parametrize(
    ("output", "words"),
    [
        ({"when": object()}, "not JSON"),
        ({"note": "a\x00b"}, "NUL character"),
    ],
)
def test_a_step_whose_output_cannot_be_stored_fails_without_retrying(
    engines: Engines, output: object, words: str
) -> None:
    saga = Saga("odd_output", default_retry=QUICK)
    undone: list[str] = []
    saga.add_step("first", lambda ctx: {"ok": True}, lambda ctx, out: undone.append("first"))
    saga.add_step("second", lambda ctx: output)
    engine = engines(saga)
    done = engine.run("odd_output", {})
    assert done.state is SagaState.COMPENSATED
    assert done.steps[1].status is StepStatus.FAILED
    assert done.steps[1].attempts == 1
    assert words in (done.steps[1].error or "")
    assert undone == ["first"]


def test_an_inline_run_that_must_wait_releases_its_lease(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(travel(participant))
    inst = engine.run("travel", {"fail": {"hotel": 1}})
    assert inst.state is SagaState.RUNNING
    assert inst.lease_owner is None
    assert engine.get(inst.id).lease_owner is None  # any worker may take the retry
    engines.worker(engine)
    wait_state(engine, inst.id, SagaState.COMPLETED)


def test_an_instance_keeps_the_version_of_the_saga_it_started_on(
    engines: Engines, participant: Participant
) -> None:
    old = travel(participant)
    starter = engines(old)
    started = starter.start("travel", {})
    new = Saga("travel", version=2, default_retry=QUICK)
    new.add_step("train", participant.action, participant.compensation)
    engine = engines(old, new)
    assert engine.start("travel", {}).instance.saga_version == 2
    engines.worker(engine)
    done = wait_state(engine, started.id, SagaState.COMPLETED)
    assert (done.saga_version, [s.name for s in done.steps]) == (1, ["hotel", "flight", "car"])
    assert participant.effects(started.id) == ACTIONS


def test_stopping_a_worker_drains_it_and_leaves_no_lease_behind(
    engines: Engines, participant: Participant, tmp_path: Path
) -> None:
    import threading

    engine = engines(travel(participant))
    worker = engine.worker(2).start()
    gate = tmp_path / "hotel-busy"
    gate.touch()
    started = engine.start("travel", {"block_while": {"hotel": str(gate)}})
    wait_for(lambda: participant.effects(started.id))
    result: list[bool] = []
    stopper = threading.Thread(target=lambda: result.append(worker.stop(timeout=20)))
    stopper.start()
    gate.unlink()
    stopper.join()
    assert result == [True]
    inst = engine.get(started.id)
    assert inst.lease_owner is None
    assert inst.steps[0].status is StepStatus.SUCCEEDED  # the step in flight was finished
    assert all(s.status is not StepStatus.RUNNING for s in inst.steps)


def test_after_the_pivot_a_failing_step_dead_letters_and_never_compensates(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(order(participant))
    engines.worker(engine)
    started = engine.start("order", {"fail": {"ship": "always"}})
    failed = wait_state(engine, started.id, SagaState.FAILED)
    assert failed.steps[2].attempts == QUICK.max_attempts
    assert participant.effects(started.id) == [("reserve", "action"), ("charge", "action")]
    [letter] = Queries(engine.store).dead_letters(saga_id=started.id)
    assert (letter.step_name, letter.phase) == ("ship", "action")
    assert "compensation_started" not in {e.kind for e in timeline(engine, started.id)}
    done = engine.operations.skip(started.id, actor="ann", reason="shipped by hand")
    assert done.state is SagaState.COMPLETED
    assert participant.effects(started.id) == [("reserve", "action"), ("charge", "action")]


def test_a_duplicate_inline_run_of_transactional_steps_has_one_effect(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(ledger(participant))
    first = engine.run("ledger", {}, idempotency_key="transfer-1")
    again = engine.run("ledger", {}, idempotency_key="transfer-1")
    assert again.id == first.id
    assert again.state is SagaState.COMPLETED
    assert participant.effect_attempts(first.id) == [
        ("debit", "action", 1),
        ("credit", "action", 1),
    ]
    assert Queries(engine.store).counts_by_state()["completed"] == 1


@pytest.mark.parametrize("how", ["run", "worker"])
def test_mixed_steps_compensate_in_reverse_across_both_kinds(
    engines: Engines, participant: Participant, how: str
) -> None:
    engine = engines(mixed(participant))
    payload = {"fail": {"car": "always"}}
    if how == "run":
        inst = engine.run("mixed", payload)
        saga_id = inst.id
        engines.worker(engine)  # the car's retries wait; a worker takes them
    else:
        engines.worker(engine)
        saga_id = engine.start("mixed", payload).id
    done = wait_state(engine, saga_id, SagaState.COMPENSATED)
    assert participant.effects(saga_id) == [
        ("hotel", "action"),
        ("debit", "action"),
        ("points", "action"),
        ("car", "compensate"),
        ("points", "compensate"),
        ("debit", "compensate"),
        ("hotel", "compensate"),
    ]
    assert all(s.comp_status is CompensationStatus.COMPENSATED for s in done.steps)


def test_a_transactional_step_failing_for_good_rolls_back_and_compensates(
    engines: Engines, participant: Participant
) -> None:
    engine = engines(mixed(participant))
    engines.worker(engine)
    started = engine.start("mixed", {"fail": {"points": "always"}})
    done = wait_state(engine, started.id, SagaState.COMPENSATED)
    assert done.steps[2].attempts == QUICK.max_attempts
    # Every points attempt wrote, failed and was rolled back; then points itself is
    # compensated (its action started), then debit, then hotel.
    assert participant.effects(started.id) == [
        ("hotel", "action"),
        ("debit", "action"),
        ("points", "compensate"),
        ("debit", "compensate"),
        ("hotel", "compensate"),
    ]


def test_instances_of_a_saga_this_worker_does_not_know_do_not_starve_the_rest(
    engines: Engines, participant: Participant
) -> None:
    other = Saga("other_team", default_retry=QUICK)
    other.add_step("theirs", participant.action)
    elsewhere = engines(other, worker_id="elsewhere")
    foreign = [elsewhere.start("other_team", {}).id for _ in range(3)]  # nobody here runs these
    engine = engines(travel(participant))
    engines.worker(engine, concurrency=2)
    # The hotel's retry is found only by polling the store, behind the foreign instances.
    started = engine.start("travel", {"fail": {"hotel": 1}})
    wait_state(engine, started.id, SagaState.COMPLETED)
    assert all(engine.get(i).state is SagaState.RUNNING for i in foreign)
