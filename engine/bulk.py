"""Bulk recovery: one operator action over every instance a filter matches, paced and stoppable.

The flow, for the console and ``saga bulk`` alike:

1. :meth:`BulkRecovery.dry_run` counts the instances a :class:`BulkFilter`
   matches and shows a sample, with whether the action applies to each. It
   writes nothing.
2. :meth:`BulkRecovery.create` snapshots the matching instances as the
   operation's items, in one transaction, and refuses
   (:class:`SelectionChanged`) when their number is not the one the operator
   confirmed.
3. A :class:`BulkRunner` works through the items in batches at a rate
   limit. Each item goes through the operations API, with the operator as
   actor, the bulk reason, and the version the snapshot saw, so an instance
   that moved on since is skipped, never acted on blind. Between items it
   checks the stop flag in the store, so a stop works from any process;
   after each item it checks the failure rate and halts itself when it
   passes the threshold.

Everything lives in the store (``saga_bulk_operations`` and
``saga_bulk_items``): the report survives restarts, and a run whose process
died shows as interrupted and can be resumed by any process. Each item's
outcome is also in the audit log: the applied action's own entry, or a
``bulk_not_applied`` note saying why it was not applied.

Outcomes of an item: ``applied``; ``skipped`` (the instance changed since
the snapshot, its state no longer allows the action, or it is gone:
nothing was done); ``error`` (the action could not be applied, say its
saga definition is not loaded); ``failed_again`` (applied, and the
instance has since been dead-lettered again: a retry whose cause is not
fixed). Errors and failures again count towards the failure rate.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine as SAEngine

from engine import interventions
from engine import schema as t
from engine.errors import (
    ConcurrencyConflict,
    InvalidInput,
    InvalidTransition,
    SagaError,
    SagaNotFound,
    UnknownSaga,
)
from engine.interventions import Action
from engine.model import new_id, now_ms
from engine.operations import MAX_REASON
from engine.states import SagaState

if TYPE_CHECKING:
    from engine.app import SagaEngine
    from engine.operations import Operations

log = logging.getLogger(__name__)

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
    from datetime import UTC, datetime

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


# -- SQL -------------------------------------------------------------------------


def _matching(flt: BulkFilter) -> sa.Select[Any]:
    """Instances matching ``flt`` with their current step, in the order they are processed."""
    i, s = t.instances.c, t.steps.c
    query = sa.select(
        i.id,
        i.saga_name,
        i.saga_version,
        i.state,
        i.version,
        i.business_key,
        i.created_at,
        i.updated_at,
        s.name.label("step_name"),
        sa.func.coalesce(s.comp_error, s.error).label("error"),
    ).join(t.steps, sa.and_(s.saga_id == i.id, s.step_index == i.current_step))
    if flt.saga_name:
        query = query.where(i.saga_name == flt.saga_name)
    if flt.state is not None:
        query = query.where(i.state == str(flt.state))
    if flt.stuck:
        query = query.where(i.stuck_since.is_not(None))
    if flt.step_name:
        query = query.where(s.name == flt.step_name)
    if flt.error_text:
        text = flt.error_text
        query = query.where(
            sa.or_(
                s.error.icontains(text, autoescape=True),
                s.comp_error.icontains(text, autoescape=True),
            )
        )
    column = i.created_at if flt.time_field == "created" else i.updated_at
    if flt.time_from is not None:
        query = query.where(column >= flt.time_from)
    if flt.time_to is not None:
        query = query.where(column < flt.time_to)
    return query.order_by(i.created_at, i.id)


class BulkStore:
    """Reads and writes ``saga_bulk_operations`` and ``saga_bulk_items``."""

    def __init__(self, db: SAEngine) -> None:
        self.db = db

    def count(self, flt: BulkFilter, cap: int = MAX_ITEMS) -> int:
        """How many instances match, counting at most ``cap + 1``."""
        limited = _matching(flt).limit(cap + 1).subquery()
        with self.db.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(limited)).scalar_one())

    def sample(self, flt: BulkFilter, limit: int) -> list[Any]:
        with self.db.connect() as c:
            return list(c.execute(_matching(flt).limit(limit)).mappings())

    def insert(self, op: dict[str, Any], flt: BulkFilter, expected: int) -> None:
        """Store the operation and snapshot its items; SelectionChanged rolls both back."""
        with self.db.begin() as c:
            c.execute(t.bulk_operations.insert().values(**op))
            found = _matching(flt).limit(MAX_ITEMS + 1).subquery()
            numbered = sa.select(
                sa.literal(op["id"]),
                sa.func.row_number().over(order_by=(found.c.created_at, found.c.id)),
                found.c.id,
                found.c.saga_name,
                found.c.state,
                found.c.version,
                sa.literal(str(ItemOutcome.PENDING)),
            )
            columns = [
                "operation_id",
                "seq",
                "saga_id",
                "saga_name",
                "state_before",
                "version_before",
                "outcome",
            ]
            c.execute(t.bulk_items.insert().from_select(columns, numbered))
            b = t.bulk_items.c
            total = int(
                c.execute(sa.select(sa.func.count()).where(b.operation_id == op["id"])).scalar_one()
            )
            if total > MAX_ITEMS:
                raise _too_many()
            if total != expected:
                raise SelectionChanged(expected, total)
            ops = t.bulk_operations.c
            c.execute(t.bulk_operations.update().where(ops.id == op["id"]).values(total=total))

    def get(self, operation_id: str) -> BulkOperation:
        with self.db.connect() as c:
            row = (
                c.execute(
                    sa.select(t.bulk_operations).where(t.bulk_operations.c.id == operation_id)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise BulkNotFound(operation_id)
        return _operation(row)

    def recent(self, limit: int = 50, before: str | None = None) -> list[BulkOperation]:
        """Operations, newest first; ``before`` is the id of the last one of the previous page."""
        ops = t.bulk_operations.c
        query = sa.select(t.bulk_operations).order_by(ops.created_at.desc(), ops.id.desc())
        if before:
            last = self.get(before)
            query = query.where(
                sa.tuple_(ops.created_at, ops.id) < sa.tuple_(last.created_at, last.id)
            )
        with self.db.connect() as c:
            return [_operation(r) for r in c.execute(query.limit(limit)).mappings()]

    def items(
        self,
        operation_id: str,
        *,
        outcome: ItemOutcome | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> ItemPage:
        """Items in processing order, from ``after`` (a seq), optionally of one outcome."""
        b, i = t.bulk_items.c, t.instances.c
        query = (
            sa.select(t.bulk_items, i.state.label("state_now"))
            .outerjoin(t.instances, i.id == b.saga_id)
            .where(b.operation_id == operation_id, b.seq > after)
            .order_by(b.seq)
            .limit(limit + 1)
        )
        if outcome is not None:
            query = query.where(b.outcome == str(outcome))
        with self.db.connect() as c:
            rows = [_item(r) for r in c.execute(query).mappings()]
        more = len(rows) > limit
        return ItemPage(rows[:limit], rows[limit - 1].seq if more else None)

    def claim(self, operation_id: str, runner: str, now: int) -> BulkOperation | None:
        """Become the runner of a running operation nobody (alive) runs; None if taken."""
        op = self.get(operation_id)
        if not op.is_running:
            return None
        ops = t.bulk_operations.c
        stale = now - op.stale_after_ms
        with self.db.begin() as c:
            taken = c.execute(
                t.bulk_operations.update()
                .where(
                    ops.id == operation_id,
                    ops.status == str(BulkStatus.RUNNING),
                    sa.or_(ops.runner.is_(None), ops.heartbeat_at < stale),
                )
                .values(
                    runner=runner,
                    heartbeat_at=now,
                    started_at=sa.func.coalesce(ops.started_at, now),
                )
            ).rowcount
        return self.get(operation_id) if taken == 1 else None

    def beat(self, operation_id: str, runner: str, now: int) -> Control:
        """Report that ``runner`` is alive; learn whether it must stop."""
        ops = t.bulk_operations.c
        with self.db.begin() as c:
            mine = c.execute(
                t.bulk_operations.update()
                .where(
                    ops.id == operation_id,
                    ops.runner == runner,
                    ops.status == str(BulkStatus.RUNNING),
                )
                .values(heartbeat_at=now)
            ).rowcount
            stop_by = c.execute(
                sa.select(ops.stop_requested_by).where(
                    ops.id == operation_id, ops.stop_requested_at.is_not(None)
                )
            ).scalar()
        return Control(lost=mine != 1, stop_by=stop_by)

    def pending(self, operation_id: str, limit: int) -> list[BulkItem]:
        return self.items(operation_id, outcome=ItemOutcome.PENDING, limit=limit).items

    def record(
        self,
        item: BulkItem,
        outcome: ItemOutcome,
        now: int,
        *,
        state_after: str | None = None,
        version_after: int | None = None,
        error: str | None = None,
    ) -> None:
        """Store one item's outcome and count it, in one transaction."""
        b, ops = t.bulk_items.c, t.bulk_operations.c
        with self.db.begin() as c:
            done = c.execute(
                t.bulk_items.update()
                .where(
                    b.operation_id == item.operation_id,
                    b.seq == item.seq,
                    b.outcome == str(ItemOutcome.PENDING),
                )
                .values(
                    outcome=str(outcome),
                    state_after=state_after,
                    version_after=version_after,
                    error=error,
                    processed_at=now,
                )
            ).rowcount
            if done != 1:
                return  # recorded already (a resumed run): count it once
            counter = _COUNTERS[outcome]
            c.execute(
                t.bulk_operations.update()
                .where(ops.id == item.operation_id)
                .values({"processed": ops.processed + 1, counter: ops[counter] + 1})
            )

    def mark_failed_again(self, operation_id: str) -> int:
        """Items applied whose instance was dead-lettered since; returns how many were new."""
        b, i, ops = t.bulk_items.c, t.instances.c, t.bulk_operations.c
        again = sa.exists().where(
            i.id == b.saga_id,
            i.state == str(SagaState.FAILED),
            i.version > b.version_after,
        )
        with self.db.begin() as c:
            found = c.execute(
                t.bulk_items.update()
                .where(
                    b.operation_id == operation_id,
                    b.outcome == str(ItemOutcome.APPLIED),
                    again,
                )
                .values(outcome=str(ItemOutcome.FAILED_AGAIN))
            ).rowcount
            if found:
                c.execute(
                    t.bulk_operations.update()
                    .where(ops.id == operation_id)
                    .values(applied=ops.applied - found, failed_again=ops.failed_again + found)
                )
        return int(found)

    def request_stop(self, operation_id: str, by: str, now: int) -> bool:
        """Raise the stop flag; False when the operation was not running or already asked."""
        ops = t.bulk_operations.c
        with self.db.begin() as c:
            return (
                c.execute(
                    t.bulk_operations.update()
                    .where(
                        ops.id == operation_id,
                        ops.status == str(BulkStatus.RUNNING),
                        ops.stop_requested_at.is_(None),
                    )
                    .values(stop_requested_at=now, stop_requested_by=by)
                ).rowcount
                == 1
            )

    def finish(
        self, operation_id: str, runner: str | None, status: BulkStatus, note: str, now: int
    ) -> None:
        """End a running operation (only its runner may, or anyone when ``runner`` is None)."""
        ops = t.bulk_operations.c
        query = t.bulk_operations.update().where(
            ops.id == operation_id, ops.status == str(BulkStatus.RUNNING)
        )
        if runner is not None:
            query = query.where(ops.runner == runner)
        with self.db.begin() as c:
            c.execute(query.values(status=str(status), finished_at=now, note=note, runner=None))

    def release(self, operation_id: str, runner: str, note: str) -> None:
        """Give up running it (the runner failed); it shows as interrupted and can resume."""
        ops = t.bulk_operations.c
        with self.db.begin() as c:
            c.execute(
                t.bulk_operations.update()
                .where(ops.id == operation_id, ops.runner == runner)
                .values(runner=None, heartbeat_at=0, note=note)
            )


