"""What a bulk operation is made of: its filter, its items and their outcomes, its limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from engine.errors import (
    InvalidInput,
    InvalidTransition,
    SagaError,
    SagaNotFound,
)
from engine.interventions import Action
from engine.operations import MAX_REASON
from engine.states import SagaState

#: An operation holds at most this many instances; narrow the filter for more.
MAX_ITEMS = 100_000


#: The failure rate is judged once this many items were processed, not on the first one.
MIN_SAMPLE = 10


#: Instances the dry run shows.
SAMPLE_SIZE = 20


#: A runner that has not reported for this long (plus two item intervals) is gone.
STALE_MS = 60_000


MAX_BATCH = 1000


MAX_RATE = 1000.0


MIN_RATE = 0.1


#: Room left in a not-applied note's reason for ": <why it was not applied>".
MAX_BULK_REASON = MAX_REASON - 200


class BulkStatus(StrEnum):
    """Where a bulk operation stands."""

    RUNNING = "running"  # a runner works through its items (or was interrupted: see heartbeat)
    STOPPED = "stopped"  # an operator stopped it
    HALTED = "halted"  # it stopped itself: the failure rate passed the threshold
    COMPLETED = "completed"  # every item was processed


class ItemOutcome(StrEnum):
    """What happened to one instance of a bulk operation."""

    PENDING = "pending"  # not processed yet
    APPLIED = "applied"  # the action was applied
    SKIPPED = "skipped"  # it changed since the snapshot, or no longer allows the action
    ERROR = "error"  # the action could not be applied
    FAILED_AGAIN = "failed_again"  # applied, then dead-lettered again


class SelectionChanged(InvalidTransition):
    """The filter no longer matches the number of instances the operator confirmed."""

    def __init__(self, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        self.saga_id, self.operation, self.state = "", "bulk", ""
        self.why = (
            f"the filter now matches {actual} instance{'s' if actual != 1 else ''}, not the "
            f"{expected} you confirmed; look at the dry run again and confirm the new count"
        )
        SagaError.__init__(self, self.why)


class BulkNotFound(SagaNotFound):
    """No bulk operation has this id."""

    def __init__(self, operation_id: str) -> None:
        self.saga_id = operation_id
        self.operation_id = operation_id
        SagaError.__init__(self, f"no bulk operation with id {operation_id!r}")


# -- the filter ------------------------------------------------------------------


@dataclass(frozen=True)
class BulkFilter:
    """Which instances a bulk operation acts on; at least one field must be set."""

    saga_name: str | None = None
    state: SagaState | None = None
    stuck: bool = False  # only instances the stuck sweep flagged
    step_name: str | None = None  # the current (failing) step
    error_text: str | None = None  # the current step's error contains this (any case)
    time_field: str = "created"  # "created" or "updated": which time the range applies to
    time_from: int | None = None  # epoch ms, inclusive
    time_to: int | None = None  # epoch ms, exclusive

    def __post_init__(self) -> None:
        if self.time_field not in ("created", "updated"):
            raise InvalidInput("time field", f"{self.time_field!r} is not created or updated")
        if (
            self.time_from is not None
            and self.time_to is not None
            and self.time_from >= self.time_to
        ):
            raise InvalidInput("time range", "'from' must be before 'to'")
        if self.is_empty:
            raise InvalidInput(
                "filter",
                "choose at least one of saga type, state, stuck, failing step, error text "
                "or time range; a bulk action over every instance is refused",
            )

    @property
    def is_empty(self) -> bool:
        return not (
            self.saga_name
            or self.state
            or self.stuck
            or self.step_name
            or self.error_text
            or self.time_from is not None
            or self.time_to is not None
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["state"] = None if self.state is None else str(self.state)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BulkFilter:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        if values.get("state"):
            values["state"] = SagaState(values["state"])
        return cls(**values)

    def describe(self) -> str:
        """The filter in words, for confirmations and reports."""
        parts = []
        if self.saga_name:
            parts.append(f"saga type {self.saga_name}")
        if self.state:
            parts.append(f"state {self.state}")
        if self.stuck:
            parts.append("flagged stuck")
        if self.step_name:
            parts.append(f"at step {self.step_name}")
        if self.error_text:
            parts.append(f"error contains “{self.error_text}”")
        if self.time_from is not None or self.time_to is not None:
            parts.append(f"{self.time_field} {_span(self.time_from, self.time_to)}")
        return ", ".join(parts)


def _span(start: int | None, end: int | None) -> str:
    def show(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")

    if start is not None and end is not None:
        return f"from {show(start)} to {show(end)}"
    return f"from {show(start)}" if start is not None else f"before {show(end or 0)}"


# -- records ---------------------------------------------------------------------


@dataclass(frozen=True)
class BulkOperation:
    """One bulk operation and its running totals."""

    id: str
    action: Action
    reason: str
    created_by: str
    created_at: int
    selection: BulkFilter
    batch_size: int
    rate_per_second: float
    max_failure_rate: float
    status: BulkStatus
    total: int
    processed: int
    applied: int
    skipped: int
    errors: int
    failed_again: int
    runner: str | None
    heartbeat_at: int | None
    started_at: int | None
    finished_at: int | None
    stop_requested_at: int | None
    stop_requested_by: str | None
    note: str | None

    @property
    def is_running(self) -> bool:
        return self.status is BulkStatus.RUNNING

    @property
    def failures(self) -> int:
        return self.errors + self.failed_again

    @property
    def failure_rate(self) -> float:
        return self.failures / self.processed if self.processed else 0.0

    @property
    def stale_after_ms(self) -> int:
        """Silence after which the runner counts as gone (an item may wait 1/rate s)."""
        return STALE_MS + int(2000 / self.rate_per_second)

    def interrupted(self, now: int) -> bool:
        """Running, but no runner has reported lately: its process stopped."""
        last = self.created_at if self.heartbeat_at is None else self.heartbeat_at
        return self.is_running and last < now - self.stale_after_ms

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(
            action=str(self.action), status=str(self.status), selection=self.selection.to_json()
        )
        return doc


@dataclass(frozen=True)
class BulkItem:
    """One instance of a bulk operation and its outcome."""

    operation_id: str
    seq: int
    saga_id: str
    saga_name: str
    state_before: str
    version_before: int
    outcome: ItemOutcome
    state_after: str | None
    version_after: int | None
    error: str | None
    processed_at: int | None
    state_now: str | None = None  # the instance's state when read; None once it is purged

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["outcome"] = str(self.outcome)
        return doc


@dataclass(frozen=True)
class SampleItem:
    """An instance the dry run shows, and whether the action applies to it now."""

    saga_id: str
    saga_name: str
    saga_version: int
    state: str
    business_key: str | None
    step_name: str
    error: str | None
    created_at: int
    updated_at: int
    applies: bool | None  # None when this process lacks the saga's definition
    why_not: str | None
    #: "action" or "compensate": the side of the step in play (which side failed, if failed).
    phase: str = "action"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DryRun:
    """What a bulk action would touch: how many instances, and the first of them."""

    action: Action
    selection: BulkFilter
    count: int
    too_many: bool  # more than MAX_ITEMS: refused until the filter is narrower
    sample: list[SampleItem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "filter": self.selection.to_json(),
            "count": self.count,
            "too_many": self.too_many,
            "max_items": MAX_ITEMS,
            "sample": [s.to_json() for s in self.sample],
        }


@dataclass(frozen=True)
class ItemPage:
    items: list[BulkItem]
    next_after: int | None  # the seq to pass as ``after`` for the next page


@dataclass(frozen=True)
class Control:
    """What a runner learns between items."""

    lost: bool  # another runner took the operation over, or it finished
    stop_by: str | None  # who asked it to stop, if anyone
