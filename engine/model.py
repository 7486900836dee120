"""Immutable snapshots of a saga instance, and what a transition produces.

The pure core (:mod:`engine.decide`, :mod:`engine.interventions`) maps one
snapshot to the next; the store maps snapshots to rows. Times are integer
milliseconds since the Unix epoch (UTC) everywhere, so comparisons are the
same on PostgreSQL and SQLite.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from engine.states import CompensationStatus, Phase, SagaState, StepStatus


class EventKind(StrEnum):
    """What a timeline event records."""

    SAGA_STARTED = "saga_started"
    ATTEMPT_STARTED = "attempt_started"
    ATTEMPT_SUCCEEDED = "attempt_succeeded"
    ATTEMPT_FAILED = "attempt_failed"
    ATTEMPT_TIMED_OUT = "attempt_timed_out"
    ATTEMPT_ABANDONED = "attempt_abandoned"
    STEP_FAILED = "step_failed"
    COMPENSATION_STARTED = "compensation_started"
    SAGA_COMPLETED = "saga_completed"
    SAGA_COMPENSATED = "saga_compensated"
    DEAD_LETTERED = "dead_lettered"
    RESULT_DISCARDED = "result_discarded"
    SIGNAL_RECEIVED = "signal_received"
    OPERATOR_RETRY = "operator_retry"
    OPERATOR_SKIP = "operator_skip"
    OPERATOR_COMPENSATE = "operator_compensate"
    OPERATOR_CANCEL = "operator_cancel"
    STUCK_DETECTED = "stuck_detected"  # the stuck sweep flagged it: no progress for too long
    STUCK_CLEARED = "stuck_cleared"  # it changed since it was flagged: the flag was lifted


@dataclass(frozen=True)
class StepState:
    """One step's forward and compensation progress."""

    index: int
    name: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    # Attempts before this count were granted by an earlier budget; an
    # operator retry moves the base up instead of renumbering attempts, so
    # attempt numbers stay unique for the life of the instance.
    attempts_base: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    deadline_at: int | None = None
    output: Any = None
    error: str | None = None
    comp_status: CompensationStatus = CompensationStatus.NOT_NEEDED
    comp_attempts: int = 0
    comp_attempts_base: int = 0
    comp_started_at: int | None = None
    comp_finished_at: int | None = None
    comp_deadline_at: int | None = None
    comp_error: str | None = None

    def attempts_of(self, phase: Phase) -> int:
        return self.attempts if phase is Phase.ACTION else self.comp_attempts

    def budget_used(self, phase: Phase) -> int:
        if phase is Phase.ACTION:
            return self.attempts - self.attempts_base
        return self.comp_attempts - self.comp_attempts_base

    @property
    def action_started(self) -> bool:
        return self.attempts > 0


@dataclass(frozen=True)
class Instance:
    """A saga instance as the pure core sees it."""

    id: str
    saga_name: str
    saga_version: int
    state: SagaState
    cursor: int
    steps: tuple[StepState, ...]
    payload: Any
    correlation_id: str
    business_key: str | None = None
    idempotency_key: str | None = None
    version: int = 1
    created_at: int = 0
    updated_at: int = 0
    last_progress_at: int = 0
    next_run_at: int | None = None
    lease_owner: str | None = None
    lease_expires_at: int | None = None
    #: "orchestrated", or "choreographed": tracked from domain events (engine.choreography).
    kind: str = "orchestrated"

    @property
    def current(self) -> StepState:
        return self.steps[self.cursor]

    @property
    def phase(self) -> Phase:
        """The side of the current step that is (or was last) in play."""
        if self.state is SagaState.COMPENSATING:
            return Phase.COMPENSATE
        if self.state is SagaState.FAILED and self.current.comp_status is CompensationStatus.FAILED:
            return Phase.COMPENSATE
        return Phase.ACTION

    def outputs(self) -> dict[str, Any]:
        """Outputs of the steps that succeeded, by step name."""
        return {s.name: s.output for s in self.steps if s.status is StepStatus.SUCCEEDED}

    def with_step(self, step: StepState) -> Instance:
        steps = list(self.steps)
        steps[step.index] = step
        return evolve(self, steps=tuple(steps))


