"""The pure rules for operator actions: retry now, skip, force-compensate, cancel.

Each function takes a snapshot and returns the transition to store, or raises
:class:`InvalidTransition` saying why the state does not allow it. The
operations API (:mod:`engine.operations`) adds version checks and the audit
record around them.
"""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum

from engine.decide import advance, next_compensation, start_compensation
from engine.definition import Saga
from engine.errors import InvalidInput, InvalidTransition
from engine.model import Event, EventKind, Instance, Transition
from engine.states import CompensationStatus, Phase, SagaState, StepStatus


class Action(StrEnum):
    """The operator actions, as recorded in the audit log."""

    RETRY = "retry"
    SKIP = "skip"
    COMPENSATE = "compensate"
    CANCEL = "cancel"


#: Audit-log names of the dead-letter operations beside the four actions above.
EDIT_RETRY = "edit_retry"  # the payload was edited, then the step retried
RESOLVE = "resolve"  # a dead letter was dealt with by hand; the saga ends cancelled
#: A bulk operation's item the action was not applied to (noted, nothing changed).
BULK_NOT_APPLIED = "bulk_not_applied"
#: An operator sent a waiting step its signal (engine.signals).
SIGNAL = "signal"
#: The operator actions on choreographed instances (engine.choreography.operations).
FORCE_COMPENSATE = "force_compensate"
REPUBLISH = "republish"
#: Every ``action`` the audit log may hold, for its filter.
AUDIT_ACTIONS = (
    *(a.value for a in Action),
    EDIT_RETRY,
    RESOLVE,
    BULK_NOT_APPLIED,
    SIGNAL,
    FORCE_COMPENSATE,
    REPUBLISH,
)


def allowed_actions(inst: Instance, defn: Saga, now: int) -> list[Action]:
    """The actions the instance's state allows now, for buttons and menus."""
    allowed = []
    for action in Action:
        try:
            apply(action, inst, defn, now)
        except InvalidTransition:
            continue
        allowed.append(action)
    return allowed


def apply(action: Action, inst: Instance, defn: Saga, now: int) -> Transition:
    """The transition ``action`` makes on ``inst``; raises InvalidTransition if not allowed."""
    rules = {
        Action.RETRY: retry_now,
        Action.SKIP: skip_step,
        Action.COMPENSATE: force_compensate,
        Action.CANCEL: cancel,
    }
    transition = rules[action](inst, defn, now)
    return replace(transition, resolves_dead_letter=inst.state is SagaState.FAILED)


def retry_now(inst: Instance, defn: Saga, now: int) -> Transition:
    """Run the failed or waiting side of the current step now, with a fresh retry budget."""
    _refuse_final(inst, "retry")
    _refuse_in_flight(inst, "retry")
    step = inst.current
    phase = inst.phase
    if phase is Phase.ACTION:
        step = replace(step, status=StepStatus.PENDING, attempts_base=step.attempts)
        state = SagaState.RUNNING
    else:
        step = replace(
            step, comp_status=CompensationStatus.PENDING, comp_attempts_base=step.comp_attempts
        )
        state = SagaState.COMPENSATING
    nxt = replace(inst.with_step(step), state=state, next_run_at=now, updated_at=now)
    return Transition(nxt, (_event(EventKind.OPERATOR_RETRY, inst),))


def skip_step(inst: Instance, defn: Saga, now: int) -> Transition:
    """Mark the current step (or its compensation) done by hand and go on."""
    _refuse_final(inst, "skip a step of")
    _refuse_in_flight(inst, "skip a step of")
    step = inst.current
    event = _event(EventKind.OPERATOR_SKIP, inst)
    if inst.phase is Phase.ACTION:
        skipped = inst.with_step(
            replace(step, status=StepStatus.SKIPPED, finished_at=now, deadline_at=None)
        )
        running = replace(skipped, state=SagaState.RUNNING)
        return Transition(running, (event,)).then(advance(running, now))
    undone = inst.with_step(
        replace(
            step,
            comp_status=CompensationStatus.SKIPPED,
            comp_finished_at=now,
            comp_deadline_at=None,
        )
    )
    compensating = replace(undone, state=SagaState.COMPENSATING)
    return Transition(compensating, (event,)).then(next_compensation(compensating, now))


