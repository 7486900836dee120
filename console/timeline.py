"""The instance page's view of each step, built from the snapshot and its timeline events.

Attempts are not stored as rows: each is an ``attempt_started`` event and
the event that ended it (succeeded, failed, timed out, abandoned), matched
by step, phase and attempt number, which stay unique for an instance's life.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from console.services import Saga
from engine.model import EventKind, Instance, idempotency_key
from engine.queries import EventRecord
from engine.states import CompensationStatus, Phase, StepStatus

_ENDINGS = {
    EventKind.ATTEMPT_SUCCEEDED.value: "succeeded",
    EventKind.ATTEMPT_FAILED.value: "failed",
    EventKind.ATTEMPT_TIMED_OUT.value: "timed_out",
    EventKind.ATTEMPT_ABANDONED.value: "abandoned",
}


@dataclass
class Attempt:
    """One try of a step's action or compensation."""

    phase: str
    number: int
    started_at: int | None = None
    ended_at: int | None = None
    outcome: str = "running"  # until an ending event says otherwise
    error: str | None = None
    traceback: str | None = None
    actor: str | None = None

    @property
    def duration_ms(self) -> int | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at


@dataclass
class StepView:
    """A step's forward and compensation status, attempts and idempotency keys."""

    index: int
    name: str
    kind: str | None
    status: str
    comp_status: str
    error: str | None
    comp_error: str | None
    output: Any
    is_current: bool
    action_key: str
    compensate_key: str
    action_duplicates: int = 0
    compensate_duplicates: int = 0
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def action_attempts(self) -> list[Attempt]:
        return [a for a in self.attempts if a.phase == Phase.ACTION.value]

    @property
    def compensate_attempts(self) -> list[Attempt]:
        return [a for a in self.attempts if a.phase == Phase.COMPENSATE.value]


def idempotency_keys(inst: Instance) -> list[str]:
    return [idempotency_key(inst.id, s.name, p) for s in inst.steps for p in Phase]


def build_steps(
    inst: Instance, events: Iterable[EventRecord], duplicates: Mapping[str, int], defn: Saga | None
) -> list[StepView]:
    """One view per step, oldest attempt first."""
    views = [_step_view(inst, i, duplicates, defn) for i in range(len(inst.steps))]
    for attempt_step, attempt in _attempts(events):
        if 0 <= attempt_step < len(views):
            if attempt.outcome == "running" and not _in_flight(inst, attempt_step, attempt):
                # No ending event, and the step has moved on (an operator
                # stopped it, or the instance was cancelled): not running.
                attempt.outcome = "interrupted"
            views[attempt_step].attempts.append(attempt)
    return views


def _in_flight(inst: Instance, index: int, attempt: Attempt) -> bool:
    step = inst.steps[index]
    if attempt.phase == Phase.ACTION.value:
        return step.status is StepStatus.RUNNING and attempt.number == step.attempts
    return step.comp_status is CompensationStatus.RUNNING and attempt.number == step.comp_attempts


def _step_view(
    inst: Instance, index: int, duplicates: Mapping[str, int], defn: Saga | None
) -> StepView:
    step = inst.steps[index]
    action_key = idempotency_key(inst.id, step.name, Phase.ACTION)
    compensate_key = idempotency_key(inst.id, step.name, Phase.COMPENSATE)
    kind = str(defn.steps[index].kind) if defn is not None and index < len(defn.steps) else None
    return StepView(
        index=index,
        name=step.name,
        kind=kind,
        status=str(step.status),
        comp_status=str(step.comp_status),
        error=step.error,
        comp_error=step.comp_error,
        output=step.output,
        is_current=index == inst.cursor and not inst.state.is_final,
        action_key=action_key,
        compensate_key=compensate_key,
        action_duplicates=duplicates.get(action_key, 0),
        compensate_duplicates=duplicates.get(compensate_key, 0),
    )


def _attempts(events: Iterable[EventRecord]) -> list[tuple[int, Attempt]]:
    found: dict[tuple[int, str, int], Attempt] = {}
    for ev in events:
        if ev.step_index is None or ev.attempt is None or ev.phase is None:
            continue
        key = (ev.step_index, ev.phase, ev.attempt)
        if ev.kind == EventKind.ATTEMPT_STARTED.value:
            found[key] = Attempt(ev.phase, ev.attempt, started_at=ev.at, actor=ev.actor)
        elif ev.kind in _ENDINGS:
            attempt = found.setdefault(key, Attempt(ev.phase, ev.attempt))
            attempt.ended_at, attempt.outcome = ev.at, _ENDINGS[ev.kind]
            attempt.error, attempt.traceback = ev.error, ev.traceback
    return [(key[0], attempt) for key, attempt in found.items()]
