"""Choreographed sagas: a declaration to track them, and the pure tracker core.

In a choreography no coordinator sends commands: each service reacts to the
others' domain events (:mod:`engine.events`) and publishes its own. A
:class:`Choreography` declares what the engine should expect so that it can
show where each instance stands: the event that starts one, the event that
marks each step done, the failure events, the event each step publishes
when it undoes its work, and how long each step is expected to take.

:func:`track` maps (current snapshot or None, one domain event) to the next
snapshot and its timeline entries, as :mod:`engine.decide` does for
orchestrated sagas, so a choreographed instance has the same states, steps
and timeline; :class:`Tracker` loads and saves through the store, one
instance per correlation id (its idempotency key is ``choreo:<correlation id>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from engine.errors import ConcurrencyConflict, DefinitionError
from engine.model import Event, EventKind, Instance, StepState, Transition, new_id
from engine.states import CompensationStatus, Phase, SagaState, StepStatus

if TYPE_CHECKING:
    from engine.store import Store

#: The value of ``saga_instances.kind`` for instances the tracker keeps.
CHOREOGRAPHED = "choreographed"
#: The actor the tracker writes in the timeline.
TRACKER = "choreography-tracker"
_KEY_PREFIX = "choreo:"


@dataclass(frozen=True)
class DomainEvent:
    """One domain event as the tracker sees it."""

    id: str
    type: str
    correlation_id: str
    data: Mapping[str, Any] = field(default_factory=dict)
    at: int = 0  # epoch milliseconds when it was published


@dataclass(frozen=True)
class ChoreoStep:
    """One step of a choreography: the event that marks it done, and the one that undoes it."""

    name: str
    done: str
    compensated_by: str | None = None  # None: nothing to undo (a pivot or a final step)
    expected: timedelta = timedelta(seconds=30)

    @property
    def expected_ms(self) -> int:
        return int(self.expected.total_seconds() * 1000)


@dataclass(frozen=True)
class Choreography:
    """What to expect of a choreographed saga; validated when built."""

    name: str
    start: str
    steps: tuple[ChoreoStep, ...]
    #: Failure event type -> the name of the step that failed.
    failures: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.start:
            raise DefinitionError(
                self.name, None, "a choreography needs a name and a starting event"
            )
        if not self.steps:
            raise DefinitionError(self.name, None, "a choreography needs at least one step")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise DefinitionError(self.name, None, "step names must be unique")
        types = [self.start, *(s.done for s in self.steps), *self.failures]
        types += [s.compensated_by for s in self.steps if s.compensated_by]
        if len(set(types)) != len(types):
            raise DefinitionError(self.name, None, "each event type may play one role only")
        for event_type, step in self.failures.items():
            if step not in names:
                raise DefinitionError(
                    self.name, step, f"failure event {event_type!r} names no declared step"
                )

    def event_types(self) -> list[str]:
        """Every event type the tracker consumes for this choreography."""
        found = [self.start, *(s.done for s in self.steps), *self.failures]
        return found + [s.compensated_by for s in self.steps if s.compensated_by]

    def index_of(self, step: str) -> int:
        return next(i for i, s in enumerate(self.steps) if s.name == step)


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


# -- the tracker: the pure core on top of the store -------------------------


class Tracker:
    """Applies domain events to the stored instances of the declared choreographies."""

    def __init__(self, store: Store, choreographies: Sequence[Choreography]) -> None:
        self.store = store
        self.by_type: dict[str, Choreography] = {}
        for decl in choreographies:
            for event_type in decl.event_types():
                if event_type in self.by_type:
                    raise DefinitionError(
                        decl.name, None, f"event {event_type!r} is declared twice"
                    )
                self.by_type[event_type] = decl

    def event_types(self) -> list[str]:
        return sorted(self.by_type)

    def apply(self, event: DomainEvent, attempts: int = 5) -> Instance | None:
        """Apply ``event``; returns the instance as stored, or None when it is not tracked."""
        decl = self.by_type.get(event.type)
        if decl is None:
            return None
        for attempt in range(attempts):
            try:
                return self._apply_once(decl, event)
            except ConcurrencyConflict:
                if attempt == attempts - 1:
                    raise
                # Another tracker moved it on: read it again.
        return None

    def _apply_once(self, decl: Choreography, event: DomainEvent) -> Instance | None:
        inst = self.store.find_by_key(decl.name, instance_key(event.correlation_id))
        transition = track(decl, inst, event)
        if transition is None:
            return inst
        if inst is None:
            created, fresh = self.store.create(transition, TRACKER)
            if fresh:
                return created
            return self._apply_once(decl, event)  # another tracker created it first
        return self.store.save(inst, transition, TRACKER)

    # -- stuck detection ------------------------------------------------------

    def stuck_rules(self) -> list[tuple[int, list[tuple[str, int, int]]]]:
        """(expected ms, the (choreography, 1, step index) it applies to), shortest first."""
        by_ms: dict[int, list[tuple[str, int, int]]] = {}
        for decl in {id(d): d for d in self.by_type.values()}.values():
            for index, step in enumerate(decl.steps):
                by_ms.setdefault(step.expected_ms, []).append((decl.name, 1, index))
        return sorted(by_ms.items())

    def flag_stuck(self, now: int, limit: int = 100) -> list[str]:
        """Flag the instances whose expected event is overdue; returns their ids.

        The same flag as the stuck sweep's for orchestrated sagas: ``stuck_since``
        and a ``stuck_detected`` timeline event naming the missing event; the
        next event that moves the instance clears it.
        """
        from engine.store import StuckMark

        by_name = {d.name: d for d in self.by_type.values()}
        marks = []
        for found in self.store.stuck_candidates(now, self.stuck_rules(), limit):
            decl = by_name[found.saga_name]
            step = decl.steps[found.current_step]
            inst = self.store.load(found.id)
            missing = (
                missing_compensations(decl, inst)
                if found.state is SagaState.COMPENSATING
                else [step.done]
            )
            detail = {
                "why": f"expected {', '.join(missing)} within {step.expected_ms // 1000}s "
                "of the last event, and it has not arrived",
                "missing": missing,
                "no_progress_since": found.last_progress_at,
                "allowed_ms": step.expected_ms,
                "policy": "alert",
                "action": "none",
            }
            marks.append(StuckMark(found, step.name, detail))
        return self.store.mark_stuck(marks, now, TRACKER) if marks else []
