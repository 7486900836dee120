"""What a bulk operation is made of: its filter, its items and their outcomes, its limits.

An item's outcome, in two parts
-------------------------------
``outcome`` says what the action did, when the runner came to the item:

- ``pending``: not processed yet (a stopped or halted operation leaves the rest pending:
  nothing was done to them, and nothing will be);
- ``skipped``: not applied: the instance changed since the dry run, its state no longer
  allows the action, or it is gone. Nothing was done. Final;
- ``error``: not applied: the action could not be applied (say this process lacks the
  saga's definition). Nothing was done. Final;
- ``applied``: the action was *accepted*: its transition committed, with its audit entry.
  That is all ``applied`` claims; what became of the instance is ``result``;
- ``failed_again``: applied, and then the instance failed again (its ``result`` below).
  Kept as an outcome of its own so that ``applied`` counts only the rest.

``result`` (null unless the action was accepted) says what became of the instance after
it, followed from the store until it ends (:mod:`engine.outcomes` has the rules):
``running`` (not ended yet), ``completed``, ``compensated``, ``cancelled``,
``failed_again`` (a dead letter was recorded after the action, or it is failed now),
``superseded`` (another operator action changed it before it ended) or ``gone`` (purged
before an end was seen). ``ended_at`` is when it ended.

An item's outcome is *final* when it is ``skipped`` or ``error``, or when it was applied
and its ``result`` is anything but ``running``; a final outcome never changes. A pending
item of an operation that ended (stopped, halted) is final too: it was never acted on.
The operation is *settled* when it has ended and every item's outcome is final; until
then the report keeps following (the console's report page polls, ``saga bulk show``
follows on each call).

The failure threshold is judged on final outcomes: once at least :data:`MIN_SAMPLE` items
have one, the run halts when the share of them that are ``error`` or ``failed_again``
passes ``max_failure_rate``.
"""

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
from engine.inputs import MAX_KEY, MAX_NAME, check_filter, check_millis
from engine.interventions import Action
from engine.operations import MAX_REASON
from engine.outcomes import Result
from engine.states import SagaState

#: An operation holds at most this many instances; narrow the filter for more.
MAX_ITEMS = 100_000


#: The failure rate is judged once this many items have a final outcome, not on the first one.
MIN_SAMPLE = 10


#: A dry run's snapshot can be confirmed for this long; then it is gone (the retention
#: sweep and every dry run delete expired ones; a confirmation deletes the one it used).
SNAPSHOT_TTL_MS = 3_600_000


#: A runner follows its applied items at least this often (seconds), and after each batch.
FOLLOW_EVERY = 1.0


#: Items whose instances one follow query reads at a time.
FOLLOW_BATCH = 500


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
    """What the action did to one instance of a bulk operation (module docstring)."""

    PENDING = "pending"  # not processed yet
    APPLIED = "applied"  # the action was accepted; ``result`` says what became of it
    SKIPPED = "skipped"  # it changed since the snapshot, or no longer allows the action
    ERROR = "error"  # the action could not be applied
    FAILED_AGAIN = "failed_again"  # accepted, then the instance failed again


class SnapshotGone(InvalidTransition):
    """The dry run a confirmation names expired, or was confirmed already."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.saga_id, self.operation, self.state = "", "bulk", ""
        self.why = (
            "the dry run you confirmed is older than an hour or was confirmed already; "
            "nothing was started"
        )
        SagaError.__init__(self, self.why)


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
    #: Leave out the instances of this bulk operation (a run again for those that matched
    #: on top of what it previewed); it narrows, so it does not count as a filter alone.
    outside: str | None = None

    def __post_init__(self) -> None:
        # Matched against the store: text it could not take is bad input, not a database error.
        check_filter("saga name", self.saga_name, limit=MAX_NAME)
        check_filter("step name", self.step_name, limit=MAX_NAME)
        check_filter("error text", self.error_text, limit=MAX_KEY)
        check_millis("from", self.time_from)
        check_millis("to", self.time_to)
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
        if self.outside:
            parts.append(f"not in bulk operation {self.outside}")
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
    #: The origin of whoever created it (:mod:`engine.origins`): its items' audit
    #: entries are recorded with it. ``unknown`` for operations before schema 0011.
    origin: str = "unknown"
    origin_detail: str | None = None
    more_matching: int = 0  # matched at confirmation on top of the dry run's; not acted on
    #: Accepted items by :class:`Result` (``running`` ... ``gone``), as last followed.
    results: dict[str, int] = field(default_factory=dict)

    @property
    def is_running(self) -> bool:
        return self.status is BulkStatus.RUNNING

    @property
    def accepted(self) -> int:
        """Items whose action was accepted (whatever became of them since)."""
        return self.applied + self.failed_again

    @property
    def still_running(self) -> int:
        """Accepted items whose instance has not ended yet."""
        return self.results.get(str(Result.RUNNING), 0)

    @property
    def ended(self) -> int:
        """Processed items whose outcome is final (module docstring)."""
        return self.processed - self.still_running

    @property
    def settled(self) -> bool:
        """It has ended and every item's outcome is final: nothing left to follow."""
        return not self.is_running and self.still_running == 0

    @property
    def failures(self) -> int:
        return self.errors + self.failed_again

    @property
    def failure_rate(self) -> float:
        """The share of items with a final outcome that failed (error or failed again)."""
        return self.failures / self.ended if self.ended > 0 else 0.0

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
            action=str(self.action),
            status=str(self.status),
            selection=self.selection.to_json(),
            results={str(r): self.results.get(str(r), 0) for r in Result},
            accepted=self.accepted,
            ended=self.ended,
            settled=self.settled,
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
    acted_at: int | None = None  # when the instance took the action (its stored time)
    result: Result | None = None  # what became of it; None unless the action was accepted
    ended_at: int | None = None  # when that result became final
    state_now: str | None = None  # the instance's state when read; None once it is purged

    @property
    def final(self) -> bool:
        """Whether this item's outcome can still change (module docstring)."""
        if self.outcome is ItemOutcome.PENDING:
            return False
        return self.result is None or self.result.is_final

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(
            outcome=str(self.outcome),
            result=None if self.result is None else str(self.result),
            final=self.final,
        )
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
    #: The token a confirmation passes to act on exactly these instances (None: nothing kept).
    snapshot: str | None = None
    expires_at: int | None = None  # when the snapshot can no longer be confirmed

    def to_json(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "filter": self.selection.to_json(),
            "count": self.count,
            "too_many": self.too_many,
            "max_items": MAX_ITEMS,
            "sample": [s.to_json() for s in self.sample],
            "snapshot": self.snapshot,
            "expires_at": self.expires_at,
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
