"""The pure core: what happens next to a saga instance, and what an outcome changes.

No I/O here. :func:`decide` looks at a snapshot and says what to do now;
:func:`begin_attempt`, :func:`record_success` and :func:`record_failure`
turn an attempt and its outcome into the next snapshot plus the timeline
events and dead-letter record to store with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.definition import Retry, Saga, StepDef
from engine.model import (
    DeadLetter,
    Event,
    EventKind,
    Failure,
    Instance,
    StepState,
    Transition,
    evolve,
)
from engine.states import CompensationStatus, Phase, SagaState, StepStatus


@dataclass(frozen=True)
class Run:
    """Start attempt ``attempt`` of the ``phase`` side of step ``index`` now."""

    index: int
    phase: Phase
    attempt: int


@dataclass(frozen=True)
class Recover:
    """An attempt is marked running but its worker is gone: record it as failed first."""

    index: int
    phase: Phase


@dataclass(frozen=True)
class Expired:
    """A remote or waiting attempt passed its deadline without a reply or signal: it timed out."""

    index: int
    phase: Phase


@dataclass(frozen=True)
class Wait:
    """Nothing to do before ``until`` (a retry backoff)."""

    until: int


@dataclass(frozen=True)
class Idle:
    """Nothing to do: the instance is final, or waits for an operator."""

    reason: str


Decision = Run | Recover | Expired | Wait | Idle


def decide(inst: Instance, now: int, defn: Saga | None = None) -> Decision:
    """What a worker holding the lease should do with ``inst`` at time ``now``.

    With ``defn``, an attempt in flight at a remote or waiting step is not
    tied to a worker: it is awaited until its deadline, then expires.
    Without it, every attempt in flight is taken for one a worker abandoned.
    """
    if inst.state.is_final:
        return Idle(f"saga is {inst.state}")
    if inst.state is SagaState.FAILED:
        return Idle("dead-lettered: waits for an operator")
    phase = inst.phase
    step = inst.current
    status = step.status if phase is Phase.ACTION else step.comp_status
    if status in (StepStatus.RUNNING, CompensationStatus.RUNNING):
        if defn is not None and defn.steps[step.index].external:
            return _await(step, phase, now)
        return Recover(step.index, phase)
    if inst.next_run_at is not None and inst.next_run_at > now:
        return Wait(inst.next_run_at)
    return Run(step.index, phase, step.attempts_of(phase) + 1)


def _await(step: StepState, phase: Phase, now: int) -> Decision:
    deadline = step.deadline_at if phase is Phase.ACTION else step.comp_deadline_at
    if deadline is None or now >= deadline:
        return Expired(step.index, phase)
    return Wait(deadline)


def expiry_failure(defn: Saga, expired: Expired) -> Failure:
    """The failure an expired remote or waiting attempt is recorded with: timed out."""
    sdef = defn.steps[expired.index]
    secs = f"{sdef.timeout.total_seconds():g}s"
    if sdef.signal is not None:
        return Failure(f"no {sdef.signal!r} signal arrived within {secs}", timed_out=True)
    command = sdef.remote.command(expired.phase) if sdef.remote else None
    return Failure(f"no reply to {command!r} within {secs}", timed_out=True)


def reply_problem(inst: Instance, index: int, phase: Phase, attempt: int, now: int) -> str | None:
    """Why a reply (or late outcome) for this attempt cannot be recorded; None when it can.

    Only the attempt in flight takes an outcome, and only before its
    deadline: after it, the attempt counts as timed out whatever it did.
    """
    if not 0 <= index < len(inst.steps):
        return f"the saga has no step {index}"
    step = inst.steps[index]
    name = f"attempt {attempt} of {step.name!r} ({phase})"
    if inst.state.is_final or inst.state is SagaState.FAILED:
        return f"{name}: the saga is already {inst.state}"
    if index != inst.cursor or phase is not inst.phase:
        return f"{name}: the saga has moved on to {inst.current.name!r} ({inst.phase})"
    status = step.status if phase is Phase.ACTION else step.comp_status
    if step.attempts_of(phase) != attempt:
        return f"{name}: attempt {step.attempts_of(phase)} superseded it"
    if status not in (StepStatus.RUNNING, CompensationStatus.RUNNING):
        return f"{name}: it already ended ({status})"
    deadline = step.deadline_at if phase is Phase.ACTION else step.comp_deadline_at
    if deadline is not None and now >= deadline:
        return f"{name}: it passed its deadline before the reply was handled"
    return None


def signal_problem(inst: Instance, index: int, now: int) -> str | None:
    """Why the waiting step ``index`` cannot take a signal now or later; None when it can.

    A signal is taken by the attempt waiting for it, or kept for the step
    while the step has yet to begin (or to wait again after a timeout).
    """
    step = inst.steps[index]
    if inst.state.is_final or inst.state is SagaState.FAILED:
        return f"the saga is {inst.state}"
    if inst.state is SagaState.COMPENSATING:
        return "the saga is compensating: it waits for no more events"
    if step.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED):
        return f"step {step.name!r} already ended ({step.status})"
    if index < inst.cursor:
        return f"the saga has moved past step {step.name!r}"
    deadline = step.deadline_at
    if step.status is StepStatus.RUNNING and deadline is not None and now >= deadline:
        return f"step {step.name!r} stopped waiting at its deadline"
    return None


def waiting_now(inst: Instance, index: int) -> bool:
    """True when step ``index`` is the current one and an attempt waits for its signal."""
    return (
        inst.state is SagaState.RUNNING
        and inst.cursor == index
        and inst.steps[index].status is StepStatus.RUNNING
    )


def begin_attempt(inst: Instance, defn: Saga, run: Run, now: int) -> Transition:
    """Mark the attempt in ``run`` as started, with its stored deadline."""
    sdef = defn.steps[run.index]
    step = inst.steps[run.index]
    if run.phase is Phase.ACTION:
        deadline = now + _ms(sdef.timeout.total_seconds())
        step = evolve(
            step,
            status=StepStatus.RUNNING,
            attempts=run.attempt,
            started_at=now,
            finished_at=None,
            deadline_at=deadline,
        )
    else:
        deadline = now + _ms(sdef.timeout.total_seconds())
        step = evolve(
            step,
            comp_status=CompensationStatus.RUNNING,
            comp_attempts=run.attempt,
            comp_started_at=now,
            comp_finished_at=None,
            comp_deadline_at=deadline,
        )
    nxt = evolve(inst.with_step(step), updated_at=now, next_run_at=deadline)
    event = Event(
        EventKind.ATTEMPT_STARTED,
        run.index,
        run.phase,
        run.attempt,
        detail={"deadline_at": deadline, **_external_detail(sdef, run.phase)},
        at=now,
    )
    return Transition(nxt, (event,))


def record_success(inst: Instance, defn: Saga, now: int, output: object = None) -> Transition:
    """The in-flight attempt of the current step succeeded."""
    step = inst.current
    phase = inst.phase
    attempt = step.attempts_of(phase)
    duration = now - ((step.started_at if phase is Phase.ACTION else step.comp_started_at) or now)
    event = Event(
        EventKind.ATTEMPT_SUCCEEDED,
        step.index,
        phase,
        attempt,
        detail={"duration_ms": duration},
        at=now,
    )
    if phase is Phase.ACTION:
        done = evolve(step, status=StepStatus.SUCCEEDED, finished_at=now, output=output, error=None)
        return Transition(inst.with_step(done), (event,)).then(advance(inst.with_step(done), now))
    undone = evolve(
        step, comp_status=CompensationStatus.COMPENSATED, comp_finished_at=now, comp_error=None
    )
    return Transition(inst.with_step(undone), (event,)).then(
        next_compensation(inst.with_step(undone), now)
    )


def record_failure(
    inst: Instance, defn: Saga, now: int, failure: Failure, rand: float
) -> Transition:
    """The in-flight attempt of the current step failed, timed out or was abandoned."""
    step = inst.current
    phase = inst.phase
    sdef = defn.steps[step.index]
    policy = sdef.retry if phase is Phase.ACTION else sdef.compensation_retry
    attempt = step.attempts_of(phase)
    event = evolve(_failure_event(step.index, phase, attempt, failure), at=now)
    if _may_retry(policy, step.budget_used(phase), failure, phase):
        retry_at = now + policy.delay_ms(step.budget_used(phase), rand)
        waiting = _mark_waiting(step, phase, failure, now)
        nxt = evolve(inst.with_step(waiting), next_run_at=retry_at, updated_at=now)
        event = evolve(event, detail={**(event.detail or {}), "retry_at": retry_at})
        return Transition(nxt, (event,))
    first = Transition(inst, (event,))
    if phase is Phase.COMPENSATE:
        return first.then(_dead_letter_compensation(inst, failure, now))
    return first.then(_forward_exhausted(inst, defn, failure, now))


def advance(inst: Instance, now: int) -> Transition:
    """Move past the current step (it succeeded or was skipped): next step, or completed."""
    nxt_index = inst.cursor + 1
    if nxt_index >= len(inst.steps):
        done = evolve(
            inst, state=SagaState.COMPLETED, next_run_at=None, updated_at=now, last_progress_at=now
        )
        return Transition(done, (Event(EventKind.SAGA_COMPLETED),))
    moved = evolve(inst, cursor=nxt_index, next_run_at=now, updated_at=now, last_progress_at=now)
    return Transition(moved)


def start_compensation(
    inst: Instance, defn: Saga, through: int, now: int, reason: str
) -> Transition:
    """Compensate every started step up to ``through``, in reverse order."""
    steps = tuple(
        _needs_undo(s, defn.steps[s.index]) if s.index <= through else s for s in inst.steps
    )
    marked = evolve(inst, steps=steps, state=SagaState.COMPENSATING, updated_at=now)
    event = Event(EventKind.COMPENSATION_STARTED, through, detail={"reason": reason})
    return Transition(marked, (event,)).then(next_compensation(marked, now, from_index=through + 1))


def next_compensation(inst: Instance, now: int, from_index: int | None = None) -> Transition:
    """Point at the highest step still to undo below ``from_index``, or finish."""
    top = inst.cursor if from_index is None else from_index
    pending = [s.index for s in inst.steps[:top] if s.comp_status is CompensationStatus.PENDING]
    if not pending:
        done = evolve(
            inst,
            state=SagaState.COMPENSATED,
            next_run_at=None,
            updated_at=now,
            last_progress_at=now,
        )
        return Transition(done, (Event(EventKind.SAGA_COMPENSATED),))
    moved = evolve(inst, cursor=max(pending), next_run_at=now, updated_at=now, last_progress_at=now)
    return Transition(moved)


def _needs_undo(step: StepState, sdef: StepDef) -> StepState:
    if (
        step.action_started
        and sdef.compensation is not None
        and step.comp_status in (CompensationStatus.NOT_NEEDED, CompensationStatus.PENDING)
    ):
        return evolve(step, comp_status=CompensationStatus.PENDING)
    return step


def _external_detail(sdef: StepDef, phase: Phase) -> dict[str, str]:
    """What the timeline says about where a remote or waiting attempt's outcome comes from."""
    if sdef.remote is not None:
        return {"command": sdef.remote.command(phase) or ""}
    if sdef.signal is not None:
        return {"event": sdef.signal}
    return {}