_COUNTERS = {
    ItemOutcome.APPLIED: "applied",
    ItemOutcome.SKIPPED: "skipped",
    ItemOutcome.ERROR: "errors",
    ItemOutcome.FAILED_AGAIN: "failed_again",
}


def _operation(row: Any) -> BulkOperation:
    values = dict(row)
    values.update(
        action=Action(row["action"]),
        status=BulkStatus(row["status"]),
        selection=BulkFilter.from_json(row["selection"]),
    )
    return BulkOperation(**values)


def _item(row: Any) -> BulkItem:
    values = dict(row)
    values["outcome"] = ItemOutcome(row["outcome"])
    return BulkItem(**values)


def _too_many() -> InvalidInput:
    return InvalidInput(
        "filter", f"it matches more than {MAX_ITEMS:,} instances; narrow it (one bulk at a time)"
    )


# -- pacing ----------------------------------------------------------------------


class RateLimiter:
    """Spaces calls of :meth:`wait` at least ``1/rate`` seconds apart (no bursts).

    So any window of ``w`` seconds holds at most ``w * rate + 1`` calls. The
    clock and sleep are injected, so tests check the schedule, not the speed.
    """

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not MIN_RATE <= rate <= MAX_RATE:
            raise InvalidInput("rate", f"must be between {MIN_RATE} and {MAX_RATE:g} per second")
        self.interval = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self._next: float | None = None

    def wait(self) -> None:
        """Return at the next free slot, sleeping until then if needed."""
        now = self.clock()
        slot = now if self._next is None else max(self._next, now)
        if slot > now:
            self.sleep(slot - now)
        self._next = slot + self.interval


