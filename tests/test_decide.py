"""The pure decide core, without I/O: every reachable snapshot, every outcome.

``REACHABLE`` spells out which (state, step kind, step status, compensation
status) combinations can occur for the current step; the exhaustive test
checks :func:`decide` on each of them, and the property test at the end
checks that every snapshot a random run visits is one of them, so the table
really covers what can happen.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.decide import Idle, Recover, Run, Wait, begin_attempt, decide, record_failure
from engine.definition import Retry
from engine.model import EventKind, Instance
from engine.states import CompensationStatus, Phase, SagaState, StepKind, StepStatus
from tests.helpers.pure import (
    ABANDONED,
    FAST,
    T0,
    TIMEOUT,
    Driver,
    at,
    build_saga,
    driver,
    fail,
    new_instance,
)

S, C = StepStatus, CompensationStatus

# -- which snapshots can occur ---------------------------------------------------

FORWARD_STATUSES = {S.PENDING, S.RUNNING}
UNDONE_STATUSES = {S.SUCCEEDED, S.FAILED, S.TIMED_OUT, S.SKIPPED, S.PENDING}


def reachable(
    state: SagaState, kind: StepKind, status: StepStatus, comp: CompensationStatus
) -> bool:
    """Whether the current step of an instance in ``state`` can look like this."""
    if state is SagaState.RUNNING:
        return status in FORWARD_STATUSES and comp is C.NOT_NEEDED
    if state is SagaState.COMPENSATING:
        # Only a compensatable step whose action started is ever compensated.
        return (
            kind is StepKind.COMPENSATABLE
            and status in UNDONE_STATUSES
            and comp in (C.PENDING, C.RUNNING)
        )
    if state is SagaState.FAILED:
        action_side = comp is C.NOT_NEEDED and (
            (kind is StepKind.RETRIABLE and status in (S.FAILED, S.TIMED_OUT))
            or (kind is StepKind.PIVOT and status is S.TIMED_OUT)
        )
        comp_side = (
            kind is StepKind.COMPENSATABLE and comp is C.FAILED and status in UNDONE_STATUSES
        )
        return action_side or comp_side
    return True  # a final instance may stop anywhere (cancel)


def snapshot(
    state: SagaState,
    kind: StepKind,
    status: StepStatus,
    comp: CompensationStatus,
    next_run_at: int | None,
) -> Instance:
    """An instance whose current step (in the middle of "cpr") has this kind and status."""
    shape = {StepKind.COMPENSATABLE: "cccpr", StepKind.PIVOT: "ccpr", StepKind.RETRIABLE: "cpr"}
    defn = build_saga(shape[kind])
    index = [s.kind for s in defn.steps].index(kind) + (1 if kind is StepKind.COMPENSATABLE else 0)
    inst = new_instance(defn)
    for i in range(index):
        inst = at(inst, i, status=S.SUCCEEDED, attempts=1)
    started = status is not S.PENDING or comp is not C.NOT_NEEDED
    inst = at(
        inst,
        index,
        status=status,
        comp_status=comp,
        attempts=2 if started else 0,
        comp_attempts=1 if comp is not C.NOT_NEEDED else 0,
    )
    if state is SagaState.COMPENSATING:
        for i in range(index):
            inst = at(inst, i, comp_status=C.PENDING)
    return replace(inst, state=state, cursor=index, next_run_at=next_run_at)


COMBOS = [
    combo
    for combo in itertools.product(SagaState, StepKind, StepStatus, CompensationStatus)
    if reachable(*combo)
]
NOW = T0 + 5_000


def expected(
    state: SagaState,
    status: StepStatus,
    comp: CompensationStatus,
    next_run_at: int | None,
    inst: Instance,
) -> object:
    """What the semantics say a worker holding the lease must do."""
    if state.is_final or state is SagaState.FAILED:
        return Idle
    phase = Phase.COMPENSATE if state is SagaState.COMPENSATING else Phase.ACTION
    if (status if phase is Phase.ACTION else comp) in (S.RUNNING, C.RUNNING):
        return Recover(inst.cursor, phase)
    if next_run_at is not None and next_run_at > NOW:
        return Wait(next_run_at)
    return Run(inst.cursor, phase, inst.current.attempts_of(phase) + 1)


def test_the_table_covers_every_state_and_kind() -> None:
    assert {c[0] for c in COMBOS} == set(SagaState)
    assert {c[1] for c in COMBOS} == set(StepKind)
    assert len(COMBOS) > 100


@pytest.mark.parametrize(
    ("state", "kind", "status", "comp"), COMBOS, ids=["-".join(map(str, c)) for c in COMBOS]
)
def test_decide_on_every_reachable_snapshot(
    state: SagaState, kind: StepKind, status: StepStatus, comp: CompensationStatus
) -> None:
    for next_run_at in (None, NOW - 1, NOW, NOW + 1):
        inst = snapshot(state, kind, status, comp, next_run_at)
        want = expected(state, status, comp, next_run_at, inst)
        got = decide(inst, NOW)
        if want is Idle:
            assert isinstance(got, Idle)
            assert str(state) in got.reason or "operator" in got.reason
        else:
            assert got == want, next_run_at


def test_idle_reasons_say_why() -> None:
    inst = new_instance(build_saga("c"))
    assert decide(replace(inst, state=SagaState.FAILED), NOW) == Idle(
        "dead-lettered: waits for an operator"
    )
    assert decide(replace(inst, state=SagaState.COMPLETED), NOW) == Idle("saga is completed")


# -- begin_attempt -------------------------------------------------------------------


@pytest.mark.parametrize("phase", list(Phase))
def test_begin_attempt_stores_the_deadline(phase: Phase) -> None:
    defn = build_saga("cc", timeout=timedelta(seconds=7))
    inst = new_instance(defn)
    if phase is Phase.COMPENSATE:
        inst = replace(
            at(inst, 0, status=S.SUCCEEDED, attempts=1, comp_status=C.PENDING),
            state=SagaState.COMPENSATING,
        )
    tr = begin_attempt(inst, defn, Run(0, phase, 1), T0)
    step = tr.instance.steps[0]
    deadline = T0 + 7_000
    if phase is Phase.ACTION:
        assert (step.status, step.attempts, step.started_at, step.deadline_at) == (
            S.RUNNING,
            1,
            T0,
            deadline,
        )
    else:
        assert (
            step.comp_status,
            step.comp_attempts,
            step.comp_started_at,
            step.comp_deadline_at,
        ) == (C.RUNNING, 1, T0, deadline)
    assert tr.instance.next_run_at == deadline  # the sweep finds it when the deadline passes
    [event] = tr.events
    assert (event.kind, event.step_index, event.phase, event.attempt) == (
        EventKind.ATTEMPT_STARTED,
        0,
        phase,
        1,
    )
    assert event.detail == {"deadline_at": deadline}


# -- record_success --------------------------------------------------------------------


def test_success_moves_to_the_next_step() -> None:
    d = driver("cc")
    tr = d.step()
    assert d.inst.state is SagaState.RUNNING
    assert d.inst.cursor == 1
    assert d.inst.steps[0].status is S.SUCCEEDED
    assert d.inst.steps[0].output == {"n": 1}
    assert d.inst.next_run_at == d.now
    assert [e.kind for e in tr.events] == [EventKind.ATTEMPT_SUCCEEDED]
    assert tr.events[0].detail == {"duration_ms": 10}
    assert d.inst.outputs() == {"s0": {"n": 1}}


def test_success_of_the_last_step_completes_the_saga() -> None:
    d = driver("cpr")
    d.step()
    d.step()
    tr = d.step()
    assert d.inst.state is SagaState.COMPLETED
    assert d.inst.next_run_at is None
    assert [e.kind for e in tr.events] == [EventKind.ATTEMPT_SUCCEEDED, EventKind.SAGA_COMPLETED]
    assert isinstance(decide(d.inst, d.now), Idle)


# -- record_failure: forward ------------------------------------------------------------


def test_failure_within_budget_waits_with_backoff() -> None:
    d = driver(
        "c",
        retry=Retry(
            max_attempts=3, initial_delay=timedelta(milliseconds=100), backoff=2.0, jitter=0.0
        ),
    )
    tr = d.step(fail("nope"))
    assert d.inst.state is SagaState.RUNNING
    assert d.inst.steps[0].status is S.PENDING
    assert d.inst.steps[0].error == "nope"
    assert d.inst.next_run_at == d.now + 100
    [event] = tr.events
    assert (event.kind, event.attempt, event.error, event.traceback) == (
        EventKind.ATTEMPT_FAILED,
        1,
        "nope",
        "Traceback: ...",
    )
    assert event.detail == {"retry_at": d.now + 100}
    assert decide(d.inst, d.now) == Wait(d.now + 100)
    assert decide(d.inst, d.now + 100) == Run(0, Phase.ACTION, 2)
    d.step(fail())
    assert d.inst.next_run_at == d.now + 200  # the second wait is twice the first


def test_jitter_moves_the_retry_time_within_its_bounds() -> None:
    policy = Retry(max_attempts=2, initial_delay=timedelta(seconds=1), jitter=0.2)
    waits = []
    for rand in (0.0, 0.5, 0.999):
        d = driver("c", retry=policy)
        d.rand = rand
        d.step(fail())
        assert d.inst.next_run_at is not None
        waits.append(d.inst.next_run_at - d.now)
    assert waits[0] == 800 and waits[1] == 1000 and 1190 <= waits[2] <= 1200


def test_exhausted_retries_compensate_every_started_step_in_reverse_order() -> None:
    d = driver("cccc")
    d.step()
    d.step()
    for _ in range(3):
        tr = d.step(fail("car sold out"))
    kinds = [e.kind for e in tr.events]
    assert kinds == [
        EventKind.ATTEMPT_FAILED,
        EventKind.STEP_FAILED,
        EventKind.COMPENSATION_STARTED,
    ]
    assert d.inst.state is SagaState.COMPENSATING
    assert d.inst.cursor == 2  # the failed step's action started, so it is undone too
    assert [s.comp_status for s in d.inst.steps] == [C.PENDING, C.PENDING, C.PENDING, C.NOT_NEEDED]
    assert d.inst.steps[2].status is S.FAILED
    while d.inst.state is SagaState.COMPENSATING:
        tr = d.step()
    assert d.comp_runs() == [2, 1, 0]
    assert d.inst.state is SagaState.COMPENSATED
    assert tr.events[-1].kind is EventKind.SAGA_COMPENSATED
    assert all(s.comp_status is C.COMPENSATED for s in d.inst.steps[:3])
    assert d.inst.steps[3].attempts == 0


def test_a_step_that_never_started_is_never_compensated() -> None:
    d = driver("ccc", retry=Retry(max_attempts=1))
    d.step(fail())
    assert d.inst.state is SagaState.COMPENSATING
    assert [s.comp_status for s in d.inst.steps] == [C.PENDING, C.NOT_NEEDED, C.NOT_NEEDED]
    d.step()
    assert d.comp_runs() == [0]
    assert d.inst.state is SagaState.COMPENSATED


def test_a_step_without_compensation_is_passed_over() -> None:
    d = driver("cnc", retry=Retry(max_attempts=1))
    d.step()
    d.step()
    d.step(fail())
    while d.inst.state is SagaState.COMPENSATING:
        d.step()
    assert d.comp_runs() == [2, 0]
    assert d.inst.steps[1].comp_status is C.NOT_NEEDED


def test_a_failure_of_the_first_step_with_nothing_to_undo_ends_compensated() -> None:
    d = driver("nc", retry=Retry(max_attempts=1))
    tr = d.step(fail())
    assert d.inst.state is SagaState.COMPENSATED
    assert [e.kind for e in tr.events][-1] is EventKind.SAGA_COMPENSATED


def test_a_non_retryable_error_makes_no_more_attempts() -> None:
    d = driver("cc", retry=Retry(max_attempts=5))
    d.step()
    tr = d.step(fail("card declined", retryable=False))
    assert d.inst.steps[1].attempts == 1
    assert d.inst.steps[1].status is S.FAILED
    assert d.inst.state is SagaState.COMPENSATING
    assert EventKind.STEP_FAILED in [e.kind for e in tr.events]


def test_a_timed_out_step_is_compensated_too() -> None:
    d = driver("cc", retry=Retry(max_attempts=1))
    d.step()
    tr = d.step(TIMEOUT)
    assert tr.events[0].kind is EventKind.ATTEMPT_TIMED_OUT
    assert d.inst.steps[1].status is S.TIMED_OUT
    while d.inst.state is SagaState.COMPENSATING:
        d.step()
    assert d.comp_runs() == [1, 0]


def test_an_abandoned_attempt_counts_against_the_budget() -> None:
    d = driver("c", retry=Retry(max_attempts=2))
    d.begin()
    assert decide(d.inst, d.now) == Recover(0, Phase.ACTION)
    tr = d.failure(ABANDONED)
    assert tr.events[0].kind is EventKind.ATTEMPT_ABANDONED
    assert d.inst.steps[0].status is S.PENDING
    d.begin()
    d.failure(ABANDONED)
    assert d.inst.steps[0].status is S.TIMED_OUT  # outcome unknown: undo it
    assert d.inst.state is SagaState.COMPENSATING


def test_after_the_pivot_a_failing_step_dead_letters_and_never_compensates() -> None:
    d = driver("cpr")
    d.step()
    d.step()
    for _ in range(3):
        tr = d.step(fail("warehouse down"))
    assert d.inst.state is SagaState.FAILED
    assert [e.kind for e in tr.events] == [
        EventKind.ATTEMPT_FAILED,
        EventKind.STEP_FAILED,
        EventKind.DEAD_LETTERED,
    ]
    assert tr.dead_letter is not None
    assert (
        tr.dead_letter.step_index,
        tr.dead_letter.phase,
        tr.dead_letter.error,
        tr.dead_letter.attempts,
    ) == (2, Phase.ACTION, "warehouse down", 3)
    assert tr.dead_letter.traceback == "Traceback: ..."
    assert all(s.comp_status is C.NOT_NEEDED for s in d.inst.steps)
    assert d.comp_runs() == []
    assert "only move forward" in tr.events[-1].detail["why"]  # type: ignore[index]


def test_after_the_pivot_a_non_retryable_error_dead_letters_at_once() -> None:
    d = driver("pr")
    d.step()
    tr = d.step(fail("bad address", retryable=False))
    assert d.inst.state is SagaState.FAILED
    assert tr.dead_letter is not None and tr.dead_letter.attempts == 1


def test_a_pivot_that_fails_for_good_compensates_the_steps_before_it() -> None:
    d = driver("ccp")
    d.step()
    d.step()
    for _ in range(3):
        d.step(fail("charge refused"))
    assert d.inst.state is SagaState.COMPENSATING
    assert d.inst.steps[2].comp_status is C.NOT_NEEDED  # the pivot has nothing to undo
    while d.inst.state is SagaState.COMPENSATING:
        d.step()
    assert d.comp_runs() == [1, 0]


@pytest.mark.parametrize("outcome", [TIMEOUT, ABANDONED])
def test_a_pivot_whose_outcome_is_unknown_dead_letters(outcome: object) -> None:
    d = driver("cp", retry=Retry(max_attempts=1))
    d.step()
    d.begin()
    tr = d.failure(outcome)  # type: ignore[arg-type]
    assert d.inst.state is SagaState.FAILED
    assert d.inst.steps[1].status is S.TIMED_OUT
    assert tr.dead_letter is not None and tr.dead_letter.phase is Phase.ACTION
    assert "outcome is unknown" in tr.events[-1].detail["why"]  # type: ignore[index]
    assert d.comp_runs() == []


def test_a_failing_compensation_retries_then_dead_letters() -> None:
    comp = Retry(max_attempts=2, initial_delay=timedelta(milliseconds=50), jitter=0.0)
    d = driver("cc", retry=Retry(max_attempts=1), comp_retry=comp)
    d.step()
    d.step(fail())
    assert d.inst.cursor == 1
    tr = d.step(fail("refund api down"))
    assert d.inst.state is SagaState.COMPENSATING
    assert d.inst.steps[1].comp_status is C.PENDING
    assert d.inst.next_run_at == d.now + 50
    assert tr.events[0].phase is Phase.COMPENSATE
    tr = d.step(fail("refund api down"))
    assert d.inst.state is SagaState.FAILED
    assert d.inst.phase is Phase.COMPENSATE
    assert d.inst.steps[1].comp_status is C.FAILED
    assert d.inst.steps[0].comp_status is C.PENDING  # still to undo after an operator acts
    assert [e.kind for e in tr.events] == [EventKind.ATTEMPT_FAILED, EventKind.DEAD_LETTERED]
    assert tr.dead_letter is not None
    assert (tr.dead_letter.step_index, tr.dead_letter.phase, tr.dead_letter.attempts) == (
        1,
        Phase.COMPENSATE,
        2,
    )
    assert isinstance(decide(d.inst, d.now + 10_000), Idle)


def test_a_compensation_is_retried_even_on_a_non_retryable_error() -> None:
    d = driver("c", retry=Retry(max_attempts=1), comp_retry=Retry(max_attempts=3))
    d.step(fail())
    d.step(fail("no", retryable=False))
    assert d.inst.state is SagaState.COMPENSATING
    assert d.inst.steps[0].comp_attempts == 1


def test_record_failure_does_not_touch_other_steps() -> None:
    d = driver("ccc")
    d.step()
    before = d.inst.steps[0]
    d.step(fail())
    assert d.inst.steps[0] == before
    assert d.inst.steps[2] == new_instance(d.defn).steps[2]


def test_record_failure_of_a_waiting_instance_keeps_the_failing_attempt_number() -> None:
    d = driver("c")
    d.step(fail())
    inst = d.inst
    run = decide(inst, inst.next_run_at or 0)
    assert run == Run(0, Phase.ACTION, 2)
    assert isinstance(run, Run)
    begun = begin_attempt(inst, d.defn, run, d.now).instance
    tr = record_failure(begun, d.defn, d.now, fail(), 0.5)
    assert tr.events[0].attempt == 2


# -- any sequence of outcomes ------------------------------------------------------------

OUTCOMES = st.sampled_from(["ok", "ok", "ok", "fail", "fatal", "timeout", "abandon"])


@st.composite
def shapes(draw: st.DrawFn) -> str:
    before = draw(st.text(alphabet="cn", min_size=0, max_size=3))
    if draw(st.booleans()):
        return before + "p" + "r" * draw(st.integers(0, 2))
    return before or "c"


def run_outcomes(d: Driver, outcomes: list[str]) -> list[Instance]:
    """Feed ``outcomes`` (then successes) until the instance stops; returns every snapshot."""
    seen = [d.inst]
    failures = {
        "fail": fail(),
        "fatal": fail(retryable=False),
        "timeout": TIMEOUT,
        "abandon": ABANDONED,
    }
    queue = list(outcomes)
    for _ in range(200):
        if isinstance(decide(d.inst, d.now + 10**9), Idle):
            return seen
        outcome = queue.pop(0) if queue else "ok"
        if outcome == "abandon":  # the worker died: the next one records the attempt lost
            d.begin()
            seen.append(d.inst)
            assert isinstance(decide(d.inst, d.now), Recover)
            d.failure(ABANDONED)
        else:
            d.step(failures.get(outcome))
        seen.append(d.inst)
    raise AssertionError("the instance never stopped")


@settings(max_examples=300, deadline=None, database=None)
@given(
    shape=shapes(),
    outcomes=st.lists(OUTCOMES, max_size=25),
    budget=st.integers(1, 3),
    comp_budget=st.integers(1, 3),
)
def test_any_sequence_of_outcomes_keeps_the_semantics(
    shape: str, outcomes: list[str], budget: int, comp_budget: int
) -> None:
    d = driver(
        shape,
        retry=Retry(max_attempts=budget, jitter=0.0),
        comp_retry=Retry(max_attempts=comp_budget, jitter=0.0),
    )
    seen = run_outcomes(d, outcomes)
    final = d.inst
    pivot = d.defn.pivot_index

    # Every snapshot along the way is one the exhaustive table covers.
    for inst in seen:
        cur = inst.current
        assert reachable(inst.state, d.defn.steps[cur.index].kind, cur.status, cur.comp_status)

    # Forward attempts go in step order, and compensations strictly downwards after them.
    actions, comps = d.action_runs(), d.comp_runs()
    assert actions == sorted(actions)
    undone = [i for n, i in enumerate(comps) if n == 0 or comps[n - 1] != i]
    assert undone == sorted(set(undone), reverse=True)
    if comps:
        first_comp = next(n for n, r in enumerate(d.runs) if r.phase is Phase.COMPENSATE)
        assert all(r.phase is Phase.COMPENSATE for r in d.runs[first_comp:])

    for i in set(comps):
        assert final.steps[i].action_started  # never undo what never started
        assert d.defn.steps[i].compensation is not None
        assert pivot is None or i < pivot
    if pivot is not None and final.steps[pivot].status is S.SUCCEEDED:
        assert comps == []  # past the point of no return nothing is undone

    # No step ran more attempts than its policy allows.
    for s in final.steps:
        assert s.attempts <= budget
        assert s.comp_attempts <= comp_budget

    # The end state matches what happened.
    assert final.state in (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED)
    if final.state is SagaState.COMPLETED:
        assert all(s.status is S.SUCCEEDED for s in final.steps)
    if final.state is SagaState.COMPENSATED:
        for i, s in enumerate(final.steps):
            must_undo = s.action_started and d.defn.steps[i].compensation is not None
            assert s.comp_status is (C.COMPENSATED if must_undo else C.NOT_NEEDED)
    dead = [t.dead_letter for t in d.transitions if t.dead_letter is not None]
    assert len(dead) == (1 if final.state is SagaState.FAILED else 0)
    if dead:
        assert dead[0].step_index == final.cursor
    assert all(t.events for t in d.transitions)  # every transition leaves a trace


def test_fast_policy_used_by_the_helpers_is_valid() -> None:
    assert FAST.problem() is None


# -- remote and waiting steps: outcomes from outside the worker -------------------


def _external_saga() -> Driver:
    """hotel (remote, compensatable), approval (waits for a signal), car (remote)."""
    from engine.definition import Saga

    saga = Saga("ext", default_retry=FAST, default_compensation_retry=FAST)
    saga.remote_step("hotel", "hotel.reserve", compensation="hotel.cancel")
    saga.wait_for("approval", timeout=timedelta(seconds=60))
    saga.remote_step("car", "car.rent", compensation="car.return")
    saga.validate()
    return Driver(saga, new_instance(saga))


def test_an_external_attempt_in_flight_is_awaited_until_its_deadline() -> None:
    d = _external_saga()
    d.begin()
    deadline = d.inst.steps[0].deadline_at
    assert deadline is not None and d.inst.next_run_at == deadline
    assert decide(d.inst, deadline - 1, d.defn) == Wait(deadline)
    # Without the definition the core cannot tell it from an attempt a worker abandoned.
    assert isinstance(decide(d.inst, deadline - 1), Recover)


def test_an_external_attempt_past_its_deadline_expires_as_timed_out() -> None:
    from engine.decide import Expired, expiry_failure

    d = _external_saga()
    d.begin()
    deadline = d.inst.steps[0].deadline_at
    assert deadline is not None
    expired = decide(d.inst, deadline, d.defn)
    assert expired == Expired(0, Phase.ACTION)
    assert isinstance(expired, Expired)
    failure = expiry_failure(d.defn, expired)
    assert failure.timed_out and "hotel.reserve" in failure.message
    d.now = deadline
    d.failure(failure)
    assert d.inst.steps[0].status is S.PENDING  # retried per policy
    assert d.transitions[-1].events[0].kind is EventKind.ATTEMPT_TIMED_OUT


def test_a_wait_that_expires_compensates_by_default() -> None:
    from engine.decide import Expired, expiry_failure

    d = _external_saga()
    d.step()  # hotel succeeds
    d.begin()  # the wait begins
    deadline = d.inst.steps[1].deadline_at
    assert deadline is not None
    expired = decide(d.inst, deadline, d.defn)
    assert isinstance(expired, Expired)
    assert "'approval' signal" in expiry_failure(d.defn, expired).message
    d.now = deadline
    d.failure(expiry_failure(d.defn, expired))  # no second wait: NO_RETRY
    assert d.inst.state is SagaState.COMPENSATING
    assert d.inst.steps[1].status is S.TIMED_OUT
    assert d.inst.cursor == 0  # the wait has nothing to undo: hotel is next


def test_the_start_of_an_external_attempt_names_its_command_or_event() -> None:
    d = _external_saga()
    d.begin()
    assert d.transitions[-1].events[0].detail == {
        "deadline_at": d.inst.steps[0].deadline_at,
        "command": "hotel.reserve",
    }
    d.succeed()
    d.begin()
    detail = d.transitions[-1].events[0].detail
    assert detail is not None and detail["event"] == "approval"


def test_a_reply_is_taken_only_by_the_attempt_in_flight_before_its_deadline() -> None:
    from engine.decide import reply_problem

    d = _external_saga()
    run = d.begin()
    deadline = d.inst.steps[0].deadline_at
    assert deadline is not None
    assert reply_problem(d.inst, 0, Phase.ACTION, run.attempt, d.now) is None
    late = reply_problem(d.inst, 0, Phase.ACTION, run.attempt, deadline)
    assert late is not None and "deadline" in late
    wrong_phase = reply_problem(d.inst, 0, Phase.COMPENSATE, run.attempt, d.now)
    assert wrong_phase is not None and "moved on" in wrong_phase
    assert reply_problem(d.inst, 7, Phase.ACTION, 1, d.now) == "the saga has no step 7"

    d.failure(TIMEOUT)  # attempt 1 timed out; attempt 2 begins
    again = d.begin()
    old = reply_problem(d.inst, 0, Phase.ACTION, run.attempt, d.now)
    assert old is not None and "superseded" in old
    assert reply_problem(d.inst, 0, Phase.ACTION, again.attempt, d.now) is None
    d.succeed()
    repeated = reply_problem(d.inst, 0, Phase.ACTION, again.attempt, d.now)
    assert repeated is not None and "moved on" in repeated


def test_a_reply_for_a_finished_or_stopped_attempt_is_refused() -> None:
    from engine.decide import reply_problem

    d = _external_saga()
    run = d.begin()
    stopped = at(d.inst, 0, status=S.TIMED_OUT)
    ended = reply_problem(stopped, 0, Phase.ACTION, run.attempt, d.now)
    assert ended is not None and "already ended" in ended
    final = replace(d.inst, state=SagaState.CANCELLED)
    assert reply_problem(final, 0, Phase.ACTION, run.attempt, d.now) == (
        "attempt 1 of 'hotel' (action): the saga is already cancelled"
    )


def test_a_signal_is_taken_now_or_kept_for_a_wait_still_to_come() -> None:
    from engine.decide import signal_problem, waiting_now

    d = _external_saga()
    assert signal_problem(d.inst, 1, d.now) is None  # early: kept for the step
    assert not waiting_now(d.inst, 1)
    d.step()
    d.begin()
    assert signal_problem(d.inst, 1, d.now) is None
    assert waiting_now(d.inst, 1)
    deadline = d.inst.steps[1].deadline_at
    assert deadline is not None
    past = signal_problem(d.inst, 1, deadline)
    assert past is not None and "deadline" in past
    d.succeed({"approved": True})
    taken = signal_problem(d.inst, 1, d.now)
    assert taken is not None and "already ended" in taken
    assert d.inst.steps[1].output == {"approved": True}


def test_a_signal_is_refused_once_the_saga_compensates_or_ends() -> None:
    from engine.decide import signal_problem

    d = _external_saga()
    d.step(fail(retryable=False))  # hotel fails for good: compensation
    assert d.inst.state is SagaState.COMPENSATING
    assert signal_problem(d.inst, 1, d.now) == (
        "the saga is compensating: it waits for no more events"
    )
    done = replace(d.inst, state=SagaState.COMPENSATED)
    assert signal_problem(done, 1, d.now) == "the saga is compensated"
