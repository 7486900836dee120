"""The pure tracker core: one domain event moves a choreographed instance.

:func:`track` maps (current snapshot or None, one domain event) to the next
snapshot and its timeline entries, as :mod:`engine.decide` does for
orchestrated sagas, so a choreographed instance has the same states, steps
and timeline. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from engine.choreography.declaration import CHOREOGRAPHED, Choreography, DomainEvent
from engine.model import Event, EventKind, Instance, StepState, Transition, new_id
from engine.states import CompensationStatus, Phase, SagaState, StepStatus

_KEY_PREFIX = "choreo:"


# -- the pure core ----------------------------------------------------------


def track(decl: Choreography, inst: Instance | None, event: DomainEvent) -> Transition | None:
    """The next snapshot after ``event``, or None when it changes nothing.

    Duplicates and events that arrive after the instance finished change
    nothing, so at-least-once delivery is safe to feed in as it comes.
    """
    if inst is None:
        return _start(decl, event) if event.type == decl.start else None
    if inst.state.is_final:
        return None
    for i, step in enumerate(decl.steps):
        if event.type == step.done:
            return _step_done(decl, inst, i, event)
        if event.type == step.compensated_by:
            return _step_undone(decl, inst, i, event)
    if event.type in decl.failures:
        return _step_failed(decl, inst, decl.index_of(decl.failures[event.type]), event)
    return None


def missing_compensations(decl: Choreography, inst: Instance) -> list[str]:
    """The compensating events still expected, latest step first."""
    return [
        decl.steps[s.index].compensated_by or ""
        for s in reversed(inst.steps)
        if s.comp_status is CompensationStatus.PENDING
    ]


@dataclass(frozen=True)
class CompensationOrder:
    """One compensating event to publish for a force-compensate, with its once-only key."""

    step: str
    event_type: str
    key: str


def compensation_plan(decl: Choreography, inst: Instance) -> list[CompensationOrder]:
    """The compensating events for the steps that completed and are not undone, in reverse."""
    plan = []
    for s in reversed(inst.steps):
        comp = decl.steps[s.index].compensated_by
        if comp is None or s.comp_status is CompensationStatus.COMPENSATED:
            continue
        if s.status is StepStatus.SUCCEEDED or s.comp_status is CompensationStatus.PENDING:
            plan.append(CompensationOrder(s.name, comp, f"{inst.id}:{s.name}:force-compensate"))
    return plan


def _start(decl: Choreography, event: DomainEvent) -> Transition:
    steps = tuple(StepState(i, s.name) for i, s in enumerate(decl.steps))
    inst = Instance(
        id=new_id(event.at),
        saga_name=decl.name,
        saga_version=1,
        state=SagaState.RUNNING,
        cursor=0,
        steps=steps,
        payload=dict(event.data),
        correlation_id=event.correlation_id,
        idempotency_key=instance_key(event.correlation_id),
        created_at=event.at,
        updated_at=event.at,
        last_progress_at=event.at,
        kind=CHOREOGRAPHED,
    )
    started = Event(EventKind.SAGA_STARTED, detail=_detail(event), at=event.at)
    inst, waiting = _await_step(decl, inst, 0, event.at)
    return Transition(inst, (started, waiting))


def _await_step(decl: Choreography, inst: Instance, index: int, at: int) -> tuple[Instance, Event]:
    step = replace(
        inst.steps[index],
        status=StepStatus.RUNNING,
        attempts=1,
        started_at=at,
        deadline_at=at + decl.steps[index].expected_ms,
    )
    expects = {"expects": decl.steps[index].done}
    ev = Event(EventKind.ATTEMPT_STARTED, index, Phase.ACTION, 1, detail=expects, at=at)
    return replace(inst.with_step(step), cursor=index), ev


def _step_done(
    decl: Choreography, inst: Instance, index: int, event: DomainEvent
) -> Transition | None:
    old = inst.steps[index]
    if old.status is StepStatus.SUCCEEDED or inst.state is not SagaState.RUNNING:
        return None  # a duplicate, or late: compensation is already under way
    step = replace(
        old,
        status=StepStatus.SUCCEEDED,
        attempts=max(old.attempts, 1),
        started_at=old.started_at or event.at,
        finished_at=event.at,
        output=dict(event.data),
        error=None,
    )
    inst = _progress(inst.with_step(step), event.at)
    ev = Event(
        EventKind.ATTEMPT_SUCCEEDED, index, Phase.ACTION, 1, detail=_detail(event), at=event.at
    )
    events = [ev]
    nxt = next((s.index for s in inst.steps if s.status is not StepStatus.SUCCEEDED), None)
    if nxt is None:
        inst = replace(inst, state=SagaState.COMPLETED, cursor=len(inst.steps) - 1)
        events.append(Event(EventKind.SAGA_COMPLETED, at=event.at))
    elif inst.steps[nxt].status is StepStatus.PENDING:
        inst, waiting = _await_step(decl, inst, nxt, event.at)
        events.append(waiting)
    return Transition(inst, tuple(events))


def _step_failed(
    decl: Choreography, inst: Instance, index: int, event: DomainEvent
) -> Transition | None:
    if inst.state is not SagaState.RUNNING:
        return None
    failed = replace(
        inst.steps[index],
        status=StepStatus.FAILED,
        attempts=max(inst.steps[index].attempts, 1),
        finished_at=event.at,
        error=str(event.data.get("reason") or event.type),
        deadline_at=None,
    )
    inst = _progress(inst.with_step(failed), event.at)
    detail = _detail(event)
    events = [
        Event(
            EventKind.STEP_FAILED,
            index,
            Phase.ACTION,
            1,
            error=failed.error,
            detail=detail,
            at=event.at,
        )
    ]
    inst = _expect_compensations(decl, inst, event.at)
    return _turn_back(decl, inst, events, event.at)


def _expect_compensations(decl: Choreography, inst: Instance, at: int) -> Instance:
    """Stop expecting forward steps; expect each completed step's compensating event."""
    for s in inst.steps:
        if s.status is StepStatus.RUNNING:  # expected no more: the saga turned back
            inst = inst.with_step(
                replace(s, status=StepStatus.PENDING, attempts=0, started_at=None, deadline_at=None)
            )
    for s in inst.steps:
        pending = s.comp_status in (CompensationStatus.NOT_NEEDED, CompensationStatus.PENDING)
        if s.status is StepStatus.SUCCEEDED and decl.steps[s.index].compensated_by and pending:
            deadline = at + decl.steps[s.index].expected_ms
            inst = inst.with_step(
                replace(
                    s,
                    comp_status=CompensationStatus.PENDING,
                    comp_started_at=at,
                    comp_deadline_at=deadline,
                )
            )
    return inst