def _may_retry(policy: Retry, used: int, failure: Failure, phase: Phase) -> bool:
    # A compensation must eventually run: even a "non-retryable" error in a
    # compensation is retried until the budget is spent, then dead-lettered.
    retryable = failure.retryable or phase is Phase.COMPENSATE
    return retryable and used < policy.max_attempts


def _mark_waiting(step: StepState, phase: Phase, failure: Failure, now: int) -> StepState:
    if phase is Phase.ACTION:
        return evolve(
            step,
            status=StepStatus.PENDING,
            error=failure.message,
            finished_at=now,
            deadline_at=None,
        )
    return evolve(
        step,
        comp_status=CompensationStatus.PENDING,
        comp_error=failure.message,
        comp_finished_at=now,
        comp_deadline_at=None,
    )


def _forward_exhausted(inst: Instance, defn: Saga, failure: Failure, now: int) -> Transition:
    step = inst.current
    final = StepStatus.TIMED_OUT if failure.timed_out or failure.abandoned else StepStatus.FAILED
    failed = evolve(step, status=final, error=failure.message, finished_at=now, deadline_at=None)
    inst = inst.with_step(failed)
    gave_up = Transition(
        inst,
        (
            Event(
                EventKind.STEP_FAILED,
                step.index,
                Phase.ACTION,
                step.attempts,
                error=failure.message,
            ),
        ),
    )
    pivot = defn.pivot_index
    if pivot is not None and step.index > pivot:
        why = "a step after the pivot ran out of retries; it can only move forward"
        return gave_up.then(_dead_letter(inst, Phase.ACTION, failure, now, why))
    if pivot == step.index and final is StepStatus.TIMED_OUT:
        why = "the pivot step's outcome is unknown (it timed out); check it, then retry or skip"
        return gave_up.then(_dead_letter(inst, Phase.ACTION, failure, now, why))
    return gave_up.then(start_compensation(inst, defn, step.index, now, failure.message))


