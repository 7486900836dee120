"""The states of a saga instance and of its steps, as string enums.

They are stored as their string values, so renaming a member is a migration.
"""

from __future__ import annotations

from enum import StrEnum


class SagaState(StrEnum):
    """Where a saga instance stands."""

    RUNNING = "running"  # moving forward through its steps
    COMPENSATING = "compensating"  # undoing started steps in reverse order
    COMPLETED = "completed"  # every step succeeded (final)
    COMPENSATED = "compensated"  # every started step was undone (final)
    FAILED = "failed"  # dead-lettered: waits for an operator
    CANCELLED = "cancelled"  # an operator stopped it; nothing more runs (final)

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    @property
    def is_active(self) -> bool:
        """True when a worker has (or will have) work to do on it."""
        return self in ACTIVE_STATES


FINAL_STATES = frozenset({SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.CANCELLED})
ACTIVE_STATES = frozenset({SagaState.RUNNING, SagaState.COMPENSATING})


class StepStatus(StrEnum):
    """The forward (action) side of one step."""

    PENDING = "pending"  # not started, or waiting for its next attempt
    RUNNING = "running"  # an attempt started and has no recorded outcome yet
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # retries ran out, or a non-retryable error
    TIMED_OUT = "timed_out"  # the last attempt passed its deadline: outcome unknown
    SKIPPED = "skipped"  # an operator marked it done by hand


class CompensationStatus(StrEnum):
    """The compensation side of one step."""

    NOT_NEEDED = "not_needed"  # nothing to undo (yet)
    PENDING = "pending"  # must be undone, not started or waiting for a retry
    RUNNING = "running"
    COMPENSATED = "compensated"
    FAILED = "failed"  # retries ran out: the saga is dead-lettered
    SKIPPED = "skipped"  # an operator marked it undone by hand


class Phase(StrEnum):
    """Which side of a step an attempt runs."""

    ACTION = "action"
    COMPENSATE = "compensate"


def side_in_play(state: str, comp_status: str) -> Phase:
    """Which side of an instance's current step is, or was last, in play, for people.

    Unlike ``Instance.phase`` (the side a worker or an operator acts on next, which
    is the action once an instance is final), a compensated instance, or one stopped
    while compensating, answers the compensation: that is what ran last.
    """
    if state in (SagaState.COMPENSATING, SagaState.COMPENSATED):
        return Phase.COMPENSATE
    if comp_status != CompensationStatus.NOT_NEEDED:
        return Phase.COMPENSATE
    return Phase.ACTION


class StepKind(StrEnum):
    """Garcia-Molina & Salem's step kinds."""

    COMPENSATABLE = "compensatable"  # before the pivot: undone on failure
    PIVOT = "pivot"  # the point of no return
    RETRIABLE = "retriable"  # after the pivot: only ever moves forward