def _turn_back(decl: Choreography, inst: Instance, events: list[Event], at: int) -> Transition:
    pending = [s.index for s in inst.steps if s.comp_status is CompensationStatus.PENDING]
    if not pending:
        inst = replace(inst, state=SagaState.COMPENSATED)
        return Transition(inst, (*events, Event(EventKind.SAGA_COMPENSATED, at=at)))
    missing = {"missing": missing_compensations(decl, inst)}
    inst = replace(inst, state=SagaState.COMPENSATING, cursor=max(pending))
    events.append(
        Event(EventKind.COMPENSATION_STARTED, inst.cursor, Phase.COMPENSATE, detail=missing, at=at)
    )
    return Transition(inst, tuple(events))


def _step_undone(
    decl: Choreography, inst: Instance, index: int, event: DomainEvent
) -> Transition | None:
    old = inst.steps[index]
    if old.comp_status is CompensationStatus.COMPENSATED:
        return None
    if old.status is not StepStatus.SUCCEEDED and old.comp_status is not CompensationStatus.PENDING:
        return None  # undoing what never happened: nothing to show
    events: list[Event] = []
    if inst.state is SagaState.RUNNING:
        # Undone before any failure event: a forced compensation (an operator
        # published the compensating events). The saga turns back from here.
        inst = _expect_compensations(decl, inst, event.at)
        cursor = max(s.index for s in inst.steps if s.comp_status is CompensationStatus.PENDING)
        inst = replace(inst, state=SagaState.COMPENSATING, cursor=cursor)
        missing = {"missing": missing_compensations(decl, inst), "forced": True}
        events.append(
            Event(
                EventKind.COMPENSATION_STARTED,
                cursor,
                Phase.COMPENSATE,
                detail=missing,
                at=event.at,
            )
        )
        old = inst.steps[index]
    step = replace(
        old,
        comp_status=CompensationStatus.COMPENSATED,
        comp_attempts=max(old.comp_attempts, 1),
        comp_started_at=old.comp_started_at or event.at,
        comp_finished_at=event.at,
        comp_deadline_at=None,
    )
    inst = _progress(inst.with_step(step), event.at)
    events.append(
        Event(
            EventKind.ATTEMPT_SUCCEEDED,
            index,
            Phase.COMPENSATE,
            1,
            detail=_detail(event),
            at=event.at,
        )
    )
    pending = [s.index for s in inst.steps if s.comp_status is CompensationStatus.PENDING]
    if pending:
        return Transition(replace(inst, cursor=max(pending)), tuple(events))
    inst = replace(inst, state=SagaState.COMPENSATED)
    events.append(Event(EventKind.SAGA_COMPENSATED, at=event.at))
    return Transition(inst, tuple(events))


def _progress(inst: Instance, at: int) -> Instance:
    return replace(
        inst, updated_at=max(at, inst.updated_at), last_progress_at=max(at, inst.last_progress_at)
    )


def _detail(event: DomainEvent) -> dict[str, Any]:
    return {"event": event.type, "event_id": event.id}


def instance_key(correlation_id: str) -> str:
    """The idempotency key of the tracked instance for ``correlation_id``."""
    return _KEY_PREFIX + correlation_id