def _dead_letter_compensation(inst: Instance, failure: Failure, now: int) -> Transition:
    step = evolve(
        inst.current,
        comp_status=CompensationStatus.FAILED,
        comp_error=failure.message,
        comp_finished_at=now,
        comp_deadline_at=None,
    )
    why = "a compensation ran out of retries"
    return _dead_letter(inst.with_step(step), Phase.COMPENSATE, failure, now, why)


def _dead_letter(inst: Instance, phase: Phase, failure: Failure, now: int, why: str) -> Transition:
    step = inst.current
    attempts = step.attempts_of(phase)
    parked = evolve(inst, state=SagaState.FAILED, next_run_at=None, updated_at=now)
    record = DeadLetter(step.index, phase, failure.message, failure.traceback, attempts)
    event = Event(
        EventKind.DEAD_LETTERED,
        step.index,
        phase,
        attempts,
        error=failure.message,
        detail={"why": why},
    )
    return Transition(parked, (event,), dead_letter=record)


def _failure_event(index: int, phase: Phase, attempt: int, failure: Failure) -> Event:
    kind = EventKind.ATTEMPT_FAILED
    if failure.timed_out:
        kind = EventKind.ATTEMPT_TIMED_OUT
    elif failure.abandoned:
        kind = EventKind.ATTEMPT_ABANDONED
    return Event(kind, index, phase, attempt, error=failure.message, traceback=failure.traceback)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def settle(transition: Transition, defn: Saga, now: int, rand: float) -> Transition:
    """Record the end of an attempt marked running whose worker is gone.

    It timed out when its deadline has passed, else it was abandoned; either
    way its outcome is unknown and its policy applies. Workers and sweeps both
    call this, so a deadline is enforced by the same rule whoever finds it.
    """
    inst = transition.instance
    decision = decide(inst, now, defn)
    if isinstance(decision, Expired):  # a remote or waiting attempt: nobody abandoned it
        failure = expiry_failure(defn, decision)
    elif isinstance(decision, Recover):
        failure = _gone(inst, now)
    else:
        return transition
    return transition.then(record_failure(inst, defn, now, failure, rand))


def _gone(inst: Instance, now: int) -> Failure:
    step, phase = inst.current, inst.phase
    deadline = step.deadline_at if phase is Phase.ACTION else step.comp_deadline_at
    if deadline is not None and now >= deadline:
        return Failure(
            "no outcome was recorded by its deadline (the worker running it stopped)",
            timed_out=True,
        )
    return Failure(
        "the worker running this attempt stopped before recording an outcome", abandoned=True
    )