# -- running ---------------------------------------------------------------------


@dataclass
class _Tally:
    processed: int
    failures: int


class BulkRunner:
    """Works through one operation's items; one runner per operation at a time."""

    def __init__(
        self,
        bulk: BulkStore,
        operations: Operations,
        runner_id: str,
        *,
        now: Callable[[], int] = now_ms,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bulk = bulk
        self.operations = operations
        self.runner_id = runner_id
        self.now = now
        self.monotonic = monotonic
        self.sleep = sleep

    def run(self, operation_id: str) -> BulkOperation:
        """Process the pending items until done, stopped, halted or taken over."""
        op = self.bulk.claim(operation_id, self.runner_id, self.now())
        if op is None:
            return self.bulk.get(operation_id)  # finished, or another runner has it
        log.info(
            "bulk %s: %s on %d instances, run by %s", op.id, op.action, op.total, op.created_by
        )
        limiter = RateLimiter(op.rate_per_second, self.monotonic, self.sleep)
        tally = _Tally(op.processed, op.failures)
        while True:
            batch = self.bulk.pending(op.id, op.batch_size)
            if not batch:
                return self._end(op, BulkStatus.COMPLETED, "every instance was processed")
            for item in batch:
                control = self.bulk.beat(op.id, self.runner_id, self.now())
                if control.lost:
                    log.warning("bulk %s: another runner took over; this one stops", op.id)
                    return self.bulk.get(op.id)
                if control.stop_by is not None:
                    return self._end(op, BulkStatus.STOPPED, f"stopped by {control.stop_by}")
                limiter.wait()
                tally.processed += 1
                tally.failures += self._process(op, item)
                if self._too_many_failures(op, tally):
                    return self._halt(op, tally)
            tally.failures += self.bulk.mark_failed_again(op.id)
            if self._too_many_failures(op, tally):
                return self._halt(op, tally)

    def _process(self, op: BulkOperation, item: BulkItem) -> int:
        """Apply the action to one item and record its outcome; 1 if it failed, else 0."""
        reason = op.reason  # the operator's words; the audit detail names the operation
        try:
            inst = self.operations.act(
                op.action,
                item.saga_id,
                actor=op.created_by,
                reason=reason,
                expected_version=item.version_before,
                detail={"bulk_operation": op.id},
            )
        except ConcurrencyConflict as exc:
            return self._not_applied(op, item, ItemOutcome.SKIPPED, str(exc), reason)
        except SagaNotFound:
            return self._not_applied(op, item, ItemOutcome.SKIPPED, "it no longer exists", reason)
        except InvalidTransition as exc:
            return self._not_applied(op, item, ItemOutcome.SKIPPED, str(exc), reason)
        except (UnknownSaga, InvalidInput) as exc:
            return self._not_applied(op, item, ItemOutcome.ERROR, str(exc), reason)
        self.bulk.record(
            item,
            ItemOutcome.APPLIED,
            self.now(),
            state_after=str(inst.state),
            version_after=inst.version,
        )
        return 0

    def _not_applied(
        self, op: BulkOperation, item: BulkItem, outcome: ItemOutcome, why: str, reason: str
    ) -> int:
        self.bulk.record(item, outcome, self.now(), error=why)
        detail = {"bulk_operation": op.id, "action": str(op.action), "outcome": str(outcome)}
        # A purged instance has no audit entry to add; the report still has the item.
        with contextlib.suppress(SagaNotFound):
            self.operations.note_not_applied(
                item.saga_id,
                actor=op.created_by,
                reason=f"{reason}: {why}"[:MAX_REASON],
                detail={**detail, "why": why},
            )
        return 1 if outcome is ItemOutcome.ERROR else 0

    def _too_many_failures(self, op: BulkOperation, tally: _Tally) -> bool:
        if tally.processed < MIN_SAMPLE:
            return False
        return tally.failures / tally.processed > op.max_failure_rate

    def _halt(self, op: BulkOperation, tally: _Tally) -> BulkOperation:
        rate = tally.failures / tally.processed
        note = (
            f"halted: {tally.failures} of {tally.processed} processed failed ({rate:.0%}), "
            f"over the {op.max_failure_rate:.0%} threshold"
        )
        log.warning("bulk %s: %s", op.id, note)
        return self._end(op, BulkStatus.HALTED, note)

    def _end(self, op: BulkOperation, status: BulkStatus, note: str) -> BulkOperation:
        self.bulk.mark_failed_again(op.id)
        self.bulk.finish(op.id, self.runner_id, status, note, self.now())
        log.info("bulk %s: %s (%s)", op.id, status, note)
        return self.bulk.get(op.id)


# -- the facade ------------------------------------------------------------------


class BulkRecovery:
    """Dry runs, creating, running, stopping and reading bulk operations on one engine."""

    def __init__(self, engine: SagaEngine) -> None:
        self.engine = engine
        self.store = BulkStore(engine.store.db)

    def dry_run(self, action: Action, flt: BulkFilter, sample_size: int = SAMPLE_SIZE) -> DryRun:
        """How many instances ``flt`` matches, and the first ``sample_size``; writes nothing."""
        count = self.store.count(flt)
        rows = self.store.sample(flt, sample_size) if count else []
        sample = [self._sample_item(action, r) for r in rows]
        return DryRun(action, flt, min(count, MAX_ITEMS), count > MAX_ITEMS, sample)

    def create(
        self,
        action: Action,
        flt: BulkFilter,
        *,
        actor: str,
        reason: str,
        expected_count: int,
        batch_size: int = 50,
        rate_per_second: float = 5.0,
        max_failure_rate: float = 0.2,
    ) -> BulkOperation:
        """Snapshot the matching instances as a new operation (not started: see :meth:`run`)."""
        _check(action, reason, actor, batch_size, rate_per_second, max_failure_rate)
        if expected_count < 1:
            raise InvalidInput("expected count", "the dry run matched no instances: nothing to do")
        now = self.engine.clock()
        operation_id = new_id(now)
        op = {
            "id": operation_id,
            "action": str(action),
            "reason": reason.strip(),
            "created_by": actor.strip(),
            "created_at": now,
            "selection": flt.to_json(),
            "batch_size": batch_size,
            "rate_per_second": float(rate_per_second),
            "max_failure_rate": float(max_failure_rate),
            "status": str(BulkStatus.RUNNING),
            "total": 0,
            "heartbeat_at": now,
        }
        self.store.insert(op, flt, expected_count)
        log.info("bulk %s: %s on %d instances, by %s", operation_id, action, expected_count, actor)
        return self.store.get(operation_id)

    def runner(self, **clocks: Any) -> BulkRunner:
        """A runner with an id of its own (host, process, and a random part)."""
        runner_id = f"{self.engine.owner}:bulk:{uuid.uuid4().hex[:8]}"
        return BulkRunner(self.store, self.engine.operations, runner_id, **clocks)

    def run(self, operation_id: str) -> BulkOperation:
        """Run (or resume) the operation in this thread until it ends."""
        return self.runner().run(operation_id)

    def spawn(self, operation_id: str) -> threading.Thread:
        """Run the operation in a background thread of this process; returns the thread."""
        thread = threading.Thread(
            target=self._run_logged,
            args=(operation_id,),
            name=f"saga-bulk-{operation_id[-8:]}",
            daemon=True,
        )
        thread.start()
        return thread

    def stop(self, operation_id: str, by: str) -> BulkOperation:
        """Ask the runner to stop before its next item; an interrupted one stops at once."""
        now = self.engine.clock()
        op = self.store.get(operation_id)
        if not op.is_running:
            raise InvalidTransition(
                operation_id, "stop bulk operation", str(op.status), "it has already ended"
            )
        self.store.request_stop(operation_id, by, now)
        if op.interrupted(now):
            self.store.finish(operation_id, None, BulkStatus.STOPPED, f"stopped by {by}", now)
        return self.store.get(operation_id)

    def get(self, operation_id: str) -> BulkOperation:
        return self.store.get(operation_id)

    def _run_logged(self, operation_id: str) -> None:
        runner = self.runner()
        try:
            runner.run(operation_id)
        except Exception as exc:
            # A background thread has nobody to raise to: log it with its
            # traceback, and leave the operation resumable, saying why.
            log.exception("bulk %s: the runner failed", operation_id)
            try:
                self.store.release(operation_id, runner.runner_id, f"the runner failed: {exc}")
            except Exception:  # the store is what failed; the log line above says so
                log.exception("bulk %s: could not record the failure", operation_id)

    def _sample_item(self, action: Action, row: Any) -> SampleItem:
        applies, why = self._applies(action, row["id"])
        return SampleItem(
            saga_id=row["id"],
            saga_name=row["saga_name"],
            saga_version=row["saga_version"],
            state=row["state"],
            business_key=row["business_key"],
            step_name=row["step_name"],
            error=row["error"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            applies=applies,
            why_not=why,
        )

    def _applies(self, action: Action, saga_id: str) -> tuple[bool | None, str | None]:
        try:
            inst = self.engine.store.load(saga_id)
            defn = self.engine.registry.get(inst.saga_name, inst.saga_version)
            interventions.apply(action, inst, defn, self.engine.clock())
        except SagaNotFound:
            return False, "it no longer exists"
        except UnknownSaga:
            return None, "this process does not load its saga definition"
        except InvalidTransition as exc:
            return False, exc.why
        return True, None


def _check(
    action: Action,
    reason: str,
    actor: str,
    batch_size: int,
    rate: float,
    max_failure_rate: float,
) -> None:
    if not (reason or "").strip():
        raise InvalidInput("reason", "say why you are doing this; it goes in the audit log")
    if len(reason.strip()) > MAX_BULK_REASON:
        raise InvalidInput("reason", f"is {len(reason)} characters; the limit is {MAX_BULK_REASON}")
    if not (actor or "").strip():
        raise InvalidInput("actor", "name who is acting")
    if not 1 <= batch_size <= MAX_BATCH:
        raise InvalidInput("batch size", f"must be between 1 and {MAX_BATCH}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidInput("rate", f"must be between {MIN_RATE} and {MAX_RATE:g} per second")
    if not 0.0 <= max_failure_rate <= 1.0:
        raise InvalidInput("failure threshold", "must be between 0% and 100%")
    Action(action)