def force_compensate(inst: Instance, defn: Saga, now: int) -> Transition:
    """Stop going forward and undo every started step, from the current one down."""
    _refuse_final(inst, "compensate")
    if inst.phase is Phase.COMPENSATE:
        raise InvalidTransition(
            inst.id,
            "compensate",
            inst.state,
            "it is already compensating; retry or skip the compensation",
        )
    pivot = defn.pivot_index
    passed_pivot = pivot is not None and (
        inst.cursor > pivot or inst.steps[pivot].status is StepStatus.SUCCEEDED
    )
    if pivot is not None and passed_pivot:
        raise InvalidTransition(
            inst.id,
            "compensate",
            inst.state,
            f"it passed its pivot step {defn.steps[pivot].name!r} and can only move forward",
        )
    event = _event(EventKind.OPERATOR_COMPENSATE, inst)
    stopped = _stop_in_flight(inst, now)
    return Transition(stopped, (event,)).then(
        start_compensation(stopped, defn, inst.cursor, now, "forced by an operator")
    )


def cancel(inst: Instance, defn: Saga, now: int) -> Transition:
    """Stop the instance where it stands; nothing more runs, nothing is undone."""
    _refuse_final(inst, "cancel")
    stopped = replace(
        _stop_in_flight(inst, now),
        state=SagaState.CANCELLED,
        next_run_at=None,
        updated_at=now,
        last_progress_at=now,
    )
    return Transition(stopped, (_event(EventKind.OPERATOR_CANCEL, inst),))


def edit_and_retry(inst: Instance, defn: Saga, now: int, payload: object) -> Transition:
    """Replace the payload (the input every step reads), then retry as :func:`retry_now`."""
    if payload == inst.payload:
        raise InvalidInput("payload", "is the same as the saga's; to run the step as it is, retry")
    retried = retry_now(inst, defn, now)
    (event,) = retried.events
    marked = replace(event, detail={**(event.detail or {}), "payload_edited": True})
    return Transition(
        replace(retried.instance, payload=payload),
        (marked,),
        resolves_dead_letter=inst.state is SagaState.FAILED,
    )


def resolve_by_hand(inst: Instance, defn: Saga, now: int) -> Transition:
    """Close a dead letter an operator dealt with outside the engine.

    The saga ends ``cancelled``: nothing more runs and nothing is undone,
    because the operator says the rest was handled by hand. Leaving it
    ``failed`` would keep it in the dead-letter queue (and the failed
    count) although nobody needs to act on it any more.
    """
    if inst.state is not SagaState.FAILED:
        raise InvalidTransition(
            inst.id, "resolve", inst.state, "only a dead-lettered saga can be resolved by hand"
        )
    stopped = cancel(inst, defn, now)
    (event,) = stopped.events
    marked = replace(event, detail={**(event.detail or {}), "resolution": "resolved by hand"})
    return Transition(stopped.instance, (marked,), resolves_dead_letter=True)


def _stop_in_flight(inst: Instance, now: int) -> Instance:
    # An attempt in flight has an unknown outcome: record it as timed out, so a
    # compensation that follows also undoes it, and a late result is discarded.
    step = inst.current
    if step.status is StepStatus.RUNNING:
        step = replace(
            step,
            status=StepStatus.TIMED_OUT,
            finished_at=now,
            deadline_at=None,
            error="stopped by an operator while an attempt was in flight",
        )
    return replace(inst.with_step(step), updated_at=now)


def _refuse_final(inst: Instance, operation: str) -> None:
    if inst.state.is_final:
        raise InvalidTransition(inst.id, operation, inst.state, "it has already finished")


def _refuse_in_flight(inst: Instance, operation: str) -> None:
    step = inst.current
    in_flight = (
        step.comp_status is CompensationStatus.RUNNING
        if inst.phase is Phase.COMPENSATE
        else step.status is StepStatus.RUNNING
    )
    if in_flight and inst.state is not SagaState.FAILED:
        attempt = step.attempts_of(inst.phase)
        raise InvalidTransition(
            inst.id,
            operation,
            inst.state,
            f"attempt {attempt} of step {step.name!r} is running now; wait for its outcome "
            "or its deadline, or force-compensate or cancel",
        )


def _event(kind: EventKind, inst: Instance) -> Event:
    step = inst.current
    phase = inst.phase
    return Event(
        kind, step.index, phase, step.attempts_of(phase), detail={"state_before": str(inst.state)}
    )
