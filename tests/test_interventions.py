"""Operator rules, pure: every action in every state is either allowed or clearly refused."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest

from engine.decide import Idle, Run, Wait, decide
from engine.definition import Retry
from engine.errors import InvalidTransition
from engine.interventions import Action, allowed_actions, apply
from engine.model import EventKind, Instance
from engine.states import CompensationStatus, Phase, SagaState, StepStatus
from tests.helpers.pure import TIMEOUT, Driver, driver, fail

S, C = StepStatus, CompensationStatus
RETRY = Retry(max_attempts=2, initial_delay=timedelta(seconds=1), jitter=0.0)


def base() -> Driver:
    """Hotel, flight (compensatable), charge (pivot), ship (retriable)."""
    return driver("ccpr", retry=RETRY, comp_retry=RETRY)


def running_fresh(d: Driver) -> None:
    return None


def running_waiting(d: Driver) -> None:
    d.step()
    d.step(fail())


def running_in_flight(d: Driver) -> None:
    d.step()
    d.begin()


def running_at_pivot(d: Driver) -> None:
    d.step()
    d.step()
    d.step(fail())


def running_past_pivot(d: Driver) -> None:
    for _ in range(3):
        d.step()
    d.step(fail())


def compensating_waiting(d: Driver) -> None:
    d.step()
    d.step(fail())
    d.step(fail())
    d.step(fail())


def compensating_in_flight(d: Driver) -> None:
    d.step()
    d.step(fail())
    d.step(fail())
    d.begin()


def failed_compensation(d: Driver) -> None:
    compensating_waiting(d)
    d.step(fail("refund api down"))


def failed_after_pivot(d: Driver) -> None:
    for _ in range(3):
        d.step()
    d.step(fail("warehouse down"))
    d.step(fail("warehouse down"))


def failed_pivot_unknown(d: Driver) -> None:
    d.step()
    d.step()
    d.step(TIMEOUT)
    d.step(TIMEOUT)


def completed(d: Driver) -> None:
    for _ in range(4):
        d.step()


def compensated(d: Driver) -> None:
    d.step()
    d.step(fail(retryable=False))
    d.step()
    d.step()


def cancelled(d: Driver) -> None:
    d.step()
    d.apply(apply(Action.CANCEL, d.inst, d.defn, d.now))


ALL = set(Action)
NOT_FORWARD = {Action.RETRY, Action.SKIP, Action.CANCEL}
SITUATIONS: dict[str, tuple[Callable[[Driver], None], SagaState, set[Action]]] = {
    "running_fresh": (running_fresh, SagaState.RUNNING, ALL),
    "running_waiting": (running_waiting, SagaState.RUNNING, ALL),
    "running_in_flight": (running_in_flight, SagaState.RUNNING, {Action.COMPENSATE, Action.CANCEL}),
    "running_at_pivot": (running_at_pivot, SagaState.RUNNING, ALL),
    "running_past_pivot": (running_past_pivot, SagaState.RUNNING, NOT_FORWARD),
    "compensating_waiting": (compensating_waiting, SagaState.COMPENSATING, NOT_FORWARD),
    "compensating_in_flight": (compensating_in_flight, SagaState.COMPENSATING, {Action.CANCEL}),
    "failed_compensation": (failed_compensation, SagaState.FAILED, NOT_FORWARD),
    "failed_after_pivot": (failed_after_pivot, SagaState.FAILED, NOT_FORWARD),
    "failed_pivot_unknown": (failed_pivot_unknown, SagaState.FAILED, ALL),
    "completed": (completed, SagaState.COMPLETED, set()),
    "compensated": (compensated, SagaState.COMPENSATED, set()),
    "cancelled": (cancelled, SagaState.CANCELLED, set()),
}


def situation(name: str) -> Driver:
    setup, state, _ = SITUATIONS[name]
    d = base()
    setup(d)
    assert d.inst.state is state, name
    return d


REFUSALS = {
    "it has already finished",
    "is running now; wait for its outcome or its deadline, or force-compensate or cancel",
    "it is already compensating; retry or skip the compensation",
    "it passed its pivot step 's2' and can only move forward",
}


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("name", list(SITUATIONS))
def test_every_action_in_every_state(name: str, action: Action) -> None:
    d = situation(name)
    _, state, allowed = SITUATIONS[name]
    if action in allowed:
        tr = apply(action, d.inst, d.defn, d.now)
        assert tr.events[0].kind is EventKind(f"operator_{action}")
        assert tr.events[0].detail == {"state_before": str(state)}
        assert tr.resolves_dead_letter is (state is SagaState.FAILED)
        assert tr.dead_letter is None
        return
    with pytest.raises(InvalidTransition) as err:
        apply(action, d.inst, d.defn, d.now)
    verb = {"skip": "skip a step of"}.get(str(action), str(action))
    assert str(err.value).startswith(f"cannot {verb} saga saga-1 while it is {state}: ")
    assert any(reason in str(err.value) for reason in REFUSALS), str(err.value)
    assert (err.value.saga_id, err.value.state) == ("saga-1", state)


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_allowed_actions_lists_exactly_what_apply_accepts(name: str) -> None:
    d = situation(name)
    assert set(allowed_actions(d.inst, d.defn, d.now)) == SITUATIONS[name][2]


# -- what each action does ---------------------------------------------------------------


def test_retry_after_a_post_pivot_dead_letter_gets_a_fresh_budget() -> None:
    d = situation("failed_after_pivot")
    assert d.inst.steps[3].attempts == 2
    d.apply(apply(Action.RETRY, d.inst, d.defn, d.now))
    assert d.inst.state is SagaState.RUNNING
    assert d.inst.next_run_at == d.now  # now, ignoring any backoff
    assert decide(d.inst, d.now) == Run(3, Phase.ACTION, 3)  # attempt numbers keep counting
    d.step(fail())
    assert d.inst.state is SagaState.RUNNING  # one of two fresh attempts used: wait, retry
    assert isinstance(decide(d.inst, d.now), Wait)
    tr = d.step(fail())
    assert d.inst.state is SagaState.FAILED
    assert tr.dead_letter is not None and tr.dead_letter.attempts == 4


def test_retry_then_success_completes() -> None:
    d = situation("failed_after_pivot")
    d.apply(apply(Action.RETRY, d.inst, d.defn, d.now))
    d.step()
    assert d.inst.state is SagaState.COMPLETED


def test_retry_of_a_dead_lettered_compensation_resumes_compensating() -> None:
    d = situation("failed_compensation")
    tr = d.apply(apply(Action.RETRY, d.inst, d.defn, d.now))
    assert tr.resolves_dead_letter
    assert d.inst.state is SagaState.COMPENSATING
    assert d.inst.steps[1].comp_status is C.PENDING
    assert decide(d.inst, d.now) == Run(1, Phase.COMPENSATE, 3)
    d.step(fail())  # a fresh budget: this failure waits instead of dead-lettering
    assert d.inst.state is SagaState.COMPENSATING
    d.step()
    d.step()
    assert d.comp_runs()[-2:] == [1, 0]
    assert d.inst.state is SagaState.COMPENSATED


def test_retry_while_waiting_runs_now() -> None:
    d = situation("running_waiting")
    assert d.inst.next_run_at is not None and d.inst.next_run_at > d.now
    tr = d.apply(apply(Action.RETRY, d.inst, d.defn, d.now))
    assert not tr.resolves_dead_letter
    assert decide(d.inst, d.now) == Run(1, Phase.ACTION, 2)


def test_skip_marks_the_step_done_and_goes_on() -> None:
    d = situation("running_waiting")
    d.apply(apply(Action.SKIP, d.inst, d.defn, d.now))
    assert d.inst.steps[1].status is S.SKIPPED
    assert d.inst.cursor == 2
    assert decide(d.inst, d.now) == Run(2, Phase.ACTION, 1)


def test_skip_of_the_failed_last_step_completes() -> None:
    d = situation("failed_after_pivot")
    tr = d.apply(apply(Action.SKIP, d.inst, d.defn, d.now))
    assert d.inst.state is SagaState.COMPLETED
    assert [e.kind for e in tr.events] == [EventKind.OPERATOR_SKIP, EventKind.SAGA_COMPLETED]
    assert tr.resolves_dead_letter


def test_skip_of_a_dead_lettered_compensation_goes_on_undoing() -> None:
    d = situation("failed_compensation")
    d.apply(apply(Action.SKIP, d.inst, d.defn, d.now))
    assert d.inst.steps[1].comp_status is C.SKIPPED
    assert d.inst.state is SagaState.COMPENSATING
    assert decide(d.inst, d.now) == Run(0, Phase.COMPENSATE, 1)


def test_skip_of_an_unknown_pivot_goes_forward() -> None:
    d = situation("failed_pivot_unknown")
    d.apply(apply(Action.SKIP, d.inst, d.defn, d.now))
    assert d.inst.state is SagaState.RUNNING
    assert decide(d.inst, d.now) == Run(3, Phase.ACTION, 1)


def test_force_compensate_stops_an_attempt_in_flight_and_undoes_it() -> None:
    d = situation("running_in_flight")
    tr = d.apply(apply(Action.COMPENSATE, d.inst, d.defn, d.now))
    assert tr.events[0].kind is EventKind.OPERATOR_COMPENSATE
    assert EventKind.COMPENSATION_STARTED in [e.kind for e in tr.events]
    assert d.inst.steps[1].status is S.TIMED_OUT  # its outcome is unknown
    assert d.inst.state is SagaState.COMPENSATING
    while d.inst.state is SagaState.COMPENSATING:
        d.step()
    assert d.comp_runs() == [1, 0]
    assert d.inst.state is SagaState.COMPENSATED


def test_force_compensate_at_an_unknown_pivot_undoes_the_steps_before_it() -> None:
    d = situation("failed_pivot_unknown")
    d.apply(apply(Action.COMPENSATE, d.inst, d.defn, d.now))
    while d.inst.state is SagaState.COMPENSATING:
        d.step()
    assert d.comp_runs() == [1, 0]
    assert d.inst.steps[2].comp_status is C.NOT_NEEDED


def test_force_compensate_of_a_fresh_instance_has_nothing_to_undo() -> None:
    d = situation("running_fresh")
    d.apply(apply(Action.COMPENSATE, d.inst, d.defn, d.now))
    assert d.inst.state is SagaState.COMPENSATED


@pytest.mark.parametrize(
    "name",
    ["running_in_flight", "compensating_in_flight", "failed_compensation", "running_waiting"],
)
def test_cancel_stops_where_it_stands(name: str) -> None:
    d = situation(name)
    before: Instance = d.inst
    tr = d.apply(apply(Action.CANCEL, d.inst, d.defn, d.now))
    assert d.inst.state is SagaState.CANCELLED
    assert d.inst.next_run_at is None
    assert isinstance(decide(d.inst, d.now), Idle)
    assert [e.kind for e in tr.events] == [EventKind.OPERATOR_CANCEL]
    # Nothing is undone by a cancel.
    assert [s.comp_status for s in d.inst.steps] == [s.comp_status for s in before.steps]
    if name == "running_in_flight":
        assert d.inst.steps[1].status is S.TIMED_OUT
