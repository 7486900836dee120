"""What became of an instance after an operator's action: followed until it ends.

An operator action (retry, skip, force-compensate, cancel, edit-and-retry,
resolve), alone or as an item of a bulk operation, is *accepted* when its
transition committed. That says nothing yet about how the instance ends: a
retried step may fail again. :func:`follow` answers "what became of it"
from what the store knows of the instance since the action (a
:class:`Trace`), with no I/O, for the bulk report and the instance page
alike.

The results, in the order they are looked for:

``failed_again``
    a dead letter was recorded for the instance at or after the action (and
    before any later operator action), or the instance is ``failed`` now:
    the action did not get it through. Final, even when someone (or the
    dead-letter sweep) retries it later: that is a new action with its own
    result.
``superseded``
    another operator action changed the instance after this one, before it
    ended: what happens next is that action's result. Final.
``completed``, ``compensated``, ``cancelled``
    the instance reached that final state. Final.
``gone``
    the instance no longer exists (purged) and no end was seen. Final.
``running``
    none of the above yet: the instance is still running or compensating
    (or waiting). Not final; it is followed again on the next look.

A result is final once it is anything but ``running``; a final result never
changes, and its time is when the instance ended (the dead letter's time,
the other action's time, or the last change of the final state).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from engine.states import SagaState


class Result(StrEnum):
    """What became of an instance after an accepted action (see the module docstring)."""

    RUNNING = "running"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    CANCELLED = "cancelled"
    FAILED_AGAIN = "failed_again"
    SUPERSEDED = "superseded"
    GONE = "gone"

    @property
    def is_final(self) -> bool:
        """Whether this result can no longer change."""
        return self is not Result.RUNNING

    @property
    def is_failure(self) -> bool:
        """Whether it counts against a bulk operation's failure threshold."""
        return self is Result.FAILED_AGAIN


#: The final states an instance ends in by itself, and the result each one is.
_ENDS = {
    str(SagaState.COMPLETED): Result.COMPLETED,
    str(SagaState.COMPENSATED): Result.COMPENSATED,
    str(SagaState.CANCELLED): Result.CANCELLED,
    str(SagaState.FAILED): Result.FAILED_AGAIN,
}


@dataclass(frozen=True)
class LaterAction:
    """An operator action on the instance, as the audit log has it."""

    at: int
    actor: str
    action: str
    version_before: int


@dataclass(frozen=True)
class Trace:
    """What the store knows of one instance: now, its dead letters and its operator actions."""

    state: str | None  # None: the instance no longer exists
    updated_at: int | None
    dead_letters: tuple[int, ...] = ()  # when each was recorded, oldest first
    actions: tuple[LaterAction, ...] = ()  # state-changing operator actions, oldest first


@dataclass(frozen=True)
class Followed:
    """The result of one action, when it became final, and (superseded) by what."""

    result: Result
    ended_at: int | None  # None while running
    by: str | None = None  # superseded: "<action> by <actor>"

    @property
    def is_final(self) -> bool:
        return self.result.is_final


def follow(acted_at: int, version_after: int, trace: Trace, now: int) -> Followed:
    """The result of an action accepted at ``acted_at`` that left version ``version_after``."""
    dead = next((d for d in trace.dead_letters if d >= acted_at), None)
    later = next(
        (a for a in trace.actions if a.version_before >= version_after and a.at >= acted_at),
        None,
    )
    if dead is not None and (later is None or dead <= later.at):
        return Followed(Result.FAILED_AGAIN, dead)
    if later is not None:
        return Followed(Result.SUPERSEDED, later.at, f"{later.action} by {later.actor}")
    if trace.state is None:
        return Followed(Result.GONE, now)
    ended = _ENDS.get(trace.state)
    if ended is None:
        return Followed(Result.RUNNING, None)
    return Followed(ended, trace.updated_at)