@dataclass(frozen=True)
class Event:
    """One timeline entry; the store adds saga id, correlation id, time and actor."""

    kind: EventKind
    step_index: int | None = None
    phase: Phase | None = None
    attempt: int | None = None
    error: str | None = None
    traceback: str | None = None
    detail: dict[str, Any] | None = None
    at: int | None = None  # when it happened; the store uses the save time if unset


@dataclass(frozen=True)
class DeadLetter:
    """Why an instance waits for an operator."""

    step_index: int
    phase: Phase
    error: str
    traceback: str | None
    attempts: int


@dataclass(frozen=True)
class Transition:
    """The next snapshot and what to record with it, in one transaction."""

    instance: Instance
    events: tuple[Event, ...] = ()
    dead_letter: DeadLetter | None = None
    resolves_dead_letter: bool = False

    def then(self, nxt: Transition) -> Transition:
        """This transition followed by ``nxt``, to be stored as one."""
        return Transition(
            instance=nxt.instance,
            events=self.events + nxt.events,
            dead_letter=nxt.dead_letter or self.dead_letter,
            resolves_dead_letter=self.resolves_dead_letter or nxt.resolves_dead_letter,
        )


@dataclass(frozen=True)
class Failure:
    """How an attempt ended badly."""

    message: str
    traceback: str | None = None
    retryable: bool = True
    timed_out: bool = False
    abandoned: bool = False


@dataclass(frozen=True)
class StartRequest:
    """Everything needed to create an instance."""

    saga_name: str
    payload: Any
    correlation_id: str
    business_key: str | None = None
    idempotency_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def idempotency_key(saga_id: str, step: str, phase: Phase) -> str:
    """The key every attempt of one side of one step carries (``<saga>:<step>:<phase>``):
    stable across attempts and operator retries, so a participant's guard runs the
    effect once however often the step is tried."""
    return f"{saga_id}:{step}:{phase}"


def action_key_of(key: str) -> str | None:
    """The action's key for the compensation key ``key`` (``<saga>:<step>:compensate``);
    None for any other key."""
    head, sep, phase = key.rpartition(":")
    if not sep or not head or phase != str(Phase.COMPENSATE):
        return None
    return f"{head}:{Phase.ACTION}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _IdClock:
    """The (millisecond, counter) of the last id, so ids made in one process only grow.

    RFC 9562 lets version 7 use its 12 ``rand_a`` bits as a counter within a
    millisecond: two instances started in the same millisecond still list in
    the order they were started.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (0, 0)

    def next(self, ms: int) -> tuple[int, int]:
        with self._lock:
            last_ms, counter = self._last
            if ms > last_ms:
                counter = int.from_bytes(os.urandom(2), "big") & 0x3FF  # room to count up
            elif counter < 0xFFF:
                ms, counter = last_ms, counter + 1
            else:  # 4,096 ids in one millisecond: borrow the next one
                ms, counter = last_ms + 1, 0
            self._last = (ms, counter)
            return ms, counter


_id_clock = _IdClock()


def new_id(at_ms: int | None = None) -> str:
    """A time-ordered UUID (version 7 layout); ids from one process strictly increase."""
    ms, counter = _id_clock.next(now_ms() if at_ms is None else at_ms)
    rand = int.from_bytes(os.urandom(8), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64
    value |= 0b10 << 62 | rand & ((1 << 62) - 1)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_Model = TypeVar("_Model")


def evolve(obj: _Model, **changes: Any) -> _Model:
    """A copy of the model object ``obj`` (a frozen dataclass above) with ``changes``.

    What :func:`dataclasses.replace` does, several times faster: that one goes
    through ``__init__`` with every field, and a saga's hot path copies snapshots
    a few dozen times (see bench/README.md). Only for the dataclasses of this
    module, which have no ``__post_init__`` and no init-only fields.
    """
    fields = obj.__dataclass_fields__  # type: ignore[attr-defined]
    assert changes.keys() <= fields.keys(), f"no such field: {changes.keys() - fields.keys()}"
    copy = object.__new__(type(obj))
    state = copy.__dict__
    state.update(obj.__dict__)
    state.update(changes)
    return copy
